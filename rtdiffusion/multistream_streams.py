"""One stream of a multi-stream group, as its users see it: settings, status, and its own frame call.

Each :class:`Stream` keeps its settings the way a single ``StreamEngine`` does: an update is validated on
the caller's thread (a ``ConfigError`` naming what was expected changes nothing), stored as pending (the
latest value per key wins), and taken by the group at the next tick boundary. Nothing here touches the
device; the group (``multistream.py``) applies the settings and runs the ticks.

Per-stream settings: prompt (and negative_prompt, prompt_method), seed, strength / steps or t_index_list,
cfg, guidance_scale, delta. The rest of a single engine's live settings (similar-frame filter, temporal KV
cache, ControlNets, IP-Adapter) is not available in a group yet and is refused with a ConfigError.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, FrameError
from .multistream_io import check_frame
from .settings import PromptSpec, SeedSpec, StreamSettings, apply_updates, pop_prompt_and_seed

if TYPE_CHECKING:
    from .multistream import MultiStreamEngine

STREAM_KEYS = ("prompt", "negative_prompt", "prompt_method", "seed", "strength", "steps", "t_index_list", "cfg",
               "guidance_scale", "delta")


def change_settings(base: StreamSettings, num_inference_steps: int, kw: dict[str, Any]) -> StreamSettings:
    """``base`` with the per-stream updates ``kw`` applied and validated; ConfigError (and nothing changed)
    for a bad value or a setting a group stream does not have."""
    kw = dict(kw)
    unknown = sorted(set(kw) - set(STREAM_KEYS))
    if unknown:
        raise ConfigError(f"unknown per-stream setting(s) {', '.join(map(repr, unknown))} for a multi-stream group; "
                          f"expected one of {', '.join(STREAM_KEYS)} (the similar-frame filter, the temporal KV "
                          "cache, ControlNets and IP-Adapters are single-engine only for now)")
    base = pop_prompt_and_seed(base, kw)
    return apply_updates(base, num_inference_steps, **kw)


class Stream:
    """Stream ``index`` of a :class:`~rtdiffusion.multistream.MultiStreamEngine` (``group.stream(i)``).

    Control methods may be called from any thread; calling the stream with a frame queues it for the next
    tick, which runs when every stream of the group has a frame queued (see :meth:`__call__`)."""

    def __init__(self, group: "MultiStreamEngine", index: int, settings: StreamSettings):
        self._group, self.index = group, index
        self._lock = threading.Lock()  # guards _pending / _accepted
        self._accepted = settings  # the newest accepted settings: updates build on them
        self._pending: StreamSettings | None = settings  # accepted, not yet applied
        self._settings: StreamSettings | None = None  # applied: what this stream's rows run with
        self.frames = 0  # frames this stream has run
        self.held = 0  # ticks this stream sat out (no frame, a bad frame, or settings that failed to apply)
        self.resets = 0  # times its frames in flight were dropped because its own layout changed
        self.last_error: str | None = None

    # ------------------------------------------------------------------ control (any thread)
    def update(self, **kw: Any) -> None:
        """Change this stream's settings: strength and/or steps (or t_index_list), cfg, guidance_scale, delta,
        prompt, negative_prompt, prompt_method, seed. Validated now; applied at the next tick boundary. A change
        of steps or of the effective cfg changes the group layout (see docs/multistream.md)."""
        with self._lock:
            self._pending = self._accepted = change_settings(self._accepted, self._group.num_inference_steps, kw)

    def update_prompt(self, prompt: Any, method: Any = "linear", negative_prompt: str | None = None) -> None:
        """Set the prompt (a string or [(text, weight), ...]); an unchanged text is never re-encoded."""
        with self._lock:
            base = self._accepted
            neg = base.prompt.negative if negative_prompt is None else negative_prompt
            self._pending = self._accepted = dataclasses.replace(base, prompt=PromptSpec.parse(prompt, method, neg))

    def update_seed(self, seed: Any) -> None:
        """Set the seed (an int or [(seed, weight), ...]); this stream's noise is regenerated at the boundary."""
        with self._lock:
            self._pending = self._accepted = dataclasses.replace(self._accepted, seed=SeedSpec.parse(seed))

    @property
    def settings(self) -> StreamSettings:
        """The settings this stream's frames run with now (applied at the last tick boundary)."""
        return self._settings

    # ------------------------------------------------------------------ used by the group at a boundary
    def take_pending(self) -> StreamSettings | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return None if pending == self._settings else pending

    def reject(self, pending: StreamSettings, exc: BaseException) -> None:
        """``pending`` could not be applied: keep the applied settings and build later updates on them."""
        with self._lock:
            if self._pending is None:
                self._accepted = self._settings
        self.last_error = f"settings not applied: {type(exc).__name__}: {exc}"

    # ------------------------------------------------------------------ frames
    def __call__(self, frame: Any, timeout: float | None = None) -> Any:
        """Queue this stream's frame for the next tick and return its output once that tick has run.

        The frame is checked now (a FrameError naming what was expected, on this caller's thread, queues
        nothing). The tick runs, on the thread of whichever stream's frame completes it, once every stream
        of the group has queued one; ``timeout`` (seconds, None: no limit) bounds the wait for the others
        (TimeoutError, and this frame is withdrawn). For one thread driving every stream use
        ``group.step_all``."""
        check_frame(frame, self._group.frame_shape, self._group.device, f"stream {self.index}: ")  # raises here
        return self._group.gather.call(self.index, frame, timeout)

    def status(self) -> dict[str, Any]:
        return self._group.stream_status(self.index)


