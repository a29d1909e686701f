"""Low-VRAM mode in the engine: plan and install UNet weight streaming for ``max_vram_gb``.

The mechanism (segment planner, pinned host buffers, double-buffered prefetch) is
``engines/weight_streaming.py``. Here the engine's budget is split: text encoder and VAE stay resident
(prompt changes must not stutter), an activation reserve is kept for the frame's work, and the UNet gets
the rest. The reserve is an estimate: 0.5 GiB for the CUDA context plus 1 GiB per UNet row at 512x512,
scaled by area.
"""

from __future__ import annotations

import logging
from typing import Any


from engines.weight_streaming import StreamingPlanError, StreamMode, WeightStreamer, plan_streaming

from .config import EngineConfig
from .errors import ConfigError
from .models.loading import Components

log = logging.getLogger(__name__)
GiB = 2**30


def reserve_bytes(comps: Components, config: EngineConfig, unet_rows: int = 2) -> int:
    resident = sum(p.numel() * p.element_size() for m in (comps.text, comps.vae) for p in m.parameters())
    area = config.width * config.height / (512 * 512)
    return int(resident + 0.5 * GiB + 1.0 * GiB * unet_rows * area)


def setup(comps: Components, config: EngineConfig) -> tuple[WeightStreamer | None, dict[str, Any]]:
    """Install streaming if the UNet does not fit; otherwise move it to the device. Returns (streamer, plan)."""
    budget = int(config.max_vram_gb * GiB)
    try:
        plan = plan_streaming(comps.unet, budget_bytes=budget, reserve_bytes=reserve_bytes(comps, config),
                              dtype=config.dtype)
    except StreamingPlanError as exc:
        raise ConfigError(f"max_vram_gb={config.max_vram_gb}: {exc}") from exc
    streamer = WeightStreamer.install(comps.unet, plan, config.device, mode=StreamMode.PREFETCH)
    if streamer is None:
        comps.unet.to(config.device, config.dtype)
        log.info("low-VRAM mode: the UNet fits in %.1f GiB; nothing streams", config.max_vram_gb)
        return None, plan.describe()
    info = streamer.describe()
    log.info("low-VRAM mode: %s", info)
    return streamer, info


def join(streamer: WeightStreamer | None) -> None:
    if streamer is not None:
        streamer.join()
