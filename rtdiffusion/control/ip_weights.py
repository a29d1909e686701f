"""IP-Adapter weights: the published files, ``random:`` stand-ins, and the CLIP image encoder.

Files, as h94/IP-Adapter ships them (``.bin`` pickles of ``{"image_proj": {...}, "ip_adapter": {...}}``, or
``.safetensors`` with ``image_proj.`` / ``ip_adapter.`` key prefixes):

    kind  image_proj (original names)                                   tokens  image encoder output used
    base  proj.weight [4*D, E], proj.bias, norm.weight/bias [D]          4      image_embeds [N, E]
    plus  latents [1, Q, Hd], proj_in [Hd, E'], proj_out [D, Hd],         Q      hidden_states[-2] [N, 257, E']
          norm_out, layers.{0..3}.{0: norm1, norm2, to_q, to_kv, to_out; 1: LayerNorm, Linear, GELU, Linear}
    full  proj.0 [E', E'] + GELU + proj.2 [D, E'] + proj.3 LayerNorm [D]  257    hidden_states[-2] [N, 257, E']
    (full-face; FaceID files read InsightFace face embeddings, not CLIP features, and are refused)
    ip_adapter: "{k}.to_k_ip.weight", "{k}.to_v_ip.weight" [C_layer, D] for k = 1, 3, 5, ... (one per
          cross-attention layer, in ``unet.attn_processors`` order)

D is the UNet's cross-attention width, which names the family: 768 SD 1.5, 2048 SDXL. None was published for
SD 2.x (sd-turbo): such an engine refuses one. The image encoder is the one the file was trained with, told
apart by the width the projection reads (E = projection_dim for base, E' = hidden_size otherwise):

    published file (h94/IP-Adapter)        random: name                  image encoder (packaged config)
    models/ip-adapter_sd15                 ip-adapter-sd15               ViT-H/14  clip_vit_h14_vision_ipadapter.json
    models/ip-adapter-plus_sd15            ip-adapter-plus-sd15          ViT-H/14
    models/ip-adapter-full-face_sd15       ip-adapter-full-face-sd15     ViT-H/14
    models/ip-adapter_sd15_vit-G           ip-adapter-sd15-vit-g         ViT-bigG/14  clip_vit_bigg14_vision_ipadapter.json
    sdxl_models/ip-adapter_sdxl            ip-adapter-sdxl               ViT-bigG/14
    sdxl_models/ip-adapter_sdxl_vit-h      ip-adapter-sdxl-vit-h         ViT-H/14
    sdxl_models/ip-adapter-plus_sdxl_vit-h ip-adapter-plus-sdxl          ViT-H/14

(ip-adapter_sd15_light and _light_v11 have ip-adapter_sd15's layout, ip-adapter-plus-face_sd15 and
ip-adapter-plus-face_sdxl_vit-h those of the plus files: they load as files.) ``random:ip-adapter-tiny`` / ``-plus-tiny`` / ``-full-face-tiny`` are tiny ones
(tiny image encoder, ``tiny_clip_vision_ipadapter.json``) for the tiny SD 1.5-style and SDXL-style UNets of
CPU tests. The image projection is diffusers' own module, loaded with diffusers' own conversion, so the
tokens are exactly diffusers'; the attention is ours (``ip_attention.py``).
"""

from __future__ import annotations

import enum
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, ModelNotFoundError
from ..models.families import FamilyName, ModelFamily
from ..models.loading import _strip
from ..models.random_init import seeded_rng
from . import ip_attention


class ProjKind(enum.Enum):
    """The image projection of a file (diffusers' class), and the image features it reads."""

    BASE = "base"  # ImageProjection: image_embeds [N, E] -> 4 tokens
    PLUS = "plus"  # IPAdapterPlusImageProjection (a resampler): hidden_states[-2] -> Q tokens
    FULL_FACE = "full-face"  # IPAdapterFullImageProjection (an MLP): hidden_states[-2] [N, L, E'] -> L tokens

    @property
    def hidden_states(self) -> bool:
        """Reads the encoder's hidden_states[-2] (its hidden size), not image_embeds (its projection_dim)."""
        return self is not ProjKind.BASE


@dataclass(frozen=True)
class RandomIPAdapter:
    """A ``random:`` IP-Adapter: the published format and sizes, seeded random weights."""

    family: FamilyName | None  # None: fits the engine's tiny UNet (SD 1.5- or SDXL-style)
    kind: ProjKind
    vision_config: str  # packaged CLIP vision config
    queries: int = 16  # plus: Q image tokens
    resampler_dim: int = 0  # plus: Hd (0: the cross-attention width D)
    heads: int = 12  # plus: resampler heads of 64 dims
    published: str = ""  # the h94/IP-Adapter file whose layout it has ("" for the tiny test ones)


