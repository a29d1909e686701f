"""A second process for the truncation tests: reads or writes a ring while the test truncates it.

``python _truncation_proc.py pause NAME ROLE BACKEND``: one operation with the truncation placed exactly
between the size check and the copy: the process prints ``paused`` at that point and waits for a line on
stdin (the test truncates the segment meanwhile), then goes on. ROLE: ``read`` (RingReader.read), ``write``
(RingWriter.write), ``header`` (the header words TouchDesigner's scripts and the heartbeat read).
BACKEND: ``fd`` (pread / pwrite, what Linux uses) or ``map`` (through the mapping: what macOS and Windows
use, and what Linux used before). Prints what each step gave; a fault kills it with SIGBUS.

``python _truncation_proc.py loop NAME ROLE [BACKEND]``: prints ``ready``, then reads (ROLE ``read``: the newest
frame, again and again) or writes (``write``) until a line arrives on stdin, then does one more that must
succeed and prints a JSON summary. Any outcome other than a whole, crc-valid frame or RingTruncated exits 3.
"""

import json
import select
import sys

import numpy as np

import td_bridge.segment_io as segment_io
from td_bridge.ring import RingReader, RingTruncated, RingWriter


def pause():
    print("paused", flush=True)
    sys.stdin.readline()


def run_pause(name, role, backend):
    segment_io.FD_IO = backend == "fd"
    if role == "write":
        w = RingWriter.attach(name)
        real_begin = w.begin

        def begin():  # after write()'s size check and the slot's seq going odd; before any pixel is copied
            dst = real_begin()
            pause()
            return dst

        w.begin = begin
        frame = np.full(w.layout.shape, 7, np.uint8)
        w.write(frame)
        print(f"wrote, segment now {w.segment_size()} bytes", flush=True)
        w.begin = real_begin
        try:
            w.write(frame)
            print("second write went through", flush=True)
        except RingTruncated as exc:
            print(f"RingTruncated: {exc}", flush=True)
        return
    r = RingReader.attach(name)
    out = r.empty_frame()
    if role == "header":
        pause()
        print(f"closed={r.closed} published={r.published} heartbeat={r.heartbeat} new={r.new_frame()}", flush=True)
    else:
        real_read_into = r._io.read_into

        def read_into(off, dst):  # the size check has passed; the pixels are next
            if off >= r.layout.header_bytes:
                r._io.read_into = real_read_into
                pause()
            return real_read_into(off, dst)

        r._io.read_into = read_into
    try:
        info = r.read(out)
        print(f"frame {info}", flush=True)
    except RingTruncated as exc:
        print(f"RingTruncated: {exc}", flush=True)


def stop_requested():
    return bool(select.select([sys.stdin], [], [], 0)[0])


def run_loop(name, role, backend="fd"):
    segment_io.FD_IO = backend == "fd"
    counts = {"frames": 0, "before": 0, "during": 0}  # during: the short read itself caught the truncation
    if role == "read":
        r = RingReader.attach(name)
        out = r.empty_frame()
        newest = r.published - 1

        def once():
            r.last_index = -1  # the newest frame again, every time
            info = r.read(out)  # checksum ring: the crc32 is checked inside
            assert info is not None and info.index == newest, info
            assert (out == newest % 251).all(), f"frame {info.index} is not whole: {np.unique(out)[:8]}"
    else:
        w = RingWriter.attach(name)

        def once():
            w.write(np.full(w.layout.shape, w._next % 251, np.uint8))  # frame n is filled with n % 251

    print("ready", flush=True)
    while not stop_requested():
        try:
            once()
            counts["frames"] += 1
        except RingTruncated as exc:
            counts["during" if "came back with" in str(exc) else "before"] += 1
    once()  # the segment is whole again: this one must go through
    counts["frames"] += 1
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    try:
        if sys.argv[1] == "pause":
            run_pause(*sys.argv[2:5])
        else:
            run_loop(*sys.argv[2:5])
    except Exception as exc:  # anything but a whole frame or RingTruncated: the test fails on exit code 3
        print(f"unexpected {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
