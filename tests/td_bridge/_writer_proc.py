"""A second process for the ring tests: writes frames as fast as it can into an existing ring.

Frame n is filled with the byte n % 251 everywhere, so a reader can tell a torn frame (two values) from a
whole one. Usage: python _writer_proc.py RING_NAME SECONDS
"""

import sys
import time

from td_bridge.ring import RingWriter

if __name__ == "__main__":
    name, seconds = sys.argv[1], float(sys.argv[2])
    w = RingWriter.attach(name)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        dst = w.begin()
        dst.fill(n % 251)
        w.commit()
        n += 1
    w.close()
    sys.stdout.write(f"{n}\n")
