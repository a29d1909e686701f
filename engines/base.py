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
         embeds   [B, T, D], *added, *residuals)        -> eps    [B, 4, h, w]
    decode(latent [F, 4, h, w])                         -> image  [F, 3, H, W] in about [-1, 1]
    controlnet(index, sample, timestep, embeds,
               cond [B, 3, H, W] in [0, 1], *added)     -> (down_0 .. down_{n-1}, mid)   (engines with ControlNets)

``added`` is the UNet's extra conditioning, in the order :func:`unet_added_inputs` gives (empty for SD 1.5 /
2.1; SDXL's ``text_embeds [B, P]`` pooled prompt embedding and ``time_ids [B, 6]`` size conditioning). The
same function names the exported networks' extra bindings (``engines/specs.py``), so every backend agrees.

``residuals`` come only in engines with ControlNets: the summed, already scaled ControlNet residuals in
diffusers' order (``down_block_additional_residuals`` then ``mid_block_additional_residual``), named and
shaped by :func:`unet_control_inputs`. ``controlnet(index, ...)`` runs the engine's ``index``-th ControlNet
(handed to the backend once with ``attach_controlnets``) at conditioning scale 1; the frame step scales and
sums (``rtdiffusion/control/stack.py``).

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


def unet_control_inputs(unet_config: Mapping[str, Any], height: int, width: int
                        ) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The UNet's ControlNet residual inputs ``(name, (C, h, w))`` in call order, at LATENT size height x width.

    Read from a diffusers UNet (or ControlNet) config: diffusers' down path, whose outputs a ControlNet adds to::

        conv_in                                     -> [C_0, h, w]                       down_res_0
        down block i: layers_per_block resnets      -> [C_i, h_i, w_i] each
                      + a downsampler (not the last) -> [C_i, ceil(h_i / 2), ceil(w_i / 2)]
        mid block                                   -> [C_last, h_last, w_last]          mid_res

    SD 1.5 / 2.1: 12 down residuals, SDXL: 9 (then ``mid_res``)."""
    blocks = [int(c) for c in unet_config["block_out_channels"]]
    per = unet_config.get("layers_per_block", 2)
    per = [int(per)] * len(blocks) if isinstance(per, int) else [int(n) for n in per]
    h, w = int(height), int(width)
    shapes = [(blocks[0], h, w)]  # conv_in
    for i, (c, n) in enumerate(zip(blocks, per)):
        shapes += [(c, h, w)] * n
        if i < len(blocks) - 1:  # a stride-2 3x3 conv with padding 1: rounds up
            h, w = -(-h // 2), -(-w // 2)
            shapes.append((c, h, w))
    return tuple((f"down_res_{i}", s) for i, s in enumerate(shapes)) + (("mid_res", (blocks[-1], h, w)),)


class Networks(Protocol):
    name: str

    def encode(self, image: torch.Tensor) -> torch.Tensor: ...

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
             *added: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict: ...  # for status(): what runs the networks (JSON-able)

    # engines with ControlNets only (a backend without them refuses ControlNets, rtdiffusion/control/stack.py):
    # attach_controlnets(modules) once at construction; controlnet(index, sample, timestep, embeds, cond, *added)


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
        self._controlnet_fns: list = []  # attach_controlnets: one callable per ControlNet module

    def attach_controlnets(self, modules) -> None:
        """The engine's ControlNets (diffusers ControlNetModel), in index order; called once, between frames."""
        self._controlnet_fns = [self._prepare_controlnet(m) for m in modules]

    def _prepare_controlnet(self, module: torch.nn.Module):
        return module  # through __call__, as the UNet; CompiledNetworks compiles forward

    @torch.no_grad()
    def controlnet(self, index: int, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                   cond: torch.Tensor, *added: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The ``index``-th ControlNet at scale 1: (down_0 .. down_{n-1}, mid), each [B, C_i, h_i, w_i]."""
        kw = {"added_cond_kwargs": dict(zip(self._added_names, added))} if self._added_names else {}
        down, mid = self._controlnet_fns[index](sample, timestep, encoder_hidden_states=embeds,
                                                controlnet_cond=cond, return_dict=False, **kw)
        return (*down, mid)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        out = self._encode_fn(image.to(self._vae_dtype or image.dtype), return_dict=False)[0]  # no-op unless upcast
        return (out if self._tiny else out.mode()).to(image.dtype)

    @torch.no_grad()
    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
             *extra: torch.Tensor) -> torch.Tensor:
        n = len(self._added_names)
        added, residuals = extra[:n], extra[n:]  # residuals: () or (down_0 .. down_{n-1}, mid)
        kw = {"added_cond_kwargs": dict(zip(self._added_names, added))} if self._added_names else {}
        if residuals:
            kw.update(down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1])
        return self._unet_fn(sample, timestep, encoder_hidden_states=embeds, return_dict=False, **kw)[0]

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self._decode_fn(latent.to(self._vae_dtype or latent.dtype), return_dict=False)[0].to(latent.dtype)

    def describe(self) -> dict:
        return {"runs": "torch modules"}
