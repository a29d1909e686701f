"""The inference worker on its own: a real thread, a real (slow) frame function, the one-slot mailbox."""

from __future__ import annotations

import threading
import time

import numpy as np

from demo.protocol import Format, parse_header
from demo.worker import InferenceWorker, InputFrame


class SlowInvert:
    """A frame function that takes ``ms`` per frame and records the order it saw frames in."""

    def __init__(self, ms: float, fail_on: int | None = None) -> None:
        self.ms, self.fail_on, self.seen = ms, fail_on, []

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        self.seen.append(int(frame[0, 0, 0]))
        time.sleep(self.ms / 1000)
        if self.fail_on is not None and int(frame[0, 0, 0]) == self.fail_on:
            raise RuntimeError("engine failure on purpose")
        return 255 - frame


def frame(i: int) -> InputFrame:
    return InputFrame(np.full((8, 8, 3), i, np.uint8), i, float(i), time.monotonic())


def collect():
    out, cond = [], threading.Condition()

    def publish(o):
        with cond:
            out.append(o)
            cond.notify_all()

    def wait_for(n, timeout=10):
        with cond:
            assert cond.wait_for(lambda: len(out) >= n, timeout), f"only {len(out)} outputs of {n}"

    return out, publish, wait_for


def test_newest_frame_wins_and_drops_are_counted():
    engine = SlowInvert(150)
    out, publish, wait_for = collect()
    w = InferenceWorker(engine, publish, output_format=Format.RGB)
    w.start()
    try:
        w.submit(frame(1))
        time.sleep(0.05)  # the worker takes frame 1
        for i in range(2, 11):  # 2..9 are replaced while 1 is processed; 10 waits in the slot
            w.submit(frame(i))
        wait_for(2)
        time.sleep(0.3)
        assert engine.seen == [1, 10]
        assert [o.frame_id for o in out] == [1, 10]
        s = w.stats()
        assert (s["frames_in"], s["dropped_in"], s["frames_out"]) == (10, 8, 2)
        head = parse_header(out[1].message)
        assert (head.frame_id, head.timestamp_ms, head.width, head.height) == (10, 10.0, 8, 8)
        assert head.process_us >= 140_000
        assert int(out[1].image[0, 0, 0]) == 245
    finally:
        w.stop()


def test_min_frame_ms_makes_each_frame_take_that_long():
    out, publish, wait_for = collect()
    w = InferenceWorker(SlowInvert(1), publish, min_frame_ms=200)
    w.start()
    try:
        t0 = time.monotonic()
        w.submit(frame(1))
        wait_for(1)
        assert time.monotonic() - t0 >= 0.2 and out[0].process_ms >= 200
    finally:
        w.stop()


def test_pause_stops_work_and_freeze_reprocesses_the_held_frame():
    engine = SlowInvert(10)
    out, publish, wait_for = collect()
    w = InferenceWorker(engine, publish)
    w.start()
    try:
        w.set_playback(paused=True)
        w.submit(frame(1))
        time.sleep(0.2)
        assert out == []
        w.set_playback(paused=False)
        wait_for(1)
        w.set_playback(frozen=True)
        wait_for(5)  # frozen: frame 1 again and again
        w.submit(frame(2))  # ignored while frozen
        n = len(out)
        wait_for(n + 3)
        assert set(engine.seen) == {1}
        assert all(o.frozen and o.timestamp_ms == 0.0 for o in out[1:])
        assert w.stats()["ignored_frozen"] == 1
        w.set_playback(frozen=False)
        w.submit(frame(3))
        deadline = time.monotonic() + 5
        while 3 not in engine.seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 3 in engine.seen and 2 not in engine.seen
    finally:
        w.stop()


def test_a_freeze_right_after_a_live_frame_is_taken_does_not_label_it_frozen():
    # the freeze lands between the worker taking live frame 1 (and releasing the lock) and labelling it:
    # frame 1 is still a live frame with its own timestamp; only the re-runs after it are frozen
    class FreezeAfterFirstTake(InferenceWorker):
        def _take(self):
            taken = super()._take()
            if not getattr(self, "froze", False):
                self.froze = True
                self.set_playback(frozen=True)
            return taken

    out, publish, wait_for = collect()
    w = FreezeAfterFirstTake(SlowInvert(5), publish, output_format=Format.RGB)
    w.start()
    try:
        w.submit(frame(1))
        wait_for(3)
        assert (out[0].frozen, out[0].timestamp_ms) == (False, 1.0)
        assert parse_header(out[0].message).timestamp_ms == 1.0
        assert all(o.frozen and o.timestamp_ms == 0.0 for o in out[1:3])
    finally:
        w.stop()


def test_an_engine_error_is_counted_and_the_worker_goes_on():
    out, publish, wait_for = collect()
    w = InferenceWorker(SlowInvert(1, fail_on=1), publish)
    w.start()
    try:
        w.submit(frame(1))
        time.sleep(0.2)
        w.submit(frame(2))
        wait_for(1)
        s = w.stats()
        assert s["errors"] == 1 and "engine failure on purpose" in s["last_error"]
        assert out[0].frame_id == 2
    finally:
        w.stop()


def test_bad_options_are_named():
    for kw, words in [({"min_frame_ms": -1}, "min_frame_ms"), ({"output_format": Format.RGBA}, "output_format"),
                      ({"jpeg_quality": 0}, "jpeg_quality")]:
        try:
            InferenceWorker(SlowInvert(1), lambda o: None, **kw)
        except ValueError as exc:
            assert words in str(exc)
        else:
            raise AssertionError(f"{kw} was accepted")
