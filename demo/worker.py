"""The inference worker: one thread, a one-slot "latest frame" mailbox, newest wins.

Inference never runs on the web server's event loop. The loop only decodes, checks and hands frames over;
the worker thread owns every ``engine(frame)`` call. Cross-thread protocol::

    event loop (server.py)                 worker thread (_run)                     request threads
    ----------------------                 --------------------                     ---------------
    submit(frame) --lock--> [ slot ] --lock--> take slot (slot = None)              set_playback(paused, frozen)
      slot full?  replace it,                   engine(frame)  (no lock held)          --lock--> flags, notify
      dropped += 1                              encode output once (JPEG/RGB)        engine.update_*() directly:
      frozen?     ignore it,                    sleep up to min_frame_ms               the engine applies them at
      ignored += 1                              publish(out) --> loop.call_soon_       its next frame boundary
                                                                threadsafe(hub.publish)

    Condition variable ``_cond`` guards _stopping and the Mailbox ``_box`` (slot, held, paused, frozen,
    busy_since and the counters). ``busy_since`` is set when a frame is taken and cleared when its output is published (or it failed):
    ``stats()["busy_ms"]`` is how long the current frame has taken so far, which tells a slow engine (busy)
    from a stalled pipeline (idle while the page waits).
    The worker waits on it while paused, or while the slot is empty and nothing is frozen.
    ``_box.latest`` (the last OutputFrame) is replaced by one reference assignment; readers take it without a lock.

Frozen: the worker keeps re-processing the last frame it took (``held``), so prompt and seed changes still show
while the camera is ignored. Paused: the worker does nothing; the last output stays on screen.

At most one frame waits (the slot) and one is in the engine, so the displayed output is never older than one
processing time plus the time the slot's frame waited, which is at most one processing time when the camera is
faster than the engine and the client streams (see tests/demo/test_latency.py).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .protocol import Format, encode_payload, pack_header

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputFrame:
    image: np.ndarray  # [H, W, 3] uint8, owned by the frame (a fresh array)
    frame_id: int
    timestamp_ms: float  # the client's capture time, echoed back
    received_s: float  # time.monotonic() on arrival


@dataclass(frozen=True)
class OutputFrame:
    seq: int  # counts outputs from 1
    image: np.ndarray  # [H, W, 3] uint8 from the engine
    message: bytes  # the binary frame every client is sent (see protocol.py)
    frame_id: int  # the input frame it was made from
    timestamp_ms: float  # the input's capture time; 0 when made from a frozen frame
    process_ms: float  # engine + encode + the min_frame_ms wait
    frozen: bool


def check_worker_args(min_frame_ms: Any, output_format: Any, jpeg_quality: Any) -> None:
    """The arguments InferenceWorker and GroupWorker share; ValueError naming what was expected."""
    if not (isinstance(min_frame_ms, (int, float)) and 0 <= min_frame_ms <= 60_000):
        raise ValueError(f"min_frame_ms must be a number of ms from 0 to 60000; got {min_frame_ms!r}")
    if output_format not in (Format.JPEG, Format.RGB):
        raise ValueError(f"output_format must be Format.JPEG or Format.RGB; got {output_format!r}")
    if not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
        raise ValueError(f"jpeg_quality must be an integer from 1 to 100; got {jpeg_quality!r}")


class Mailbox:
    """One stream's one-slot mailbox, playback state and counters; every field is guarded by ``cond`` (the
    worker's condition). InferenceWorker has one; GroupWorker one per stream (``index``)."""

    def __init__(self, cond: threading.Condition, min_frame_s: float, index: int = 0) -> None:
        self._cond, self._min_frame_s, self.index = cond, min_frame_s, index
        self.slot: InputFrame | None = None
        self.held: InputFrame | None = None  # the last frame taken (re-run while frozen)
        self.paused = self.frozen = False
        self.received = self.dropped = self.ignored = self.processed = self.errors = 0
        self.last_error = ""
        self.last_process_ms = 0.0
        self.busy_since: float | None = None  # monotonic start of the frame being run; None = idle
        self.out_times: collections.deque[float] = collections.deque(maxlen=30)
        self.latest: OutputFrame | None = None  # replaced by one reference assignment; read without the lock

    # ---- any thread -----------------------------------------------------------------------------------------
    def submit(self, frame: InputFrame) -> bool:
        """Put ``frame`` in the mailbox. Returns True when it replaced a frame that was still waiting."""
        with self._cond:
            self.received += 1
            if self.frozen and self.held is not None:
                self.ignored += 1
                return False
            replaced = self.slot is not None
            self.dropped += replaced
            self.slot = frame
            self._cond.notify_all()
            return replaced

    def set_playback(self, paused: bool | None = None, frozen: bool | None = None) -> dict[str, bool]:
        with self._cond:
            if paused is not None:
                self.paused = bool(paused)
            if frozen is not None:
                self.frozen = bool(frozen)
                if not self.frozen:
                    self.slot = None  # the next live frame starts afresh
            self._cond.notify_all()
            return {"paused": self.paused, "frozen": self.frozen}

    def stats(self) -> dict[str, Any]:
        with self._cond:
            times = list(self.out_times)
            stats = {
                "frames_in": self.received, "dropped_in": self.dropped, "ignored_frozen": self.ignored,
                "frames_out": self.processed, "errors": self.errors, "last_error": self.last_error,
                "process_ms": round(self.last_process_ms, 2), "paused": self.paused, "frozen": self.frozen,
                "min_frame_ms": self._min_frame_s * 1000.0,
                "busy_ms": 0 if self.busy_since is None else round((time.monotonic() - self.busy_since) * 1e3),
            }
        fps = 0.0
        if len(times) >= 2 and time.monotonic() - times[-1] < 2.0:
            fps = (len(times) - 1) / max(times[-1] - times[0], 1e-6)
        stats["fps"] = round(fps, 2)
        return stats

    # ---- worker thread, under cond ------------------------------------------------------------------------------
    def ready(self) -> bool:
        return not self.paused and (self.slot is not None or (self.frozen and self.held is not None))

    def take(self, now: float) -> tuple[InputFrame, bool] | None:
        """(frame, frozen) to run now, or None (no new frame: held)."""
        if not self.ready():
            return None
        self.busy_since = now
        if self.frozen and self.held is not None:
            return self.held, True
        frame, self.slot = self.slot, None
        self.held = frame
        return frame, False

    def fail(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:500]
        self.busy_since = None

    def finish(self, process_ms: float) -> int:
        """Count an output that took ``process_ms``; its seq (counts outputs from 1)."""
        self.processed += 1
        self.busy_since = None
        self.last_process_ms = process_ms
        self.out_times.append(time.monotonic())
        return self.processed


