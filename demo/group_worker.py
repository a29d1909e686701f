"""The inference worker of the multi-stream web app (``rtdiffusion demo --streams N``): one thread, a mailbox each.

Each stream (a performer's control page) has its own one-slot "latest frame" mailbox, playback state and
counters (a :class:`Lane`). The worker thread runs ticks of the one ``MultiStreamEngine``: every stream that
has a new frame (or a frozen one) puts it in the tick; a stream without one passes ``None`` and is held, so a
slow or absent performer never stalls the others. Cross-thread protocol (``_cond`` guards every lane)::

    event loop (hub)                       worker thread (_run)                         request threads
    ----------------                       --------------------                         ---------------
    lane(i).submit(frame) --lock--> [ slot i ]   wait until any lane is ready            lane(i).set_playback()
      slot full? replace it,                     take every ready lane's frame             --lock--> flags, notify
      dropped += 1                               (slot, or the held one when frozen;     group.stream(i).update*()
                                                  None for the rest)                       directly: applied at the
                                                 group.step_all(frames) (no lock held)     next tick boundary
                                                 encode each output once (JPEG/RGB)
                                                 publish(GroupOutput(stream=i, ...)) per stream

A stream whose frame failed (its error from ``step_all(return_exceptions=True)``) counts an error on its own
lane only; the others publish their outputs from the same tick.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .protocol import Format, encode_payload, pack_header
from .worker import InputFrame, OutputFrame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupOutput(OutputFrame):
    stream: int = 0  # the stream this output belongs to


class Lane:
    """Stream ``index``'s mailbox, playback state and counters; every field is guarded by the worker's ``_cond``."""

    def __init__(self, worker: "GroupWorker", index: int) -> None:
        self._w, self.index = worker, index
        self.slot: InputFrame | None = None
        self.held: InputFrame | None = None  # the last frame taken (re-run while frozen)
        self.paused = self.frozen = False
        self.received = self.dropped = self.ignored = self.processed = self.errors = 0
        self.last_error = ""
        self.last_process_ms = 0.0
        self.busy_since: float | None = None
        self.out_times: collections.deque[float] = collections.deque(maxlen=30)
        self.latest: OutputFrame | None = None  # replaced by one reference assignment; read without the lock

    # ---- any thread -----------------------------------------------------------------------------------------
    def submit(self, frame: InputFrame) -> bool:
        """Put ``frame`` in this stream's mailbox. Returns True when it replaced a frame still waiting."""
        with self._w._cond:
            self.received += 1
            if self.frozen and self.held is not None:
                self.ignored += 1
                return False
            replaced = self.slot is not None
            self.dropped += replaced
            self.slot = frame
            self._w._cond.notify_all()
            return replaced

    def set_playback(self, paused: bool | None = None, frozen: bool | None = None) -> dict[str, bool]:
        with self._w._cond:
            if paused is not None:
                self.paused = bool(paused)
            if frozen is not None:
                self.frozen = bool(frozen)
                if not self.frozen:
                    self.slot = None  # the next live frame starts afresh
            self._w._cond.notify_all()
            return {"paused": self.paused, "frozen": self.frozen}

    def stats(self) -> dict[str, Any]:
        """The same keys as InferenceWorker.stats(), for this stream."""
        with self._w._cond:
            times = list(self.out_times)
            stats = {
                "frames_in": self.received, "dropped_in": self.dropped, "ignored_frozen": self.ignored,
                "frames_out": self.processed, "errors": self.errors, "last_error": self.last_error,
                "process_ms": round(self.last_process_ms, 2), "paused": self.paused, "frozen": self.frozen,
                "min_frame_ms": self._w._min_frame_s * 1000.0,
                "busy_ms": 0 if self.busy_since is None else round((time.monotonic() - self.busy_since) * 1e3),
            }
        fps = 0.0
        if len(times) >= 2 and time.monotonic() - times[-1] < 2.0:
            fps = (len(times) - 1) / max(times[-1] - times[0], 1e-6)
        stats["fps"] = round(fps, 2)
        return stats

    # ---- worker thread, under _cond ----------------------------------------------------------------------------
    def ready(self) -> bool:
        return not self.paused and (self.slot is not None or (self.frozen and self.held is not None))

    def take(self, now: float) -> tuple[InputFrame, bool] | None:
        """(frame, frozen) for this tick, or None (no new frame: the stream is held this tick)."""
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