VIT_H, VIT_BIGG = "clip_vit_h14_vision_ipadapter.json", "clip_vit_bigg14_vision_ipadapter.json"
RANDOM_IP_ADAPTERS = {  # one name per published layout (see the table above)
    "ip-adapter-sd15": RandomIPAdapter(FamilyName.SD15, ProjKind.BASE, VIT_H, published="models/ip-adapter_sd15"),
    "ip-adapter-plus-sd15": RandomIPAdapter(FamilyName.SD15, ProjKind.PLUS, VIT_H, 16, 768, 12,
                                            published="models/ip-adapter-plus_sd15"),
    "ip-adapter-full-face-sd15": RandomIPAdapter(FamilyName.SD15, ProjKind.FULL_FACE, VIT_H,
                                                 published="models/ip-adapter-full-face_sd15"),
    "ip-adapter-sd15-vit-g": RandomIPAdapter(FamilyName.SD15, ProjKind.BASE, VIT_BIGG,
                                             published="models/ip-adapter_sd15_vit-G"),
    "ip-adapter-sdxl": RandomIPAdapter(FamilyName.SDXL, ProjKind.BASE, VIT_BIGG, published="sdxl_models/ip-adapter_sdxl"),
    "ip-adapter-sdxl-vit-h": RandomIPAdapter(FamilyName.SDXL, ProjKind.BASE, VIT_H,
                                             published="sdxl_models/ip-adapter_sdxl_vit-h"),
    "ip-adapter-plus-sdxl": RandomIPAdapter(FamilyName.SDXL, ProjKind.PLUS, VIT_H, 16, 1280, 20,
                                            published="sdxl_models/ip-adapter-plus_sdxl_vit-h"),
    "ip-adapter-tiny": RandomIPAdapter(None, ProjKind.BASE, "tiny_clip_vision_ipadapter.json"),
    "ip-adapter-plus-tiny": RandomIPAdapter(None, ProjKind.PLUS, "tiny_clip_vision_ipadapter.json", 4, 64, 1),
    "ip-adapter-full-face-tiny": RandomIPAdapter(None, ProjKind.FULL_FACE, "tiny_clip_vision_ipadapter.json"),
}
# h94/IP-Adapter's two image encoders by the width a projection reads: (reads hidden states?, width) -> folder
H94_ENCODERS = {(False, 1024): "models/image_encoder", (True, 1280): "models/image_encoder",  # ViT-H/14
                (False, 1280): "sdxl_models/image_encoder", (True, 1664): "sdxl_models/image_encoder"}  # bigG
_WIDTH_FAMILY = {768: "sd15", 1024: "sd21", 2048: "sdxl"}  # cross-attention width -> family name


def resolve_file(model: str, local_files_only: bool | None) -> str:
    """A local file, or ``owner/repo/path/in/repo`` (e.g. ``h94/IP-Adapter/models/ip-adapter_sd15.safetensors``)
    from the Hugging Face cache (downloaded unless offline)."""
    if os.path.isfile(model) or model.startswith(("/", ".", "~")) or model.count("/") < 2:
        return model  # read_file says what is missing
    from huggingface_hub import hf_hub_download

    owner, repo, filename = model.split("/", 2)
    try:
        kw = {} if local_files_only is None else {"local_files_only": local_files_only}
        return hf_hub_download(f"{owner}/{repo}", filename, **kw)
    except Exception as exc:  # hub errors come in many classes; all mean "not here"
        raise ModelNotFoundError(f"IP-Adapter {model!r} is not a local file and could not be found in (or downloaded "
                                 f"into) the Hugging Face cache: {type(exc).__name__}: {exc}") from exc


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


