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

from .config import PromptSpec, SeedSpec, StreamSettings, apply_updates
from .errors import ConfigError

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
    if "prompt" in kw or "negative_prompt" in kw or "prompt_method" in kw:
        neg = kw.pop("negative_prompt", base.prompt.negative)
        method = kw.pop("prompt_method", base.prompt.method)
        prompt = kw.pop("prompt", [list(p) for p in base.prompt.parts])
        base = dataclasses.replace(base, prompt=PromptSpec.parse(prompt, method, neg))
    if "seed" in kw:
        base = dataclasses.replace(base, seed=SeedSpec.parse(kw.pop("seed")))
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
        return self._group.gather(self.index, frame, timeout)

    def status(self) -> dict[str, Any]:
        return self._group.stream_status(self.index)
