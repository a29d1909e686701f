"""Adapters: each exported network as a module whose forward takes its spec's inputs in order and returns its
spec's outputs in order (``export_adapter``), for the ONNX export and for the parity check against torch.

    unet         UNetAdapter        (sample, timestep, embeds, *added, *residuals[, ip_scale]) -> eps
    vae_encoder  VaeEncoderAdapter  (image) -> latent
    vae_decoder  VaeDecoderAdapter  (latent) -> image
    controlnet   ControlNetAdapter  (sample, timestep, embeds, controlnet_cond, *added) -> (*down_res, mid_res)
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .base import unet_added_inputs, unet_control_inputs
from .specs import NetworkSpec


# ---- adapters: spec-ordered forward() ----------------------------------------------------------------

class UNetAdapter(torch.nn.Module):
    """forward(sample, timestep, embeds, *added, *residuals[, ip_scale]) -> eps, for a diffusers
    UNet2DConditionModel; ``added`` is its added conditioning in ``engines.base.unet_added_inputs`` order (SDXL:
    text_embeds, time_ids), ``residuals`` the ControlNet sums (down_res_0.., mid_res; ``residuals`` of them),
    ``ip_scale`` [1] the IP-Adapter scale (``ip``: see ``IpScaleFromInput``)."""

    def __init__(self, unet: torch.nn.Module, residuals: int = 0, ip: bool = False) -> None:
        super().__init__()
        self.unet = unet
        self.added_names = [n for n, _ in unet_added_inputs(unet.config)]
        self.residuals = residuals
        self.ip = IpScaleFromInput(unet) if ip else None

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        na, nr = len(self.added_names), self.residuals
        kw: dict[str, Any] = {"added_cond_kwargs": dict(zip(self.added_names, rest[:na]))} if na else {}
        if nr:
            kw["down_block_additional_residuals"] = tuple(rest[na:na + nr - 1])  # [B, C_i, h_i, w_i] each
            kw["mid_block_additional_residual"] = rest[na + nr - 1]
        if self.ip is None:
            return self.unet(sample, timestep, encoder_hidden_states=embeds, return_dict=False, **kw)[0]
        with self.ip.scale_from(rest[na + nr]):
            return self.unet(sample, timestep, encoder_hidden_states=embeds, return_dict=False, **kw)[0]


class IpScaleFromInput:
    """The IP-Adapter scale as a network input: during an export (or parity) forward, every IP-Adapter
    attention processor of ``unet`` reads the ``ip_scale`` input instead of its live device buffer.

    The torch path multiplies by a device buffer written between frames (``rtdiffusion.control.ip_attention``:
    processors with ``to_k_ip`` share one ``IPScale``, whose ``bound(t)`` makes them read ``t``); an ONNX
    graph cannot read a torch buffer that changes, so the exported UNet takes ``ip_scale [1] float32`` and
    the processors read it, cast to the UNet's dtype (one Cast node: the graph stays in the UNet's dtype).
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        scales = [p.scale for p in unet.attn_processors.values() if hasattr(p, "to_k_ip")]
        self.scales = list({id(s): s for s in scales if hasattr(s, "bound")}.values())  # shared: usually one
        self.dtype = next(unet.parameters()).dtype
        if not self.scales:
            raise ValueError("the UNet spec has an ip_scale input but the UNet has no IP-Adapter attention "
                             "processors (with `to_k_ip` and a `scale` that can be bound): install the IP-Adapter")

    @contextlib.contextmanager
    def scale_from(self, ip_scale: torch.Tensor):  # ip_scale [1] fp32
        with contextlib.ExitStack() as stack:
            for s in self.scales:
                stack.enter_context(s.bound(ip_scale.to(self.dtype)))
            yield


class ControlNetAdapter(torch.nn.Module):
    """forward(sample, timestep, embeds, controlnet_cond, *added) -> (down_res_0, ..., mid_res), unscaled."""

    def __init__(self, controlnet: torch.nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.added_names = [n for n, _ in unet_added_inputs(controlnet.config)]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, cond: torch.Tensor,
                *added: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kw = {"added_cond_kwargs": dict(zip(self.added_names, added))} if self.added_names else {}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=embeds, controlnet_cond=cond,
                                    return_dict=False, **kw)
        return (*down, mid)


class VaeEncoderAdapter(torch.nn.Module):
    """forward(image) -> latent (TAESD latents, or the KL posterior's mode), unscaled."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.tiny = not hasattr(vae, "quant_conv")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(image, return_dict=False)[0]
        return out if self.tiny else out.mode()


class VaeDecoderAdapter(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


_STANDARD = {"unet": ["sample", "timestep", "embeds"], "vae_encoder": ["image"], "vae_decoder": ["latent"],
             "controlnet": ["sample", "timestep", "embeds", "controlnet_cond"]}
_ADAPTERS = {"unet": UNetAdapter, "vae_encoder": VaeEncoderAdapter, "vae_decoder": VaeDecoderAdapter,
             "controlnet": ControlNetAdapter}


def export_adapter(spec: NetworkSpec, module: torch.nn.Module) -> torch.nn.Module:
    """A module whose forward takes ``spec.inputs`` in order and returns ``spec.outputs`` in order.

    The standard bindings wrap the diffusers module (UNet, or the VAE for the encoder / decoder); a UNet's
    standard bindings include its added conditioning (SDXL's text_embeds and time_ids), then, when the spec
    has them, the ControlNet residuals (their layout read from the UNet's config, so a UNet of another layout
    is refused) and ``ip_scale``. A ControlNet spec wraps a diffusers ControlNetModel. A spec
    with extra bindings (the KV cache) needs ``module`` to be spec-ordered already; mark such a module with
    ``spec_ordered = True`` (any module with that attribute is used as it is).
    """
    if getattr(module, "spec_ordered", False):
        return module
    standard, outputs, kw = _STANDARD.get(spec.name, []), 1, {}
    if spec.name in ("unet", "controlnet") and hasattr(module, "config"):
        standard = standard + [n for n, _ in unet_added_inputs(module.config)]
        residuals = [n for n, _ in unet_control_inputs(module.config, *spec.binding("sample").dims[2:])]
        if spec.name == "controlnet":
            outputs = residuals
        elif residuals[0] in spec.input_names:
            standard, kw["residuals"] = standard + residuals, len(residuals)
        if spec.name == "unet" and "ip_scale" in spec.input_names:
            standard, kw["ip"] = standard + ["ip_scale"], True
    outs_ok = spec.output_names == outputs if isinstance(outputs, list) else len(spec.outputs) == outputs
    if spec.name not in _ADAPTERS or spec.input_names != standard or not outs_ok:
        raise ValueError(f"spec {spec.name!r} has bindings {spec.input_names} -> {spec.output_names}; "
                         "pass a module with `spec_ordered = True` whose forward takes those inputs in order "
                         "and returns those outputs in order")
    return _ADAPTERS[spec.name](module, **kw)