class GroupWorker:
    """Runs ticks of ``group.step_all`` on its own thread; publishes each stream's output through ``publish``.

    Built by the server exactly as an InferenceWorker (same arguments); ``lane(i)`` is stream i's mailbox.
    ``submit`` / ``set_playback`` / ``latest`` / ``stats`` without a stream act on the stream of the request
    (``current_stream``, set by the server per request and per websocket)."""

    def __init__(self, group: Any, publish: Callable[[GroupOutput], None], *, min_frame_ms: float = 0.0,
                 output_format: Format = Format.JPEG, jpeg_quality: int = 90,
                 current_stream: Callable[[], int] = lambda: 0) -> None:
        if not (isinstance(min_frame_ms, (int, float)) and 0 <= min_frame_ms <= 60_000):
            raise ValueError(f"min_frame_ms must be a number of ms from 0 to 60000; got {min_frame_ms!r}")
        if output_format not in (Format.JPEG, Format.RGB):
            raise ValueError(f"output_format must be Format.JPEG or Format.RGB; got {output_format!r}")
        if not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
            raise ValueError(f"jpeg_quality must be an integer from 1 to 100; got {jpeg_quality!r}")
        self._group, self._publish, self._current = group, publish, current_stream
        self._min_frame_s = min_frame_ms / 1000.0
        self._format, self._quality = output_format, jpeg_quality
        self._cond = threading.Condition()
        self.lanes = [Lane(self, i) for i in range(len(group))]
        self._stopping = False
        self._stop_event = threading.Event()
        self.ticks = 0
        self._thread = threading.Thread(target=self._run, name="rtdiffusion-demo-group-worker", daemon=True)

    # ---- any thread -------------------------------------------------------------------------------------------
    def lane(self, index: int) -> Lane:
        return self.lanes[index]

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
                log.warning("the group worker did not stop within %.1f s (a tick is still running)", timeout)

    def submit(self, frame: InputFrame) -> bool:
        return self.lanes[self._current()].submit(frame)

    def set_playback(self, paused: bool | None = None, frozen: bool | None = None) -> dict[str, bool]:
        return self.lanes[self._current()].set_playback(paused, frozen)

    @property
    def latest(self) -> OutputFrame | None:
        return self.lanes[self._current()].latest

    def stats(self) -> dict[str, Any]:
        return self.lanes[self._current()].stats()

    # ---- worker thread ----------------------------------------------------------------------------------------
    def _take(self) -> list[tuple[InputFrame, bool] | None] | None:
        """Wait until any stream has work; one (frame, frozen) or None per stream, or None to stop."""
        with self._cond:
            while not self._stopping and not any(lane.ready() for lane in self.lanes):
                self._cond.wait()
            if self._stopping:
                return None
            now = time.monotonic()
            return [lane.take(now) for lane in self.lanes]

    def _run(self) -> None:
        log.debug("group worker started: %d streams", len(self.lanes))
        while True:
            picks = self._take()
            if picks is None:
                break
            t0 = time.monotonic()
            try:  # a bad frame only fails its own stream; an exception here is a failure of the whole tick
                outs = self._group.step_all([None if p is None else p[0].image for p in picks], return_exceptions=True)
            except Exception as exc:
                log.exception("the group tick failed")
                outs = [exc] * len(picks)
            done = []
            for lane, pick, out in zip(self.lanes, picks, outs):
                if pick is None:
                    continue
                try:
                    if isinstance(out, BaseException):
                        raise out
                    done.append((lane, pick, out, encode_payload(out, self._format, self._quality)))  # [H, W, 3]
                except Exception as exc:  # keep serving: one stream's bad frame must not end the worker
                    log.warning("stream %d: frame %d failed: %s", lane.index, pick[0].frame_id, exc)
                    with self._cond:
                        lane.fail(exc)
            if len(done) < sum(p is not None for p in picks) and self._stop_event.wait(0.05):
                break  # no busy loop on a frozen frame that always fails
            remaining = self._min_frame_s - (time.monotonic() - t0)
            if remaining > 0 and self._stop_event.wait(remaining):
                break
            process_ms = (time.monotonic() - t0) * 1000.0
            self.ticks += 1
            if not self._publish_all(done, process_ms):
                break
        log.debug("group worker stopped")

    def _publish_all(self, done: list, process_ms: float) -> bool:
        for lane, (frame, frozen), out, payload in done:
            h, w = out.shape[:2]
            ts = 0.0 if frozen else frame.timestamp_ms
            head = pack_header(self._format, frame.frame_id, ts, w, h, len(payload), int(process_ms * 1000))
            with self._cond:
                lane.processed += 1
                lane.busy_since = None
                lane.last_process_ms = process_ms
                lane.out_times.append(time.monotonic())
                seq = lane.processed
            result = GroupOutput(seq, out, head + payload, frame.frame_id, ts, process_ms, frozen, stream=lane.index)
            lane.latest = result
            try:
                self._publish(result)
            except RuntimeError:  # the event loop closed under us: the server is shutting down
                return False
        return True
