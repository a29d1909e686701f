"""``StreamEngine.status()``: what the engine runs with and how fast, as one plain dict.

Also the frame clock the engine ticks once per frame (the median interval gives fps). Reads only; called
from any thread, it changes nothing.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

from .executors import OVERLAP_LATENCY
from .graph_cache import key_str
from .vocabulary import strength_of

if TYPE_CHECKING:
    from .engine import StreamEngine


class FrameClock:
    """Intervals between the last 240 frames."""

    def __init__(self, keep: int = 240):
        self._times: deque[float] = deque(maxlen=keep)
        self._last: float | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._times.append(now - self._last)
        self._last = now

    def median(self) -> float | None:
        """Median seconds between frames, None before the second frame."""
        times = sorted(self._times)
        return times[len(times) // 2] if times else None


def engine_status(e: "StreamEngine") -> dict[str, Any]:
    s, c = e._settings, e.config
    med = e._clock.median()
    return {
        "model": c.model, "device": str(e.device), "dtype": str(c.dtype).replace("torch.", ""),
        "width": e.width, "height": e.height, "frame_buffer_size": c.frame_buffer_size,
        "backend": e.backend, "backend_reason": e.backend_reason, "backend_fallback": e.backend_fallback,
        "scheduler": e.scheduler_kind.value, "vae": c.vae.value,
        "frames": e._frames, "skipped_frames": e._filter.skipped, "prompt_encodes": e._prompts.encodes,
        "fps": (1.0 / med) if med else 0.0, "frame_ms_median": med * 1e3 if med else None,
        "latency_frames": ((len(s.t_index_list) - 1) * c.frame_buffer_size
                           + OVERLAP_LATENCY * c.vae_overlap),
        "vae_overlap": c.vae_overlap,
        "strength": strength_of(s.t_index_list, c.num_inference_steps), "steps": len(s.t_index_list),
        "t_index_list": list(s.t_index_list), "cfg": s.cfg.value, "effective_cfg": s.effective_cfg.value,
        "guidance_scale": s.guidance_scale, "delta": s.delta,
        "prompt": [list(p) for p in s.prompt.parts], "prompt_method": s.prompt.method.value,
        "negative_prompt": s.prompt.negative, "seed": [list(p) for p in s.seed.parts],
        "similar_filter": dataclasses.asdict(s.filter), "cache": dataclasses.asdict(s.cache),
        "graph_cache": {"size": len(e._graphs), "capacity": e._graphs.capacity,
                        "keys": [key_str(k) for k in e._graphs.keys()],
                        "captures": getattr(e._executor, "captures_done", 0)},
        "temporal_cache": e._temporal.describe(), "text_encoder_graphed": e._prompts.graphed,
        "low_vram": e.low_vram, "networks": e._base_nets.describe(),
        "threads": torch.get_num_threads() if e.device.type == "cpu" else None,
        "ip_adapter": e._ip.describe(s.ip_adapter) if e._ip is not None else None,
        "controlnets": e._control.describe(s.controlnets),
    }