def projection_kind(image_proj: dict[str, torch.Tensor], source: str) -> ProjKind:
    """Which image projection a file has (by its keys, as diffusers' conversion tells them apart)."""
    if "proj.weight" in image_proj:
        return ProjKind.BASE
    if "latents" in image_proj and "proj_in.weight" in image_proj:
        return ProjKind.PLUS
    if "proj.3.weight" in image_proj and "proj.0.weight" in image_proj:
        return ProjKind.FULL_FACE
    if "norm.weight" in image_proj or any(k.startswith("perceiver_resampler.") for k in image_proj):
        raise ConfigError(f"IP-Adapter {source!r} is a FaceID adapter: it reads InsightFace face embeddings (and "
                          "comes with a LoRA for the UNet), not CLIP image features, so it is not supported; use "
                          "ip-adapter-plus-face or ip-adapter-full-face for faces")
    raise ConfigError(f"IP-Adapter {source!r}: its image projection is none of the base IP-Adapter's (proj.weight), "
                      "IP-Adapter Plus' resampler (latents, proj_in) or full-face's MLP (proj.0, proj.3)")


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
Layout = dict[str, dict[str, tuple[tuple[int, ...], str]]]  # section -> key -> (shape, how it is initialised)


def published_layout(arch: RandomIPAdapter, unet: torch.nn.Module, vision_cfg: dict) -> Layout:
    """Every key and shape of the published file for ``arch`` on ``unet`` (original names, both sections)."""
    D = int(unet.config.cross_attention_dim)
    proj: dict[str, tuple[tuple[int, ...], str]] = {}
    if arch.kind is ProjKind.BASE:
        E = int(vision_cfg["projection_dim"])
        proj.update({"proj.weight": ((4 * D, E), "linear"), "proj.bias": ((4 * D,), "bias"),
                     "norm.weight": ((D,), "one"), "norm.bias": ((D,), "zero")})
    elif arch.kind is ProjKind.FULL_FACE:
        E = int(vision_cfg["hidden_size"])
        proj.update({"proj.0.weight": ((E, E), "linear"), "proj.0.bias": ((E,), "bias"),
                     "proj.2.weight": ((D, E), "linear"), "proj.2.bias": ((D,), "bias"),
                     "proj.3.weight": ((D,), "one"), "proj.3.bias": ((D,), "zero")})
    else:
        E, Hd, inner = int(vision_cfg["hidden_size"]), arch.resampler_dim or D, 64 * arch.heads
        proj.update({"latents": ((1, arch.queries, Hd), "linear"),
                     "proj_in.weight": ((Hd, E), "linear"), "proj_in.bias": ((Hd,), "bias"),
                     "proj_out.weight": ((D, Hd), "linear"), "proj_out.bias": ((D,), "bias"),
                     "norm_out.weight": ((D,), "one"), "norm_out.bias": ((D,), "zero")})
        for i in range(4):  # diffusers' conversion builds a depth-4 resampler, as published
            p = f"layers.{i}."
            for norm in ("0.norm1", "0.norm2", "1.0"):
                proj.update({f"{p}{norm}.weight": ((Hd,), "one"), f"{p}{norm}.bias": ((Hd,), "zero")})
            proj.update({p + "0.to_q.weight": ((inner, Hd), "linear"),
                         p + "0.to_kv.weight": ((2 * inner, Hd), "linear"),
                         p + "0.to_out.weight": ((Hd, inner), "linear"),
                         p + "1.1.weight": ((4 * Hd, Hd), "linear"), p + "1.3.weight": ((Hd, 4 * Hd), "linear")})
    ip = {}
    for i, (_, hidden) in enumerate(ip_attention.cross_attention_layers(unet)):
        for w in ("to_k_ip", "to_v_ip"):
            ip[f"{2 * i + 1}.{w}.weight"] = ((hidden, D), "linear")
    return {"image_proj": proj, "ip_adapter": ip}


def random_state_dict(arch: RandomIPAdapter, unet: torch.nn.Module, vision_cfg: dict, seed: int
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """The published format with seeded random weights: normal with std 1/sqrt(fan in) (the last dim), biases
    std 0.02, LayerNorms 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    make = {"linear": lambda s: torch.randn(s, generator=g) / math.sqrt(s[-1]),
            "bias": lambda s: torch.randn(s, generator=g) * 0.02, "one": torch.ones, "zero": torch.zeros}
    return {section: {key: make[how](shape) for key, (shape, how) in keys.items()}
            for section, keys in published_layout(arch, unet, vision_cfg).items()}


def image_projection(image_proj: dict[str, torch.Tensor], unet: torch.nn.Module) -> torch.nn.Module:
    """diffusers' ImageProjection / IPAdapterPlusImageProjection, loaded by diffusers' own key conversion."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    return UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        unet, image_proj, low_cpu_mem_usage=False)


def random_vision(cfg: dict, seed: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A CLIPVisionModelWithProjection of ``cfg`` with seeded random weights, built on ``device`` (ViT-H/14 has
    632 M parameters: made on the GPU it takes a moment, on the CPU many seconds)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    keep = {k: v for k, v in _strip(cfg).items() if k != "model_type"}
    device = torch.device(device)
    with seeded_rng(seed, device), torch.device(device):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**keep))


