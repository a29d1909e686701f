"""IP-Adapter in an engine: the ``ip_adapter=`` spec, family checks, and the adapter's life between frames.

The weights (published h94/IP-Adapter files, ``random:ip-adapter-*`` stand-ins, the CLIP image encoder) are
``ip_weights.py``; the attention processor ``ip_attention.py``; style images and their tokens ``style.py``.
None was published for SD 2.x (sd-turbo): such an engine refuses an IP-Adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..config import IPAdapterSettings
from ..errors import ConfigError
from ..models.families import RANDOM_ARCHS, SD21, FamilyName, ModelFamily
from . import ip_attention
from .ip_weights import (H94_ENCODERS, RANDOM_IP_ADAPTERS, ProjKind, check_encoder, check_fits, feature_width,
                         image_projection, pretrained_vision, projection_kind, random_state_dict, random_vision,
                         read_file, resolve_file)
from .style import StyleEncoder

log = logging.getLogger(__name__)

RANDOM = "random:"


@dataclass(frozen=True)
class IPAdapterSpec:
    """``from_pretrained(ip_adapter=...)``: a model (random: name or file) and its starting settings."""

    model: str
    image_encoder: str | None = None  # folder or hub id of a CLIPVisionModelWithProjection
    scale: float = 0.6
    enabled: bool = True

    @staticmethod
    def parse(value: Any) -> "IPAdapterSpec":
        if isinstance(value, IPAdapterSpec):
            return value
        if isinstance(value, str):
            value = {"model": value}
        if isinstance(value, (list, tuple)):
            raise ConfigError("ip_adapter takes one IP-Adapter (a model string or a dict), not a list: several at once "
                              "are not supported; blend several style images with set_style_image([(image, weight), "
                              f"...]) instead. Got {value!r}")
        if not isinstance(value, dict) or not isinstance(value.get("model"), str) or not value["model"]:
            raise ConfigError("ip_adapter must be a model string or a dict {'model': 'random:ip-adapter-sd15' | a "
                              ".bin / .safetensors file, 'image_encoder': ..., 'scale': 0.6, 'enabled': True}; "
                              f"got {value!r}")
        unknown = set(value) - {"model", "image_encoder", "scale", "enabled"}
        if unknown:
            raise ConfigError(f"unknown ip_adapter key(s) {sorted(unknown)}; expected model, image_encoder, scale, "
                              "enabled")
        enc = value.get("image_encoder")
        if enc is not None and not isinstance(enc, str):
            raise ConfigError(f"ip_adapter image_encoder must be a folder or hub id string; got {enc!r}")
        spec = IPAdapterSpec(value["model"], enc, value.get("scale", 0.6), value.get("enabled", True))
        IPAdapterSettings(spec.scale, spec.enabled)  # the same validation as a live update
        return spec

    def settings(self) -> IPAdapterSettings:
        return IPAdapterSettings(float(self.scale), self.enabled)


def check_family(spec: IPAdapterSpec, family: ModelFamily) -> None:
    """SD 2.x refuses any IP-Adapter; a random: adapter of another family is refused by name (cheap: before
    anything is built). Files are checked against the UNet once read (:func:`check_fits`)."""
    if family is SD21 or family.name is FamilyName.SD21:
        raise ConfigError(f"no IP-Adapter was published for SD 2.x models (this model is {family.name.value}, e.g. "
                          f"sd-turbo), so {spec.model!r} cannot be used; IP-Adapters exist for sd15 and sdxl models")
    if spec.model.startswith(RANDOM):
        name = spec.model[len(RANDOM):]
        arch = RANDOM_IP_ADAPTERS.get(name)
        if arch is None:
            raise ConfigError(f"unknown random IP-Adapter {spec.model!r}; expected one of "
                              f"{', '.join(RANDOM + k for k in RANDOM_IP_ADAPTERS)} or a .bin / .safetensors file")
        if arch.family is not None and arch.family is not family.name:
            raise ConfigError(f"IP-Adapter {spec.model!r} is for {arch.family.value} models but the model is "
                              f"{family.name.value}; use an IP-Adapter made for {family.name.value}")


def check_family_early(spec: IPAdapterSpec, model: Any) -> None:
    """For random: models, the family check before the model is built."""
    if isinstance(model, str) and model.startswith(RANDOM) and model[len(RANDOM):] in RANDOM_ARCHS:
        check_family(spec, RANDOM_ARCHS[model[len(RANDOM):]].family)


# ------------------------------------------------------------------------------------------------ runtime
class IPAdapter:
    """One engine's IP-Adapter: processors on the UNet, the live scale, the style encoder.

    Built by :func:`load` (before the engine's backend is made), attached by the engine with
    :meth:`install`; :meth:`apply` runs between frames (engine ``_apply``) and writes buffers only."""

    def __init__(self, spec: IPAdapterSpec, sd: dict[str, dict[str, torch.Tensor]], style: StyleEncoder,
                 family: ModelFamily, kind: ProjKind = ProjKind.BASE):
        self.spec, self.family, self.style, self.kind = spec, family, style, kind
        self._ip_layers = sd["ip_adapter"]
        self.tokens = style.tokens  # T_ip
        self.scale = ip_attention.IPScale(style.device)
        self.processors: dict[str, ip_attention.IPAttnProcessor] = {}
        self.text_tokens = 0
        self._unet: torch.nn.Module | None = None

    def install(self, unet: torch.nn.Module, text_tokens: int) -> None:
        """Put the IP processors on the UNet's cross-attention layers (once, before any backend sees it)."""
        self.text_tokens, self._unet = text_tokens, unet
        self.processors = ip_attention.install(unet, self._ip_layers, text_tokens, self.scale)
        self._ip_layers = {}
        log.info("IP-Adapter %s: %d cross-attention layers, %d image tokens after %d text tokens",
                 self.spec.model, len(self.processors), self.tokens, text_tokens)

    def keep_installed(self) -> None:
        """Between frames (from :meth:`apply`): the backend may have replaced our processors since
        :meth:`install`. Compile presets 'fast' / 'max' fuse q/k/v projections with diffusers'
        ``fuse_qkv_projections``, which puts its fused processor on every layer and would drop the image tokens'
        attention without a word: ours go back on the cross-attention layers (they use the fused k/v
        projection), the self-attention layers keep the fused one."""
        if self._unet is None or not (gone := ip_attention.missing(self._unet, self.processors)):
            return
        log.warning("IP-Adapter: the backend replaced the IP attention processors of %d cross-attention layers "
                    "(e.g. %s; compile presets 'fast' / 'max' fuse q/k/v projections); putting them back",
                    len(gone), gone[0])
        ip_attention.put_back(self._unet, self.processors)

    def accept_style(self, image: Any) -> tuple[tuple[str, float], ...]:
        """Caller's thread: validate and register the style image(s); returns the settings' style value."""
        return self.style.images.accept(image)

    def apply(self, buffers, settings: IPAdapterSettings) -> None:
        """Between frames: the scale (0 when disabled) and the image tokens of ``settings.style`` into
        ``buffers.embeds[:, T_text:]`` (uncond rows: the projection of an empty image, as diffusers does)."""
        self.keep_installed()
        self.scale.write(settings.scale if settings.enabled else 0.0)
        self.style.write_tokens(buffers.embeds, self.text_tokens, buffers.layout.uncond_rows, settings.style)

    def describe(self, settings: IPAdapterSettings) -> dict[str, Any]:
        return {"model": self.spec.model, "kind": self.kind.value, "scale": settings.scale,
                "enabled": settings.enabled, "images": self.style.images.describe(settings.style),
                "tokens": self.tokens, "encodes": self.style.encodes, "encoder_graphed": self.style.graphed}


def load(spec: IPAdapterSpec, components, device: torch.device, dtype: torch.dtype, *, seed: int = 0,
         local_files_only: bool | None = None) -> IPAdapter:
    """Read (or make) the adapter's weights and image encoder for ``components``; checks the family first."""
    family, unet = components.family, components.unet
    check_family(spec, family)
    if spec.model.startswith(RANDOM):
        from ..models.loading import read_config

        arch = RANDOM_IP_ADAPTERS[spec.model[len(RANDOM):]]
        vision_cfg = read_config(arch.vision_config)
        sd = random_state_dict(arch, unet, vision_cfg, seed + 17)
        kind = projection_kind(sd["image_proj"], spec.model)
        vision = random_vision(vision_cfg, seed + 18, device)
    else:
        path = resolve_file(spec.model, local_files_only)
        sd = read_file(path)
        kind = projection_kind(sd["image_proj"], spec.model)
        check_fits(sd, unet, family, spec.model)  # before the image encoder loads: a wrong file fails fast
        vision = pretrained_vision(spec.image_encoder, spec.model, path, feature_width(sd["image_proj"], kind),
                                   kind.hidden_states, local_files_only)
    proj = image_projection(sd["image_proj"], unet)
    check_encoder(vision, sd["image_proj"], kind, spec.model)
    style = StyleEncoder(vision.to(device=device, dtype=dtype).eval().requires_grad_(False),
                         proj.to(device=device, dtype=dtype).eval().requires_grad_(False), kind.hidden_states,
                         device, dtype)
    # engine caches: the UNet now carries IP layers (their weights are in its state_dict, so in its fingerprint),
    # and an exported UNet takes [B, T + T_ip, D] embeds and ip_scale (rtdiffusion/backends.py trt_networks)
    components.identity.update(ip_adapter=spec.model, ip_tokens=style.tokens)
    return IPAdapter(spec, sd, style, family, kind)


__all__ = ["H94_ENCODERS", "IPAdapter", "IPAdapterSpec", "ProjKind", "RANDOM_IP_ADAPTERS", "check_family",
           "check_family_early", "load", "projection_kind", "read_file", "random_state_dict"]
