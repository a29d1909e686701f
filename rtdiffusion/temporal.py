"""The temporal KV cache in the engine: when to install it, and the networks seam that runs its ring write.

The attention processors and banks live in ``engines/kv_cache.py``. Here:

- :class:`CachedAttentionNetworks` wraps a backend's networks so that every UNet call is followed by the
  cache's device-only ring write; a captured frame graph therefore holds both.
- :class:`TemporalCache` installs the cache the first time it is enabled (banks sized for the current UNet
  batch and ``EngineConfig.kv_max_frames``), re-installs when a layout needs more rows, applies settings
  and resets between frames, and calls ``after_frame`` after each processed frame. Its :meth:`key` goes into
  the graph cache key: with the ACTIVE span the attention shapes follow the number of cached frames.
"""

from __future__ import annotations

import logging

import torch

from engines import kv_cache

from .buffers import StreamLayout
from .config import CacheSettings

log = logging.getLogger(__name__)


class CachedAttentionNetworks:
    def __init__(self, nets, cache: kv_cache.TemporalKVCache):
        self.nets, self.cache, self.name = nets, cache, nets.name

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.nets.encode(image)

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
             *added: torch.Tensor) -> torch.Tensor:
        eps = self.nets.unet(sample, timestep, embeds, *added)
        self.cache.write_ring()  # device only: the fresh K/V go into the ring slot chosen between frames
        return eps

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.nets.decode(latent)

    def controlnet(self, index: int, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.nets.controlnet(index, *args)  # ControlNets: no cached attention, nothing to wrap


class TemporalCache:
    """The cache's life in the engine.

    Enabled: processors installed on the self-attention layers, banks sized for at least the current UNet
    batch (re-allocated, between frames, when a layout needs more rows), the networks wrapped so the ring
    write follows every UNet call. Disabled: the UNet's own processors are back and the networks unwrapped,
    so a disabled cache costs nothing and gives exactly the plain pipeline; the banks stay allocated, so
    enabling again needs no allocation (only a graph capture on the first visit of that setting).
    """

    def __init__(self, unet: torch.nn.Module, max_frames: int):
        self.unet, self.max_frames = unet, max_frames
        self.cache: kv_cache.TemporalKVCache | None = None
        self.active = False
        self._reset_token = 0
        self.installs = 0

    def apply(self, settings: CacheSettings, layout: StreamLayout, switched: bool) -> bool:
        """Between frames. Returns True when the banks were re-allocated, so graphs using them are stale."""
        reallocated = False
        if settings.enabled:
            if self.cache is None or self.cache.batch_rows < layout.unet_rows:
                if self.cache is not None:
                    self.cache.uninstall()
                    reallocated = True
                self.cache = kv_cache.install(self.unet, batch_rows=layout.unet_rows,
                                              latent_hw=(layout.latent_h, layout.latent_w),
                                              max_frames=self.max_frames, dtype=layout.dtype, device=layout.device,
                                              span=kv_cache.Span.ACTIVE)
                self.installs += 1
                log.info("temporal KV cache installed: %d rows, up to %d frames, %.0f MiB", layout.unet_rows,
                         self.max_frames, self.cache.nbytes / 2**20)
            elif not self.active:
                self.cache.reinstall()
            self.cache.set_settings(True, min(settings.maxframes, self.max_frames), settings.interval)
            if switched or settings.reset_token != self._reset_token or not self.active:
                self.cache.reset()
            self.active = True
        elif self.active:
            self.cache.set_settings(False, min(settings.maxframes, self.max_frames), settings.interval)
            self.cache.uninstall()
            self.active = False
        self._reset_token = settings.reset_token
        return reallocated

    def nets_for(self, nets):
        """The networks the frame step should call: wrapped with the ring write while the cache is on."""
        return CachedAttentionNetworks(nets, self.cache) if self.active else nets

    def after_frame(self) -> None:
        if self.active:
            self.cache.after_frame()

    def key(self) -> tuple:
        """What of the cache changes the captured work: which banks, and how many slots attention reads."""
        return (self.installs, self.cache.span) if self.active else (0, 0)

    def describe(self) -> dict:
        if self.cache is None:
            return {"installed": False, "active": False, "max_frames": self.max_frames}
        return {"installed": True, "active": self.active, "max_frames": self.max_frames,
                "span": self.cache.span if self.active else 0, "rows": self.cache.batch_rows,
                "mib": round(self.cache.nbytes / 2**20, 1)}
