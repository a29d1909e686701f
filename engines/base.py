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
         embeds   [B, T, D], *added)                    -> eps    [B, 4, h, w]
    decode(latent [F, 4, h, w])                         -> image  [F, 3, H, W] in about [-1, 1]

``added`` is the UNet's extra conditioning, in the order :func:`unet_added_inputs` gives (empty for SD 1.5 /
2.1; SDXL's ``text_embeds [B, P]`` pooled prompt embedding and ``time_ids [B, 6]`` size conditioning). The
same function names the exported networks' extra bindings (``engines/specs.py``), so every backend agrees.

The VAE may run in another dtype than the UNet (SDXL's KL VAE overflows in fp16 and is kept in fp32):
``encode`` and ``decode`` then cast their input to the VAE's dtype and their output back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch


def unet_added_inputs(unet_config: Mapping[str, Any]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The UNet's inputs beyond (sample, timestep, embeds): ``(name, dims after the batch dim)`` in call order.

    Read from a diffusers ``UNet2DConditionModel`` config. ``addition_embed_type`` "text_time" (SDXL) adds
    the pooled text embedding and the six size/crop ids; the names are diffusers' ``added_cond_kwargs`` keys.
    """
    kind = unet_config.get("addition_embed_type")
    if kind is None:
        return ()
    if kind == "text_time":
        time_dim = int(unet_config["addition_time_embed_dim"])
        pooled = int(unet_config["projection_class_embeddings_input_dim"]) - 6 * time_dim
        return (("text_embeds", (pooled,)), ("time_ids", (6,)))
    raise ValueError(f"UNet addition_embed_type {kind!r} is not supported; supported: none (SD 1.5 / 2.1) and "
                     "'text_time' (SDXL)")


class Networks(Protocol):
    name: str

    def encode(self, image: torch.Tensor) -> torch.Tensor: ...

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
             *added: torch.Tensor) -> torch.Tensor: ...

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
        self._added_names = tuple(n for n, _ in unet_added_inputs(getattr(self.unet_module, "config", None) or {}))
        first = next(iter(self.vae_module.parameters()), None)
        self._vae_dtype = first.dtype if first is not None else None  # None: no cast (a VAE without weights)
        # the callables the three calls go through; CompiledNetworks swaps in compiled ones
        self._unet_fn = self.unet_module  # through __call__: module hooks (weight streaming) must run
        self._encode_fn = self.vae_module.encode
        self._decode_fn = self.vae_module.decode

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        out = self._encode_fn(image.to(self._vae_dtype or image.dtype), return_dict=False)[0]  # no-op unless upcast
        return (out if self._tiny else out.mode()).to(image.dtype)

    @torch.no_grad()
    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
             *added: torch.Tensor) -> torch.Tensor:
        kw = {"added_cond_kwargs": dict(zip(self._added_names, added))} if self._added_names else {}
        return self._unet_fn(sample, timestep, encoder_hidden_states=embeds, return_dict=False, **kw)[0]

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._decode_fn(latent.to(self._vae_dtype or latent.dtype), return_dict=False)[0].to(latent.dtype)

    def describe(self) -> dict:
        return {"runs": "torch modules"}
