"""The one small interface every backend implements: three network calls.

The frame step (``rtdiffusion/frame_step.py``) only ever calls these three methods. A backend is free in
how it runs them (plain torch modules, torch.compile, TensorRT engines, weights streamed from host memory),
but each call must:

- enqueue work on the current CUDA stream and return without a host sync;
- return a tensor the caller may read until the next call of the same method (a backend with
  preallocated outputs returns the same tensor every time);
- not allocate per call where the backend can avoid it (TensorRT binds its buffers once).

Shapes, with B the UNet batch, F frames per call, h = H / vae_scale, w = W / vae_scale:

    encode(image  [F, 3, H, W] in [-1, 1])              -> latent [F, 4, h, w]   (unscaled VAE latent)
    unet(sample   [B, 4, h, w], timestep [B] (float),
         embeds   [B, T, D])                            -> eps    [B, 4, h, w]
    decode(latent [F, 4, h, w])                         -> image  [F, 3, H, W] in about [-1, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Networks(Protocol):
    name: str

    def encode(self, image: torch.Tensor) -> torch.Tensor: ...

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict: ...  # for status(): what runs the networks (JSON-able)


@dataclass
class TorchNetworks:
    """Plain torch modules (diffusers UNet2DConditionModel and AutoencoderTiny / AutoencoderKL).

    The eager backend, and the oracle every other backend is compared with.
    """

    unet_module: torch.nn.Module
    vae_module: torch.nn.Module
    name: str = "eager"

    def __post_init__(self) -> None:
        # AutoencoderTiny returns `.latents`; AutoencoderKL returns a distribution (we take its mode, as
        # StreamDiffusion's deterministic path does).
        self._tiny = hasattr(self.vae_module, "encoder") and not hasattr(self.vae_module, "quant_conv")
        # the callables the three calls go through; CompiledNetworks swaps in compiled ones
        self._unet_fn = self.unet_module  # through __call__: module hooks (weight streaming) must run
        self._encode_fn = self.vae_module.encode
        self._decode_fn = self.vae_module.decode

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        out = self._encode_fn(image, return_dict=False)[0]
        return out if self._tiny else out.mode()

    @torch.no_grad()
    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self._unet_fn(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._decode_fn(latent, return_dict=False)[0]

    def describe(self) -> dict:
        return {"runs": "torch modules"}
