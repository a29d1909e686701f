"""IP-Adapter: the published files, ``random:`` stand-ins, and the adapter's life in an engine.

Files, as h94/IP-Adapter ships them (``.bin`` pickles of ``{"image_proj": {...}, "ip_adapter": {...}}``, or
``.safetensors`` with ``image_proj.`` / ``ip_adapter.`` key prefixes):

    kind  image_proj (original names)                                   tokens  image encoder output used
    base  proj.weight [4*D, E], proj.bias, norm.weight/bias [D]          4      image_embeds [N, E]
    plus  latents [1, Q, Hd], proj_in [Hd, E'], proj_out [D, Hd],         Q      hidden_states[-2] [N, 257, E']
          norm_out, layers.{0..3}.{0: norm1, norm2, to_q, to_kv, to_out; 1: LayerNorm, Linear, GELU, Linear}
    ip_adapter: "{k}.to_k_ip.weight", "{k}.to_v_ip.weight" [C_layer, D] for k = 1, 3, 5, ... (one per
          cross-attention layer, in ``unet.attn_processors`` order)

D is the UNet's cross-attention width, which names the family: 768 SD 1.5 (ip-adapter_sd15,
ip-adapter-plus_sd15), 2048 SDXL (ip-adapter_sdxl_vit-h, ip-adapter-plus_sdxl_vit-h; both read CLIP ViT-H/14,
``clip_vit_h14_vision_ipadapter.json``). None was published for SD 2.x (sd-turbo): such an engine refuses one.

``random:ip-adapter-sd15 | plus-sd15 | sdxl | plus-sdxl`` are those formats with seeded random weights (and a
random ViT-H/14 image encoder); ``random:ip-adapter-tiny`` / ``random:ip-adapter-plus-tiny`` are tiny ones
(tiny image encoder, ``tiny_clip_vision_ipadapter.json``) for the tiny SD 1.5-style and SDXL-style UNets
of CPU tests. The image projection is diffusers' own module, loaded with diffusers' own conversion, so the
tokens are exactly diffusers'; the attention is ours (``ip_attention.py``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..config import IPAdapterSettings
from ..errors import ConfigError, ModelNotFoundError
from ..models.families import RANDOM_ARCHS, SD21, FamilyName, ModelFamily
from . import ip_attention
from .style import StyleEncoder, StyleImages

log = logging.getLogger(__name__)

RANDOM = "random:"


@dataclass(frozen=True)
class RandomIPAdapter:
    """A ``random:`` IP-Adapter: the published format and sizes, seeded random weights."""

    family: FamilyName | None  # None: fits the engine's tiny UNet (SD 1.5- or SDXL-style)
    plus: bool
    vision_config: str  # packaged CLIP vision config
    queries: int = 16  # plus: Q image tokens
    resampler_dim: int = 0  # plus: Hd (0: the cross-attention width D)
    heads: int = 12  # plus: resampler heads of 64 dims


RANDOM_IP_ADAPTERS = {
    "ip-adapter-sd15": RandomIPAdapter(FamilyName.SD15, False, "clip_vit_h14_vision_ipadapter.json"),
    "ip-adapter-plus-sd15": RandomIPAdapter(FamilyName.SD15, True, "clip_vit_h14_vision_ipadapter.json", 16, 768, 12),
    "ip-adapter-sdxl": RandomIPAdapter(FamilyName.SDXL, False, "clip_vit_h14_vision_ipadapter.json"),
    "ip-adapter-plus-sdxl": RandomIPAdapter(FamilyName.SDXL, True, "clip_vit_h14_vision_ipadapter.json", 16, 1280, 20),
    "ip-adapter-tiny": RandomIPAdapter(None, False, "tiny_clip_vision_ipadapter.json"),
    "ip-adapter-plus-tiny": RandomIPAdapter(None, True, "tiny_clip_vision_ipadapter.json", 4, 64, 1),
}
_WIDTH_FAMILY = {768: "sd15", 1024: "sd21", 2048: "sdxl"}  # cross-attention width -> family name


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
        if not isinstance(value, dict) or not isinstance(value.get("model"), str) or not value["model"]:
            raise ConfigError("ip_adapter must be a model string or a dict {'model': 'random:ip-adapter-sd15' | a .bin "
                              f"/ .safetensors file, 'image_encoder': ..., 'scale': 0.6, 'enabled': True}}; got {value!r}")
        unknown = set(value) - {"model", "image_encoder", "scale", "enabled"}
        if unknown:
            raise ConfigError(f"unknown ip_adapter key(s) {sorted(unknown)}; expected model, image_encoder, scale, enabled")
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


# ------------------------------------------------------------------------------------------------ files
def read_file(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` from a published .bin or .safetensors file."""
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"IP-Adapter file {path!r} does not exist (expected a .bin or .safetensors file "
                                 "as h94/IP-Adapter ships them, or a random:ip-adapter-* name)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            flat = load_file(path)
            sd: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
            for key, value in flat.items():
                section, _, rest = key.partition(".")
                if section in sd:
                    sd[section][rest] = value
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no code runs
    except Exception as exc:  # corrupt file, wrong format: many exception classes
        raise ConfigError(f"IP-Adapter file {path!r} could not be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(sd, dict) or not sd.get("image_proj") or not sd.get("ip_adapter"):
        raise ConfigError(f"IP-Adapter file {path!r} has no 'image_proj' and 'ip_adapter' sections (expected the "
                          "h94/IP-Adapter layout)")
    return sd


def is_plus(image_proj: dict[str, torch.Tensor], source: str) -> bool:
    if "proj.weight" in image_proj:
        return False
    if "latents" in image_proj and "proj_in.weight" in image_proj:
        return True
    raise ConfigError(f"IP-Adapter {source!r}: its image projection is neither the base IP-Adapter's "
                      "(proj.weight) nor IP-Adapter Plus' resampler (latents); FaceID / full-face variants are not "
                      "supported")


def check_fits(sd: dict[str, dict[str, torch.Tensor]], unet: torch.nn.Module, family: ModelFamily,
               source: str) -> None:
    """The file's cross-attention width and layer count must be this UNet's (else: families named)."""
    layers = ip_attention.cross_attention_layers(unet)
    width = int(unet.config.cross_attention_dim)
    k1 = sd["ip_adapter"].get("1.to_k_ip.weight")
    theirs = int(k1.shape[1]) if k1 is not None else -1
    fam = _WIDTH_FAMILY.get(theirs, "other")  # a tiny test UNet's width names no family
    if theirs != width:
        raise ConfigError(f"IP-Adapter {source!r} is for {fam} models (cross-attention width {theirs}) but the model "
                          f"is {family.name.value} (width {width}); use an IP-Adapter made for {family.name.value}")
    for i, (name, hidden) in enumerate(layers):
        k = sd["ip_adapter"].get(f"{2 * i + 1}.to_k_ip.weight")
        v = sd["ip_adapter"].get(f"{2 * i + 1}.to_v_ip.weight")
        if k is None or v is None or tuple(k.shape) != (hidden, width) or tuple(v.shape) != (hidden, width):
            raise ConfigError(f"IP-Adapter {source!r} does not fit this {family.name.value} UNet: layer {2 * i + 1} "
                              f"({name}) should have to_k_ip/to_v_ip of shape [{hidden}, {width}]")
    extra = len(sd["ip_adapter"]) - 2 * len(layers)
    if extra:
        raise ConfigError(f"IP-Adapter {source!r} has {len(sd['ip_adapter']) // 2} attention layers, this "
                          f"{family.name.value} UNet {len(layers)} cross-attention layers")


# ------------------------------------------------------------------------------------------------ random
def random_state_dict(arch: RandomIPAdapter, unet: torch.nn.Module, vision_cfg: dict, seed: int
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """The published format, with seeded random weights (normal, std 1/sqrt(fan_in); LayerNorms 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    D = int(unet.config.cross_attention_dim)
    lin = lambda o, i: torch.randn(o, i, generator=g) / math.sqrt(i)  # noqa: E731
    small = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    proj: dict[str, torch.Tensor] = {}
    if not arch.plus:
        E = int(vision_cfg["projection_dim"])
        proj.update({"proj.weight": lin(4 * D, E), "proj.bias": small(4 * D),
                     "norm.weight": torch.ones(D), "norm.bias": torch.zeros(D)})
    else:
        E, Hd, inner = int(vision_cfg["hidden_size"]), arch.resampler_dim or D, 64 * arch.heads
        proj.update({"latents": torch.randn(1, arch.queries, Hd, generator=g) / math.sqrt(Hd),
                     "proj_in.weight": lin(Hd, E), "proj_in.bias": small(Hd),
                     "proj_out.weight": lin(D, Hd), "proj_out.bias": small(D),
                     "norm_out.weight": torch.ones(D), "norm_out.bias": torch.zeros(D)})
        for i in range(4):  # diffusers' conversion builds a depth-4 resampler, as published
            p = f"layers.{i}."
            proj.update({p + "0.norm1.weight": torch.ones(Hd), p + "0.norm1.bias": torch.zeros(Hd),
                         p + "0.norm2.weight": torch.ones(Hd), p + "0.norm2.bias": torch.zeros(Hd),
                         p + "0.to_q.weight": lin(inner, Hd), p + "0.to_kv.weight": lin(2 * inner, Hd),
                         p + "0.to_out.weight": lin(Hd, inner),
                         p + "1.0.weight": torch.ones(Hd), p + "1.0.bias": torch.zeros(Hd),
                         p + "1.1.weight": lin(4 * Hd, Hd), p + "1.3.weight": lin(Hd, 4 * Hd)})
    ip = {}
    for i, (_, hidden) in enumerate(ip_attention.cross_attention_layers(unet)):
        ip[f"{2 * i + 1}.to_k_ip.weight"] = lin(hidden, D)
        ip[f"{2 * i + 1}.to_v_ip.weight"] = lin(hidden, D)
    return {"image_proj": proj, "ip_adapter": ip}


def image_projection(image_proj: dict[str, torch.Tensor], unet: torch.nn.Module) -> torch.nn.Module:
    """diffusers' ImageProjection / IPAdapterPlusImageProjection, loaded by diffusers' own key conversion."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    return UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        unet, image_proj, low_cpu_mem_usage=False)


# ------------------------------------------------------------------------------------------------ runtime
class IPAdapter:
    """One engine's IP-Adapter: processors on the UNet, the live scale, the style encoder.

    Built by :func:`load` (before the engine's backend is made), attached by the engine with
    :meth:`install`; :meth:`apply` runs between frames (engine ``_apply``) and writes buffers only."""

    def __init__(self, spec: IPAdapterSpec, sd: dict[str, dict[str, torch.Tensor]], style: StyleEncoder,
                 family: ModelFamily):
        self.spec, self.family, self.style = spec, family, style
        self._ip_layers = sd["ip_adapter"]
        self.tokens = style.tokens  # T_ip
        self.scale = ip_attention.IPScale(style.device)
        self.processors: dict[str, ip_attention.IPAttnProcessor] = {}
        self.text_tokens = 0
        self._written: IPAdapterSettings | None = None

    def install(self, unet: torch.nn.Module, text_tokens: int) -> None:
        """Put the IP processors on the UNet's cross-attention layers (once, before any backend sees it)."""
        self.text_tokens = text_tokens
        self.processors = ip_attention.install(unet, self._ip_layers, text_tokens, self.scale)
        self._ip_layers = {}
        log.info("IP-Adapter %s: %d cross-attention layers, %d image tokens after %d text tokens",
                 self.spec.model, len(self.processors), self.tokens, text_tokens)

    def accept_style(self, image: Any) -> tuple[tuple[str, float], ...]:
        """Caller's thread: validate and register the style image(s); returns the settings' style value."""
        return self.style.images.accept(image)

    def apply(self, buffers, settings: IPAdapterSettings) -> None:
        """Between frames: the scale (0 when disabled) and the image tokens of ``settings.style`` into
        ``buffers.embeds[:, T_text:]`` (uncond rows: the projection of an empty image, as diffusers does)."""
        self.scale.write(settings.scale if settings.enabled else 0.0)
        self.style.write_tokens(buffers.embeds, self.text_tokens, buffers.layout.uncond_rows, settings.style)
        self._written = settings

    def describe(self, settings: IPAdapterSettings) -> dict[str, Any]:
        return {"model": self.spec.model, "kind": "plus" if self.style.plus else "base", "scale": settings.scale,
                "enabled": settings.enabled, "images": self.style.images.describe(settings.style),
                "tokens": self.tokens, "encodes": self.style.encodes}


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
        vision = _random_vision(vision_cfg, seed + 18)
    else:
        sd = read_file(spec.model)
        vision = _pretrained_vision(spec, local_files_only)
    plus = is_plus(sd["image_proj"], spec.model)
    check_fits(sd, unet, family, spec.model)
    proj = image_projection(sd["image_proj"], unet)
    _check_encoder(vision, sd["image_proj"], plus, spec.model)
    style = StyleEncoder(vision.to(device=device, dtype=dtype).eval().requires_grad_(False),
                         proj.to(device=device, dtype=dtype).eval().requires_grad_(False), plus, device, dtype)
    # engine caches: the UNet now carries IP layers (their weights are in its state_dict, so in its fingerprint),
    # and an exported UNet takes [B, T + T_ip, D] embeds and ip_scale (rtdiffusion/backends.py trt_networks)
    components.identity.update(ip_adapter=spec.model, ip_tokens=style.tokens)
    return IPAdapter(spec, sd, style, family)


def _random_vision(cfg: dict, seed: int) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    keep = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype",
                                                                                   "transformers_version", "model_type")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**keep))