class WorkerThread:
    """What InferenceWorker and GroupWorker share: the checked arguments, the condition, start and stop."""

    thread_name = "rtdiffusion-demo-worker"
    busy_note = "the inference worker did not stop within %.1f s (an engine call is still running)"

    def __init__(self, publish: Callable, min_frame_ms: float, output_format: Format, jpeg_quality: int) -> None:
        check_worker_args(min_frame_ms, output_format, jpeg_quality)
        self._publish = publish
        self._min_frame_s = min_frame_ms / 1000.0
        self._format, self._quality = output_format, jpeg_quality
        self._cond = threading.Condition()
        self._stopping = False
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._stop_event.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning(self.busy_note, timeout)


class InferenceWorker(WorkerThread):
    """Runs ``engine(frame)`` on its own thread and publishes each result through ``publish``.

    engine: anything with ``__call__(uint8 [H, W, 3]) -> uint8 [H, W, 3]``.
    publish: called on the worker thread with each OutputFrame; it must not block (the server hands it to
      the event loop with ``call_soon_threadsafe``).
    min_frame_ms: the worker takes at least this long per frame (a slow-engine setting for latency tests and
      for capping the load on a shared machine); 0 = as fast as the engine goes.
    """

    def __init__(self, engine: Any, publish: Callable[[OutputFrame], None], *, min_frame_ms: float = 0.0,
                 output_format: Format = Format.JPEG, jpeg_quality: int = 90) -> None:
        super().__init__(publish, min_frame_ms, output_format, jpeg_quality)
        self._engine = engine
        self._box = Mailbox(self._cond, self._min_frame_s)

    # ---- any thread -------------------------------------------------------------------------------------------
    def submit(self, frame: InputFrame) -> bool:
        """Put ``frame`` in the mailbox. Returns True when it replaced a frame that was still waiting."""
        return self._box.submit(frame)

    def set_playback(self, paused: bool | None = None, frozen: bool | None = None) -> dict[str, bool]:
        return self._box.set_playback(paused, frozen)

    @property
    def latest(self) -> OutputFrame | None:
        return self._box.latest

    def stats(self) -> dict[str, Any]:
        return self._box.stats()

    # ---- worker thread ----------------------------------------------------------------------------------------
    def _take(self) -> tuple[InputFrame | None, bool]:
        """Wait for work: (frame, frozen), both decided under the lock; a None frame means stop."""
        with self._cond:
            while not self._stopping and not self._box.ready():
                self._cond.wait()
            if self._stopping:
                return None, False
            return self._box.take(time.monotonic())

    def _run(self) -> None:
        log.debug("inference worker started")
        while True:
            frame, frozen = self._take()
            if frame is None:
                break
            t0 = time.monotonic()
            try:
                out = self._engine(frame.image)  # [H, W, 3] uint8
                payload = encode_payload(out, self._format, self._quality)
            except Exception as exc:  # keep serving: one bad frame must not end the worker
                log.exception("the engine failed on frame %d", frame.frame_id)
                with self._cond:
                    self._box.fail(exc)
                if self._stop_event.wait(0.05):  # no busy loop on a frozen frame that always fails
                    break
                continue
            remaining = self._min_frame_s - (time.monotonic() - t0)
            if remaining > 0 and self._stop_event.wait(remaining):
                break
            process_ms = (time.monotonic() - t0) * 1000.0
            h, w = out.shape[:2]
            message = pack_header(self._format, frame.frame_id, 0.0 if frozen else frame.timestamp_ms, w, h,
                                  len(payload), int(process_ms * 1000)) + payload
            with self._cond:
                seq = self._box.finish(process_ms)
            result = OutputFrame(seq, out, message, frame.frame_id, 0.0 if frozen else frame.timestamp_ms,
                                 process_ms, frozen)
            self._box.latest = result
            try:
                self._publish(result)
            except RuntimeError:  # the event loop closed under us: the server is shutting down
                break
        log.debug("inference worker stopped")