def per_stream_settings(streams: Any, common: dict[str, Any], num_inference_steps: int,
                        max_streams: int) -> list[StreamSettings]:
    """from_pretrained's ``streams`` (a count, or one dict per stream) and common keywords -> settings per stream."""
    if isinstance(streams, bool) or not isinstance(streams, (int, list, tuple)):
        raise ConfigError(f"streams must be a number of streams (1 to {max_streams}) or a list of one settings "
                          f"dict per stream; got {streams!r:.80}")
    each = [{}] * streams if isinstance(streams, int) else list(streams)
    if not 1 <= len(each) <= max_streams:
        raise ConfigError(f"streams must be from 1 to {max_streams}; got {len(each)}")
    out = []
    for i, own in enumerate(each):
        if not isinstance(own, dict):
            raise ConfigError(f"stream {i}: settings must be a dict (prompt, seed, steps, ...); got {own!r:.80}")
        try:
            out.append(change_settings(StreamSettings(), num_inference_steps, {**common, **own}))
        except ConfigError as exc:
            raise ConfigError(f"stream {i}: {exc}") from None
    return out


class TickGather:
    """Per-stream frame calls gathered into ticks: the call that completes a tick runs it, the others wait.

        stream i: queue (tick t) ... wait until results[t]       stream j (last of tick t): queue, run
                  step_all(frames of t), publish results[t], notify -> every caller takes its own entry

    A tick's number is fixed when its last frame arrives, so a frame queued while tick t runs belongs to t+1.
    """

    def __init__(self, group: "MultiStreamEngine"):
        self._group, self._cv = group, threading.Condition()
        self._queued: dict[int, Any] = {}
        self._results: dict[int, list] = {}  # tick -> [step_all's list or its exception, callers yet to read]
        self._gathering = 0  # the tick now being gathered

    def call(self, index: int, frame: Any, timeout: float | None) -> Any:
        n, cv = len(self._group), self._cv
        with cv:
            if index in self._queued:
                raise FrameError(f"stream {index} already has a frame queued for the next tick (one caller per "
                                 "stream, or use step_all)")
            tick = self._gathering
            self._queued[index] = frame
            frames = None
            if len(self._queued) == n:
                frames = [self._queued[i] for i in range(n)]
                self._queued.clear()
                self._gathering += 1
        if frames is not None:
            try:
                result: Any = self._group.step_all(frames, return_exceptions=True)
            except BaseException as exc:  # every caller of this tick sees it
                result = exc
            with cv:
                self._results[tick] = [result, n]
                cv.notify_all()
        with cv:
            if not cv.wait_for(lambda: tick in self._results, timeout):
                if self._queued.get(index) is frame and self._gathering == tick:
                    del self._queued[index]
                    raise TimeoutError(f"stream {index}: the other streams sent no frame within {timeout} s; "
                                       "this frame was withdrawn")
                cv.wait_for(lambda: tick in self._results)  # its tick started meanwhile: the result comes
            entry = self._results[tick]
            entry[1] -= 1
            if entry[1] == 0:
                del self._results[tick]
        if isinstance(entry[0], BaseException):
            raise entry[0]
        out = entry[0][index]
        if isinstance(out, BaseException):
            raise out
        return out