def _pretrained_vision(spec: IPAdapterSpec, local_files_only: bool | None) -> torch.nn.Module:
    """The image encoder: ``spec.image_encoder`` (folder, hub id, or ``owner/repo/sub/folder``), else an
    ``image_encoder/`` folder beside the file or at ``../models/image_encoder`` (h94/IP-Adapter's layout)."""
    from transformers import CLIPVisionModelWithProjection

    source = spec.image_encoder
    if source is None:
        here = os.path.dirname(os.path.abspath(spec.model))
        for cand in (os.path.join(here, "image_encoder"), os.path.join(here, "..", "models", "image_encoder")):
            if os.path.isfile(os.path.join(cand, "config.json")):
                source = cand
                break
        else:
            raise ConfigError(f"IP-Adapter {spec.model!r}: no image encoder given and none found beside it (expected "
                              "an image_encoder/ folder next to the file, or ip_adapter={'image_encoder': folder or "
                              "hub id such as 'h94/IP-Adapter/models/image_encoder'})")
    kw: dict[str, Any] = {"local_files_only": bool(local_files_only)}
    if not os.path.isdir(source) and source.count("/") > 1:
        owner, repo, sub = source.split("/", 2)
        source, kw["subfolder"] = f"{owner}/{repo}", sub
    try:
        return CLIPVisionModelWithProjection.from_pretrained(source, **kw)
    except Exception as exc:  # hub / file errors come in many classes
        raise ModelNotFoundError(f"IP-Adapter image encoder {spec.image_encoder or source!r} could not be loaded "
                                 f"(expected a CLIPVisionModelWithProjection folder or hub id): "
                                 f"{type(exc).__name__}: {exc}") from exc


def _check_encoder(vision, image_proj: dict[str, torch.Tensor], plus: bool, source: str) -> None:
    cfg = vision.config
    want = int(image_proj["proj_in.weight"].shape[1] if plus else image_proj["proj.weight"].shape[1])
    have = int(cfg.hidden_size if plus else cfg.projection_dim)
    if want != have:
        what = "hidden size" if plus else "projection_dim"
        raise ConfigError(f"IP-Adapter {source!r} reads image features of width {want}, but its image encoder's "
                          f"{what} is {have}; pass the image encoder it was trained with (ViT-H/14 for the "
                          "sd15 and *_vit-h sdxl files)")


__all__ = ["IPAdapter", "IPAdapterSpec", "RANDOM_IP_ADAPTERS", "check_family", "check_family_early", "load",
           "read_file", "random_state_dict"]
