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

    Condition variable ``_cond`` guards: _slot, _held, _paused, _frozen, _stopping, _busy_since and the counters.
    ``_busy_since`` is set when a frame is taken and cleared when its output is published (or it failed):
    ``stats()["busy_ms"]`` is how long the current frame has taken so far, which tells a slow engine (busy)
    from a stalled pipeline (idle while the page waits).
    The worker waits on it while paused, or while the slot is empty and nothing is frozen.
    ``_latest`` (the last OutputFrame) is replaced by one reference assignment; readers take it without a lock.

Frozen: the worker keeps re-processing the last frame it took (``_held``), so prompt and seed changes still show
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


class InferenceWorker:
    """Runs ``engine(frame)`` on its own thread and publishes each result through ``publish``.

    engine: anything with ``__call__(uint8 [H, W, 3]) -> uint8 [H, W, 3]``.
    publish: called on the worker thread with each OutputFrame; it must not block (the server hands it to
      the event loop with ``call_soon_threadsafe``).
    min_frame_ms: the worker takes at least this long per frame (a slow-engine setting for latency tests and
      for capping the load on a shared machine); 0 = as fast as the engine goes.
    """

    def __init__(self, engine: Any, publish: Callable[[OutputFrame], None], *, min_frame_ms: float = 0.0,
                 output_format: Format = Format.JPEG, jpeg_quality: int = 90) -> None:
        if not (isinstance(min_frame_ms, (int, float)) and 0 <= min_frame_ms <= 60_000):
            raise ValueError(f"min_frame_ms must be a number of ms from 0 to 60000; got {min_frame_ms!r}")
        if output_format not in (Format.JPEG, Format.RGB):
            raise ValueError(f"output_format must be Format.JPEG or Format.RGB; got {output_format!r}")
        if not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
            raise ValueError(f"jpeg_quality must be an integer from 1 to 100; got {jpeg_quality!r}")
        self._engine = engine
        self._publish = publish
        self._min_frame_s = min_frame_ms / 1000.0
        self._format = output_format
        self._quality = jpeg_quality
        self._cond = threading.Condition()
        self._slot: InputFrame | None = None
        self._held: InputFrame | None = None
        self._paused = False
        self._frozen = False
        self._stopping = False
        self._stop_event = threading.Event()
        self._received = 0
        self._dropped = 0
        self._ignored = 0
        self._processed = 0
        self._errors = 0
        self._last_error = ""
        self._last_process_ms = 0.0
        self._busy_since: float | None = None  # monotonic start of the frame the worker is on; None = idle
        self._out_times: collections.deque[float] = collections.deque(maxlen=30)
        self._latest: OutputFrame | None = None
        self._thread = threading.Thread(target=self._run, name="rtdiffusion-demo-worker", daemon=True)

    # ---- any thread -------------------------------------------------------------------------------------------
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
                log.warning("the inference worker did not stop within %.1f s (an engine call is still running)",
                            timeout)

    def submit(self, frame: InputFrame) -> bool:
        """Put ``frame`` in the mailbox. Returns True when it replaced a frame that was still waiting."""
        with self._cond:
            self._received += 1
            if self._frozen and self._held is not None:
                self._ignored += 1
                return False
            replaced = self._slot is not None
            if replaced:
                self._dropped += 1
            self._slot = frame
            self._cond.notify_all()
            return replaced

    def set_playback(self, paused: bool | None = None, frozen: bool | None = None) -> dict[str, bool]:
        with self._cond:
            if paused is not None:
                self._paused = bool(paused)
            if frozen is not None:
                self._frozen = bool(frozen)
                if not self._frozen:
                    self._slot = None  # the next live frame starts afresh
            self._cond.notify_all()
            return {"paused": self._paused, "frozen": self._frozen}

    @property
    def latest(self) -> OutputFrame | None:
        return self._latest

    def stats(self) -> dict[str, Any]:
        with self._cond:
            times = list(self._out_times)
            stats = {
                "frames_in": self._received, "dropped_in": self._dropped, "ignored_frozen": self._ignored,
                "frames_out": self._processed, "errors": self._errors, "last_error": self._last_error,
                "process_ms": round(self._last_process_ms, 2), "paused": self._paused, "frozen": self._frozen,
                "min_frame_ms": self._min_frame_s * 1000.0,
                "busy_ms": 0 if self._busy_since is None else round((time.monotonic() - self._busy_since) * 1e3),
            }
        fps = 0.0
        if len(times) >= 2 and time.monotonic() - times[-1] < 2.0:
            fps = (len(times) - 1) / max(times[-1] - times[0], 1e-6)
        stats["fps"] = round(fps, 2)
        return stats

    # ---- worker thread ----------------------------------------------------------------------------------------
    def _take(self) -> tuple[InputFrame | None, bool]:
        """Wait for work: (frame, frozen), both decided under the lock; a None frame means stop."""
        with self._cond:
            while not self._stopping and (self._paused or (self._slot is None and
                                                           not (self._frozen and self._held is not None))):
                self._cond.wait()
            if self._stopping:
                return None, False
            if self._frozen and self._held is not None:
                self._busy_since = time.monotonic()
                return self._held, True
            frame, self._slot = self._slot, None
            self._held = frame
            self._busy_since = time.monotonic()
            return frame, False

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
                    self._errors += 1
                    self._last_error = f"{type(exc).__name__}: {exc}"[:500]
                    self._busy_since = None
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
                self._processed += 1
                self._busy_since = None
                seq = self._processed
                self._last_process_ms = process_ms
                self._out_times.append(time.monotonic())
            result = OutputFrame(seq, out, message, frame.frame_id, 0.0 if frozen else frame.timestamp_ms,
                                 process_ms, frozen)
            self._latest = result
            try:
                self._publish(result)
            except RuntimeError:  # the event loop closed under us: the server is shutting down
                break
        log.debug("inference worker stopped")
