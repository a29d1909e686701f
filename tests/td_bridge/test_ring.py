"""Frame rings: layout, conversions, validation, and a real second process writing faster than we read."""

import contextlib
import os
import subprocess
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from td_bridge.ring import (FLAG_CLOSED, MAGIC, PixelFormat, RingError, RingLayout, RingReader, RingWriter,
                            RowOrder, parse_header, to_rgb)

WRITER = Path(__file__).with_name("_writer_proc.py")
sys.path.insert(0, str(WRITER.parent))
from _writer_proc import Control  # noqa: E402


def test_layout_sizes_and_header_roundtrip(shm_name):
    lay = RingLayout(640, 360, PixelFormat.BGRA8, RowOrder.BOTTOM_UP, 4, checksum=True)
    assert lay.header_bytes == 64 + 4 * 64 and lay.slot_stride % 64 == 0
    with RingWriter.create(shm_name, lay) as w:
        assert bytes(w._shm.buf[:8]) == MAGIC
        got, flags = parse_header(w._shm.buf, w._shm.size, shm_name)
        assert got == lay and not flags & FLAG_CLOSED


@pytest.mark.parametrize("fmt", list(PixelFormat))
@pytest.mark.parametrize("rows", list(RowOrder))
def test_pixel_formats_and_row_order(shm_name, fmt, rows):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)  # top-down RGB
    lay = RingLayout(5, 6, fmt, rows, 2)
    with RingWriter.create(shm_name, lay) as w, RingReader.attach(shm_name) as r:
        w.write(rgb, rows=RowOrder.TOP_DOWN)
        raw = r.empty_frame()
        assert r.read(raw).index == 0
        stored = raw if rows is RowOrder.TOP_DOWN else raw[::-1]  # the ring really holds rows in its order
        red, green, blue = fmt.rgb_channels
        assert (stored[..., red] == rgb[..., 0]).all() and (stored[..., blue] == rgb[..., 2]).all()
        if fmt.channels == 4:
            assert (stored[..., 3] == 255).all()
        back = np.empty_like(rgb)
        assert (to_rgb(raw, lay, back) == rgb).all()


def test_touchdesigner_float_bottom_up_frames(shm_name):
    """TOP.numpyArray() gives float32 RGBA 0..1, bottom row first; the ring keeps whatever order it declares."""
    td = np.random.default_rng(1).random((4, 3, 4), dtype=np.float32)
    with RingWriter.create(shm_name, RingLayout(3, 4, PixelFormat.RGBA8, RowOrder.TOP_DOWN, 2)) as w, \
            RingReader.attach(shm_name) as r:
        w.write(td, rows=RowOrder.BOTTOM_UP)
        raw = r.empty_frame()
        r.read(raw)
        assert np.array_equal(raw, np.round(td[::-1] * 255).astype(np.uint8))


def test_reader_returns_only_new_frames_in_order(shm_name):
    with RingWriter.create(shm_name, RingLayout(4, 4, PixelFormat.RGB8, slot_count=2)) as w, \
            RingReader.attach(shm_name) as r:
        out = r.empty_frame()
        assert r.read(out) is None
        for i in range(5):
            w.write(np.full((4, 4, 3), i, np.uint8), source_index=100 + i)
        info = r.read(out)
        assert (info.index, info.source_index) == (4, 104) and (out == 4).all()
        assert r.read(out) is None


