"""A segment truncated under a reader or a writer (Linux lets any process that can open the name do that):
never SIGBUS, always a whole frame or RingTruncated. Real processes, real shared memory.

The exact race (a truncation after the size check, before the copy) is placed there by ordering, not timing:
the other process stops at that point (``_truncation_proc.py pause``) until this one has truncated the
segment. Through the mapping (what macOS and Windows use, where segments cannot shrink, and what Linux used
before) that dies of SIGBUS every time; through the descriptor it is a RingTruncated naming the segment. A
second test truncates and restores the segment at random moments while the other process reads or writes
as fast as it can; it asserts only what must hold on every run (no signal, every read whole or RingTruncated).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from td_bridge.ring import PixelFormat, RingLayout, RingReader, RingWriter

PROC = Path(__file__).with_name("_truncation_proc.py")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
TIMEOUT = 120

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="only Linux lets a shared-memory segment shrink (macOS and Windows refuse)")


def spawn(*args):
    """The other process; its stdout carries only what it prints on purpose (warnings go to stderr)."""
    return subprocess.Popen([sys.executable, str(PROC), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for_line(proc, want):
    line = proc.stdout.readline().strip()
    if line != want:
        out, err = proc.communicate(timeout=TIMEOUT)
        pytest.fail(f"expected {want!r} from the other process, got {line!r} (exit {proc.returncode}): {out} {err}")


def ring_for(role, name, layout):
    """The test's side of the ring: it owns the segment; for a reader (or header) test it also wrote frames."""
    if role == "write":
        return RingReader.create(name, layout)
    w = RingWriter.create(name, layout)
    for n in range(3):
        w.write(np.full((layout.height, layout.width, 4), n % 251, np.uint8))
    return w


# (role, truncated to): the pixels' pages gone, or every page (the header words too)
CASES = [("read", 100), ("write", 100), ("header", 0)]


@pytest.mark.parametrize("backend", ["fd", "map"])
@pytest.mark.parametrize("role,size", CASES, ids=[c[0] for c in CASES])
def test_truncation_between_the_size_check_and_the_copy(shm_name, role, size, backend):
    lay = RingLayout(64, 64, PixelFormat.RGBA8, slot_count=3, checksum=True)
    with ring_for(role, shm_name, lay) as mine:
        proc = spawn("pause", shm_name, role, backend)
        try:
            wait_for_line(proc, "paused")  # it has passed the size check
            os.ftruncate(mine._fd, size)
            out, err = proc.communicate("go\n", timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=TIMEOUT)
    if backend == "map":  # the old path: a copy through the mapping after a passing size check
        assert proc.returncode == -signal.SIGBUS, (proc.returncode, out, err)
        return
    assert proc.returncode == 0, (proc.returncode, out, err)
    lines = out.splitlines()
    if role == "write":  # the pwrite grew the file back (to the end of slot 0); the next write sees it short
        assert lines[0].startswith("wrote, segment now") and int(lines[0].split()[3]) < lay.total_bytes, out
        assert lines[1].startswith(f"RingTruncated: shared memory {shm_name!r} was truncated to"), out
    elif role == "header":  # the header words read as a mapping's last page would; the read says what happened
        assert lines[0] == "closed=False published=0 heartbeat=0 new=False", out
        assert lines[1].startswith(f"RingTruncated: shared memory {shm_name!r} was truncated to 0 bytes"), out
    else:
        assert lines == [f"RingTruncated: shared memory {shm_name!r} was truncated under this process (now 100 "
                         f"bytes): reading {lay.frame_bytes} bytes at offset {lay.header_bytes + 2 * lay.slot_stride} "
                         f"came back with 0; nothing was returned from it"], out


@pytest.mark.parametrize("role", ["read", "write"])
def test_random_truncations_never_kill_a_reader_or_a_writer(shm_name, role):
    """300 times: truncate to a random size, wait up to 1 ms, write the saved bytes back (which grows the file
    page by page with its old contents, so all a reader can see is a shorter file), wait up to 2 ms."""
    lay = RingLayout(256, 256, PixelFormat.RGBA8, slot_count=3, checksum=True)
    rng = np.random.default_rng(12)
    with ring_for(role, shm_name, lay) as mine:
        fd = mine._fd
        saved = os.pread(fd, lay.total_bytes, 0)
        proc = spawn("loop", shm_name, role)
        try:
            wait_for_line(proc, "ready")
            for _ in range(300):
                os.ftruncate(fd, int(rng.integers(0, lay.total_bytes)))
                time.sleep(rng.uniform(0, 1e-3))
                os.pwrite(fd, saved, 0)
                time.sleep(rng.uniform(0, 2e-3))
            out, err = proc.communicate("stop\n", timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, (proc.returncode, out, err)  # not -SIGBUS, and no other outcome (exit 3)
        counts = json.loads(out.splitlines()[-1])
        print(f"{role}: {counts} (during: caught by the short read itself, after a passing size check)")
        assert counts["frames"] >= 1
        if role == "write":  # the writer's last frame, written after the last restore, is whole
            with RingReader.attach(shm_name) as r:
                frame = r.empty_frame()
                info = r.read(frame)
                assert info is not None and (frame == info.index % 251).all()
