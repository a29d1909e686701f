"""A second process for the ring tests: writes frames as fast as it can into an existing ring.

Frame n is filled with the byte n % 251 everywhere, so a reader can tell a torn frame (two values) from a
whole one.

Usage: ``python _writer_proc.py RING SECONDS`` writes for that long and prints the number of frames;
``python _writer_proc.py RING --control CTL`` writes until told to stop through the control segment CTL,
four little-endian u64 (see ``Control``): the reader can ask the writer to hold still between two frames,
which the reader uses to make progress deterministically while the writer is otherwise unthrottled.
"""

import sys
import time
from multiprocessing import shared_memory

import numpy as np

from td_bridge.ring import RingWriter


class Control:
    """[hold_req, hold_ack, release, stop] u64 in a 32-byte segment.

    reader: hold_req += 1; wait until hold_ack == hold_req; ...read...; release = hold_req
    writer, between two frames: if hold_req != hold_ack: r = hold_req; hold_ack = r; wait until release == r
    """

    SIZE = 32

    def __init__(self, shm):
        self.shm = shm
        self.v = np.ndarray((4,), dtype="<u8", buffer=shm.buf)  # aligned 8-byte stores

    @classmethod
    def create(cls, name):
        c = cls(shared_memory.SharedMemory(name=name, create=True, size=cls.SIZE))
        c.v[:] = 0
        return c

    def close(self, unlink=False):
        self.v = None
        self.shm.close()
        if unlink:
            self.shm.unlink()


if __name__ == "__main__":
    name = sys.argv[1]
    w = RingWriter.attach(name)
    n = 0
    if sys.argv[2] == "--control":
        from multiprocessing import resource_tracker

        ctl_shm = shared_memory.SharedMemory(name=sys.argv[3], create=False)
        resource_tracker.unregister(ctl_shm._name, "shared_memory")  # the test owns and unlinks it
        ctl = Control(ctl_shm)
        v = ctl.v
        while not v[3]:
            if v[0] != v[1]:  # the reader asks for a pause between two frames
                r = int(v[0])
                v[1] = r
                while int(v[2]) != r and not v[3]:
                    time.sleep(0.0005)
            dst = w.begin()
            dst.fill(n % 251)
            w.commit()
            n += 1
        ctl.close()
    else:
        end = time.monotonic() + float(sys.argv[2])
        while time.monotonic() < end:
            dst = w.begin()
            dst.fill(n % 251)
            w.commit()
            n += 1
    w.close()
    sys.stdout.write(f"{n}\n")
