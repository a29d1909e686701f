"""torch.compile'd networks (Inductor, default mode), replayed inside the whole-frame CUDA graph.

Compilation happens on the first calls (the graph executor's warm-up), so the first frame of a new layout
takes as long as Inductor needs (about a minute for an SD UNet on an H200); shapes are static per layout.
Inductor's own on-disk caches (FX graph and autotune caches) live under ``<engine cache root>/inductor``
unless ``TORCHINDUCTOR_CACHE_DIR`` is set, so ``rtdiffusion build --backend compiled`` warms them and a
restart with the same model and shapes skips most of the compile.
"""

from __future__ import annotations

import os

import torch

from .cache import default_root

from .base import TorchNetworks


# Inductor settings by name. "default" is torch.compile's default mode; "fast" adds what pays for inference
# of a conv/attention UNet with frozen weights: weights folded as constants (lets Inductor pick conv layouts),
# 1x1 convolutions as matrix products, fused q/k/v projections; "max" adds coordinate-descent tuning of the
# generated kernels (longer compile).
PRESETS: dict[str, dict] = {
    "default": {},
    "fast": {"freezing": True, "conv_1x1_as_mm": True},
    "max": {"freezing": True, "conv_1x1_as_mm": True, "coordinate_descent_tuning": True},
}


class CompiledNetworks(TorchNetworks):
    def __init__(self, unet_module: torch.nn.Module, vae_module: torch.nn.Module, preset: str = "default"):
        super().__init__(unet_module, vae_module, name="compiled")
        if preset not in PRESETS:
            raise ValueError(f"compile preset must be one of {', '.join(PRESETS)}; got {preset!r}")
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_root() / "inductor"))
        self.preset = preset
        if preset != "default" and hasattr(unet_module, "fuse_qkv_projections"):
            unet_module.fuse_qkv_projections()  # one q/k/v matrix product per attention instead of three
        kw = dict(fullgraph=False, dynamic=False, options=PRESETS[preset] or None)
        # forward itself, as measured in BENCHMARKS.md: hooks on the UNet module are not run here (weight
        # streaming, which uses them, goes with the eager and graph backends)
        self._unet_fn = torch.compile(unet_module.forward, **kw)
        self._encode_fn = torch.compile(vae_module.encode, **kw)
        self._decode_fn = torch.compile(vae_module.decode, **kw)