def test_wrong_size_and_corrupt_headers_are_named(shm_name):
    lay = RingLayout(64, 64, PixelFormat.RGBA8, slot_count=3)
    with pytest.raises(RingError, match="no shared memory named"):
        RingReader.attach(shm_name)
    with RingWriter.create(shm_name, lay) as w:
        small = shared_memory.SharedMemory(name=shm_name + "s", create=True, size=lay.total_bytes // 2)
        try:
            small.buf[:64] = bytes(w._shm.buf[:64])  # a valid header on a segment too small for it
            with pytest.raises(RingError, match=r"is \d+ bytes; a 64x64 rgba8 top-down, 3 slots ring needs"):
                RingReader.attach(shm_name + "s")
            small.buf[:8] = b"GARBAGE!"
            with pytest.raises(RingError, match="not an rtdiffusion frame ring"):
                RingReader.attach(shm_name + "s")
            small.buf[:64] = bytes(w._shm.buf[:64])
            small.buf[21] = 9  # pixel format code
            with pytest.raises(RingError, match="pixel format code 9"):
                RingWriter.attach(shm_name + "s")
        finally:
            small.close()
            small.unlink()
        with pytest.raises(RingError, match="expected 32x32"):
            RingReader.attach(shm_name, expect=RingLayout(32, 32))
        with pytest.raises(RingError, match="already exists"):
            RingWriter.create(shm_name, lay)
        with RingReader.attach(shm_name) as r:
            w._shm.buf[12] ^= 0xFF  # width changes under the reader
            with pytest.raises(RingError, match="corrupt header|changed while in use"):
                r.check_header()
            w.repair_header()
            r.check_header()
        with pytest.raises(RingError, match=r"takes \[64, 64, 3\|4\] uint8"):
            w.write(np.zeros((64, 64, 3), np.float64))


def test_creator_unlinks_and_marks_closed(shm_name):
    w = RingWriter.create(shm_name, RingLayout(8, 8))
    r = RingReader.attach(shm_name)
    w.close()
    assert r.closed
    r.close()
    with pytest.raises(RingError, match="no shared memory named"):
        RingReader.attach(shm_name)


@pytest.mark.parametrize("checksum", [False, True])
def test_fast_writer_in_another_process_never_tears(shm_name, checksum):
    """A real second process overwrites a 2-slot ring as fast as it can; every frame we get is whole.

    What is proven is that a read never returns a torn frame, not that a reader keeps pace with an
    unthrottled writer (it need not: the writer laps it). When every attempt of a read was lapped (the
    documented RingError), the reader asks the writer, through a control segment, to hold still between two
    frames, reads the newest frame, and lets it go on: so the test makes progress however the two processes
    are scheduled, while all other reads race the writer."""
    lay = RingLayout(256, 256, PixelFormat.RGBA8, slot_count=2, checksum=checksum)
    reader = RingReader.create(shm_name, lay)  # we own it; the other process writes into it
    ctl = Control.create(shm_name + "c")
    v = ctl.v  # [hold_req, hold_ack, release, stop]
    proc = subprocess.Popen([sys.executable, str(WRITER), shm_name, "--control", shm_name + "c"],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    def wait_for(cond, what):
        end = time.monotonic() + 120
        while not cond():
            assert proc.poll() is None, "the writer died"
            assert time.monotonic() < end, f"timed out waiting for {what}"
            time.sleep(0.001)

    def check(info, out):
        v0 = int(out.flat[0])
        assert (out == v0).all(), f"torn frame {info.index}: values {np.unique(out)[:8]}"
        assert v0 == info.index % 251

    try:
        out = reader.empty_frame()
        got, held, last = 0, 0, -1
        while got < 40:
            wait_for(lambda: reader.published - 1 > last, "a new frame")
            try:
                info = reader.read(out)
            except RingError as exc:  # lapped on every attempt: a whole frame was still never returned
                assert "laps this reader" in str(exc), exc
                req = int(v[0]) + 1
                v[0] = req
                wait_for(lambda: int(v[1]) == req, "the writer to hold")
                info = reader.read(out)  # the writer is between two frames: the newest one is whole
                v[2] = req
                held += 1
                assert info is not None
            if info is None:
                continue
            check(info, out)
            assert info.index > last
            last = info.index
            got += 1
        wait_for(lambda: reader.published > 2 * got, "the writer to lap the reader")
        written = reader.published
    finally:
        v[3] = 1
        try:
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
            retries = reader.retries
            del v
            ctl.close(unlink=True)
            reader.close()
    assert got == 40 and written > 2 * got, (got, written)  # the writer really lapped us
    print(f"read {got} of {written} frames, {retries} seqlock retries, {held} reads with the writer held")


@contextlib.contextmanager
def writer_killed_mid_frame(shm_name: str):
    """A real writer process that writes one frame into ring ``shm_name``, begins the next one (its slot's seq
    left odd) and is killed there with SIGKILL."""
    code = ("import sys, time, numpy; from td_bridge.ring import RingWriter; w = RingWriter.attach(sys.argv[1]); "
            "w.write(numpy.zeros((16, 16, 4), 'uint8')); w.begin(); print('begun', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, shm_name], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "begun"
        proc.kill()
        proc.wait(timeout=10)
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_a_writer_that_died_mid_frame_leaves_no_stuck_slot(shm_name):
    """A writer process killed between begin() and commit() leaves its slot's seq odd; the next writer to
    attach must repair it, or that slot's seqlock stays inverted and reads fail forever."""
    lay = RingLayout(16, 16, slot_count=3)
    reader = RingReader.create(shm_name, lay)
    try:
        with writer_killed_mid_frame(shm_name):
            assert reader.published == 1 and int(reader._seq[1]) & 1  # slot 1 left mid-write
            out = reader.empty_frame()
            with RingWriter.attach(shm_name) as w:
                for n in range(1, 8):
                    frame = np.full((16, 16, 4), n, np.uint8)
                    assert w.write(frame) == n
                    info = reader.read(out)  # no RingError, never a stale or torn frame
                    assert info is not None and info.index == n and (out == n).all()
    finally:
        reader.close()


def test_attaching_a_writer_keeps_the_closed_flag(shm_name):
    """CLOSED belongs to the creator: a writer attaching to a ring whose creator has gone must not clear it."""
    creator = RingReader.create(shm_name, RingLayout(8, 8))
    creator._flags[0] |= FLAG_CLOSED  # what close() does before unlinking
    with RingWriter.attach(shm_name) as w:
        assert w.closed
        w.clear_closed()  # only on request (the bridge adopting a ring it will serve)
        assert not w.closed and not creator.closed
    creator.close()


def test_a_dead_writer_and_a_corrupt_published_counter_each_get_their_own_message(shm_name):
    """A one-slot ring whose writer process died inside a frame, and a published counter pointing at a slot
    never written: each read failure says what was seen (before: "give the ring more slots" for all)."""
    reader = RingReader.create(shm_name, RingLayout(16, 16, slot_count=1))
    try:
        with writer_killed_mid_frame(shm_name):
            with pytest.raises(RingError, match=r"slot 0 stayed mid-write .*died or hangs inside a frame") as exc:
                reader.read(reader.empty_frame())
            assert "more slots" not in str(exc.value)
    finally:
        reader.close()
    with RingWriter.create(shm_name, RingLayout(8, 8, slot_count=3)) as w, RingReader.attach(shm_name) as r:
        w.write(np.zeros((8, 8, 4), np.uint8))
        w._published[0] = 5  # frame 4 would be in slot 1, which was never written
        with pytest.raises(RingError, match="slot 1 was never written: the published counter is corrupt"):
            r.read(r.empty_frame())


def test_attaching_starts_no_resource_tracker(shm_name):
    """Inside TouchDesigner sys.executable is TouchDesigner: the resource tracker that Python < 3.13 starts on
    attach would launch another TouchDesigner (macOS). Attaching, probing and closing must start none."""
    code = ("import sys; sys.executable = '/nonexistent/TouchDesigner'\n"
            "import numpy as np\n"
            "from multiprocessing import resource_tracker as rt\n"
            "from td_bridge.touchdesigner.td_frames import InputSender, OutputReceiver\n"
            "s, r = InputSender(), OutputReceiver()\n"
            "assert s.send(sys.argv[1] + 'i', np.zeros((8, 8, 4), np.float32)), s.error\n"
            "r.receive(sys.argv[1] + 'o'); assert r.error is None, r.error\n"
            "s._check(0.0); r._check(0.0); s.close(); r.close()\n"
            "assert rt._resource_tracker._fd is None and rt._resource_tracker._pid is None\n"
            "print('no tracker')\n")
    with RingReader.create(shm_name + "i", RingLayout(8, 8)), RingWriter.create(shm_name + "o", RingLayout(8, 8)):
        out = subprocess.run([sys.executable, "-c", code, shm_name], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0 and "no tracker" in out.stdout, out.stderr


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_no_permission_to_attach_is_reported_not_raised(shm_name):
    """An elevated bridge and a non-elevated TouchDesigner (here: a segment of mode 000 opened by an
    unprivileged process): the scripts say so in .error on every retry and never raise into onCook."""
    code = ("import os, sys; import numpy as np\n"
            "from td_bridge.touchdesigner.td_frames import InputSender, OutputReceiver\n"
            "if os.geteuid() == 0: os.setgid(65534); os.setuid(65534)  # nobody: root ignores file modes\n"
            "s, r = InputSender(), OutputReceiver()\n"
            "for _ in range(2):\n"
            "    assert not s.send(sys.argv[1], np.zeros((8, 8, 4), np.float32))\n"
            "    assert r.receive(sys.argv[1]) is None\n"
            "    s._next_try = r._next_try = 0.0\n"
            "print(s.error); print(r.error)\n")
    with RingReader.create(shm_name, RingLayout(8, 8)) as ring:
        os.fchmod(ring._fd, 0)
        out = subprocess.run([sys.executable, "-c", code, shm_name], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all("no permission to open shared memory" in line for line in lines), out.stdout