def pretrained_vision(image_encoder: str | None, model: str, path: str, width: int, hidden: bool,
                      local_files_only: bool | None) -> torch.nn.Module:
    """The image encoder: ``image_encoder`` (folder, hub id, or ``owner/repo/sub/folder``), else the one
    h94/IP-Adapter's layout puts beside the file (see :func:`_default_encoder`)."""
    from transformers import CLIPVisionModelWithProjection

    source = image_encoder or _default_encoder(model, path, width, hidden)
    kw: dict[str, Any] = {} if local_files_only is None else {"local_files_only": local_files_only}
    if not os.path.isdir(source) and source.count("/") > 1:
        owner, repo, sub = source.split("/", 2)
        source, kw["subfolder"] = f"{owner}/{repo}", sub
    try:
        return CLIPVisionModelWithProjection.from_pretrained(source, **kw)
    except Exception as exc:  # hub / file errors come in many classes
        raise ModelNotFoundError(f"IP-Adapter image encoder {image_encoder or source!r} could not be loaded "
                                 f"(expected a CLIPVisionModelWithProjection folder or hub id): "
                                 f"{type(exc).__name__}: {exc}") from exc


def _default_encoder(model: str, path: str, width: int, hidden: bool) -> str:
    """The image encoder h94/IP-Adapter's layout puts near the file: the first of ``image_encoder/`` beside it,
    ``../models/image_encoder`` (ViT-H/14) and ``../sdxl_models/image_encoder`` (ViT-bigG/14) whose width fits
    (so sdxl_models/ip-adapter_sdxl_vit-h finds models/ and models/ip-adapter_sd15_vit-G finds sdxl_models/);
    else, for a hub file, the repo's folder of that width (:data:`H94_ENCODERS`)."""
    here = os.path.dirname(os.path.abspath(path))
    key = "hidden_size" if hidden else "projection_dim"  # what the projection reads: hidden states or embeds
    for cand in (os.path.join(here, "image_encoder"), os.path.join(here, "..", "models", "image_encoder"),
                 os.path.join(here, "..", "sdxl_models", "image_encoder")):
        try:
            with open(os.path.join(cand, "config.json")) as f:
                if json.load(f).get(key) == width:
                    return os.path.normpath(cand)
        except (OSError, ValueError):
            continue
    if not os.path.isfile(model) and (hidden, width) in H94_ENCODERS:  # owner/repo/path/in/repo, from the hub
        owner, repo, _ = model.split("/", 2)
        return f"{owner}/{repo}/{H94_ENCODERS[hidden, width]}"
    raise ConfigError(f"IP-Adapter {model!r}: no image encoder given and none of {key} {width} found beside it "
                      "(expected an image_encoder/ folder next to the file, at ../models/image_encoder or at "
                      "../sdxl_models/image_encoder, or ip_adapter={'image_encoder': a folder or hub id such as "
                      "'h94/IP-Adapter/models/image_encoder' (ViT-H/14) or 'h94/IP-Adapter/sdxl_models/image_encoder' "
                      "(ViT-bigG/14)})")


def feature_width(image_proj: dict[str, torch.Tensor], kind: ProjKind) -> int:
    """The width of the image features the projection reads (encoder hidden size, or projection_dim for base)."""
    first = {ProjKind.BASE: "proj.weight", ProjKind.PLUS: "proj_in.weight", ProjKind.FULL_FACE: "proj.0.weight"}
    return int(image_proj[first[kind]].shape[1])


def check_encoder(vision, image_proj: dict[str, torch.Tensor], kind: ProjKind, source: str) -> None:
    cfg = vision.config
    want = feature_width(image_proj, kind)
    have = int(cfg.hidden_size if kind.hidden_states else cfg.projection_dim)
    if want != have:
        what = "hidden size" if kind.hidden_states else "projection_dim"
        raise ConfigError(f"IP-Adapter {source!r} reads image features of width {want}, but its image encoder's "
                          f"{what} is {have}; pass the image encoder it was trained with (h94's models/image_encoder, "
                          "ViT-H/14, for ip-adapter(-plus, -full-face)_sd15 and the *_vit-h sdxl files; sdxl_models/image_encoder, "
                          "ViT-bigG/14, for ip-adapter_sdxl and ip-adapter_sd15_vit-G)")
