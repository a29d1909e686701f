"""The 'compiled' backend's networks: Inductor-compiled UNet and VAE, replayed inside the whole-frame CUDA graph.

Two ways to compile (``EngineConfig.compile_artifacts``), one set of Inductor presets:

- :class:`CompiledNetworks` (``jit``): torch.compile, default mode. Compilation happens on the first calls
  (the graph executor's warm-up), so the first frame of a new layout takes as long as Inductor needs (about
  a minute for an SD UNet on an H200). Inductor's own on-disk caches (FX graph and autotune caches) live
  under ``<engine cache root>/inductor`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set, so a restart with the
  same model and shapes skips part of the compile (measured: 88 s cold, 36 s on a restart).
- ``engines.aoti.AotiNetworks`` (``aoti``): AOTInductor packages stored in the engine cache; a restart loads
  them and compiles nothing. :func:`compiled_networks` builds either.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, ContextManager

import torch

from .base import TorchNetworks
from .cache import EngineCache, default_root

# Inductor settings by name. "default" is torch.compile's default mode; "fast" adds what pays for inference
# of a conv/attention UNet with frozen weights: weights folded as constants (lets Inductor pick conv layouts),
# 1x1 convolutions as matrix products, fused q/k/v projections; "max" adds coordinate-descent tuning of the
# generated kernels (longer compile). AOTInductor packages leave out "freezing" (it needs the weights inside).
PRESETS: dict[str, dict] = {
    "default": {},
    "fast": {"freezing": True, "conv_1x1_as_mm": True},
    "max": {"freezing": True, "conv_1x1_as_mm": True, "coordinate_descent_tuning": True},
}


def _check_preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"compile preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_root() / "inductor"))
    return PRESETS[preset]


def _prepare_unet(unet_module: torch.nn.Module, preset: str) -> None:
    if preset != "default" and hasattr(unet_module, "fuse_qkv_projections"):
        unet_module.fuse_qkv_projections()  # one q/k/v matrix product per attention instead of three


# A build-progress hook: stage(name) is a context manager around a network's compile (or package build / load);
# the caller's (rtdiffusion.progress.BuildProgress.stage). The default reports nothing.
StageHook = Callable[[str], ContextManager]


def no_stage(name: str) -> ContextManager:
    return contextlib.nullcontext()


class FirstCall:
    """Runs ``fn``; its first call (where torch.compile compiles) inside ``stage(name)``, later calls plain."""

    def __init__(self, fn: Callable, name: str, stage: StageHook) -> None:
        self.fn, self.name, self._stage = fn, name, stage

    def __call__(self, *args, **kwargs):
        if self._stage is None:
            return self.fn(*args, **kwargs)
        stage, self._stage = self._stage, None
        with stage(self.name):
            return self.fn(*args, **kwargs)


def jit_compiler(preset: str) -> Callable[[Callable], Callable]:
    options = _check_preset(preset) or None
    return lambda fn: torch.compile(fn, fullgraph=False, dynamic=False, options=options)


class CompiledNetworks(TorchNetworks):
    """torch.compile'd forward, encode and decode (``compile_artifacts='jit'``)."""

    def __init__(self, unet_module: torch.nn.Module, vae_module: torch.nn.Module, preset: str = "default",
                 stage: StageHook = no_stage):
        super().__init__(unet_module, vae_module, name="compiled")
        compile_fn = jit_compiler(preset)
        self.preset, self._compile_fn = preset, compile_fn
        _prepare_unet(unet_module, preset)
        # forward itself, as measured in BENCHMARKS.md: hooks on the UNet module are not run here (weight
        # streaming, which uses them, goes with the eager and graph backends)
        self._unet_fn = FirstCall(compile_fn(unet_module.forward), "unet", stage)
        self._encode_fn = FirstCall(compile_fn(vae_module.encode), "vae_encoder", stage)
        self._decode_fn = FirstCall(compile_fn(vae_module.decode), "vae_decoder", stage)

    def _prepare_controlnet(self, module: torch.nn.Module):
        return self._compile_fn(module.forward)  # each ControlNet compiled like the UNet (attach_controlnets)

    def describe(self) -> dict:
        return {"runs": "torch.compile (jit)", "preset": self.preset,
                "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


def compiled_networks(unet_module: torch.nn.Module, vae_module: torch.nn.Module, *, preset: str, aoti: bool,
                      cache: EngineCache, model: str, identity: dict | None = None, stage: StageHook = no_stage):
    """The networks of the 'compiled' backend: AOTInductor packages (``aoti``) or torch.compile.

    identity: ``Components.identity`` (where the weights came from): lets a restart reuse the weights'
    fingerprint instead of hashing them again (engines/fingerprints.py). stage: a build-progress hook around
    each network's first compile, build or load ("unet", "vae_encoder", "vae_decoder")."""
    if not aoti:
        return CompiledNetworks(unet_module, vae_module, preset, stage=stage)
    from .aoti import AotiNetworks

    options = _check_preset(preset)
    _prepare_unet(unet_module, preset)
    cuda = next(unet_module.parameters()).device.type == "cuda"
    # what runs a call no package can hold (the KV cache's UNet, or a failed export): torch.compile on CUDA
    jit = jit_compiler(preset) if cuda else None
    return AotiNetworks(unet_module, vae_module, cache=cache, model=model, preset=options, jit=jit,
                        identity=identity, stage=stage)
