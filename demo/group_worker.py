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

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from .protocol import Format, encode_payload, pack_header
from .worker import InputFrame, Mailbox, OutputFrame, WorkerThread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupOutput(OutputFrame):
    stream: int = 0  # the stream this output belongs to


Lane = Mailbox  # stream ``index``'s mailbox, playback state and counters, guarded by the worker's ``_cond``


class GroupWorker(WorkerThread):
    """Runs ticks of ``group.step_all`` on its own thread; publishes each stream's output through ``publish``.

    Built by the server exactly as an InferenceWorker (same arguments); ``lane(i)`` is stream i's mailbox.
    ``submit`` / ``set_playback`` / ``latest`` / ``stats`` without a stream act on the stream of the request
    (``current_stream``, set by the server per request and per websocket)."""

    thread_name = "rtdiffusion-demo-group-worker"
    busy_note = "the group worker did not stop within %.1f s (a tick is still running)"

    def __init__(self, group: Any, publish: Callable[[GroupOutput], None], *, min_frame_ms: float = 0.0,
                 output_format: Format = Format.JPEG, jpeg_quality: int = 90,
                 current_stream: Callable[[], int] = lambda: 0) -> None:
        super().__init__(publish, min_frame_ms, output_format, jpeg_quality)
        self._group, self._current = group, current_stream
        self.lanes = [Lane(self._cond, self._min_frame_s, i) for i in range(len(group))]
        self.ticks = 0

    # ---- any thread -------------------------------------------------------------------------------------------
    def lane(self, index: int) -> Lane:
        return self.lanes[index]

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
                seq = lane.finish(process_ms)
            result = GroupOutput(seq, out, head + payload, frame.frame_id, ts, process_ms, frozen, stream=lane.index)
            lane.latest = result
            try:
                self._publish(result)
            except RuntimeError:  # the event loop closed under us: the server is shutting down
                return False
        return True
