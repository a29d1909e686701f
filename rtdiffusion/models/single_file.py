"""One ``.safetensors`` checkpoint as users download them (the original Stability layout), loaded offline.

The file holds the UNet (``model.diffusion_model.*``), the text encoder(s) (``cond_stage_model.*``, or for
SDXL ``conditioner.embedders.0.transformer.*`` and the OpenCLIP ``conditioner.embedders.1.model.*``) and
usually the KL VAE (``first_stage_model.*``), but no configs. diffusers' ``from_single_file`` fetches the
original config from the hub; here the family is read from the keys and the architecture is mapped from the
packaged configs (``families.RANDOM_ARCHS``): the one of that family whose UNet and text widths match the
file's tensors. diffusers' own converters (``diffusers.loaders.single_file_utils``) then rename the weights.

Tokenizers are not in the file: they come from ``tokenizer/`` (and ``tokenizer_2/``) folders next to the
file if there are any, else from the family's reference repo (Hugging Face cache, downloaded unless offline).
Scheduler and default size are the matched architecture's: for SDXL, a file name with "turbo" maps to
``sdxl-turbo`` (TURBO, 512 px), any other to SDXL base (LCM, 1024 px: pass an LCM-LoRA with it).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..config import VaeKind
from ..errors import ConfigError, ModelNotFoundError
from .families import RANDOM_ARCHS, SD15, SD21, SDXL, ModelFamily, RandomArch

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors",)
_TOKENIZER_REPOS = {SDXL.name: "stabilityai/sdxl-turbo", SD21.name: "stabilityai/sd-turbo",
                    SD15.name: "stable-diffusion-v1-5/stable-diffusion-v1-5"}
_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_TEXT_PREFIXES = {SDXL.name: ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
                  SD15.name: ("cond_stage_model.transformer.",), SD21.name: ("cond_stage_model.model.",)}


def is_single_file(model: str) -> bool:
    return isinstance(model, str) and model.lower().endswith(SINGLE_FILE_SUFFIXES)


def family_of_checkpoint(sd: dict[str, torch.Tensor], path: str) -> ModelFamily:
    if any(k.startswith("conditioner.embedders.1.model.") for k in sd):
        return SDXL
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        return SD21
    if any(k.startswith("cond_stage_model.transformer.") for k in sd):
        return SD15
    raise ConfigError(f"{path!r} is not a Stable Diffusion checkpoint in the original single-file layout: it has "
                      "no text encoder keys (cond_stage_model.* or conditioner.embedders.*)")


def arch_of_checkpoint(sd: dict[str, torch.Tensor], family: ModelFamily, path: str) -> RandomArch:
    """The packaged architecture of ``family`` whose widths match the file (first UNet conv, text width)."""
    from .loading import read_config

    width = int(sd[_UNET + "input_blocks.0.0.weight"].shape[0])
    text_key = _TEXT_PREFIXES[family.name][-1]
    turbo = "turbo" in os.path.basename(path).lower()
    fits = []
    for name, arch in RANDOM_ARCHS.items():
        if arch.family is not family or int(read_config(arch.unet)["block_out_channels"][0]) != width:
            continue
        hidden = int(read_config(arch.text_encoders[-1])["hidden_size"])
        if not any(k.startswith(text_key) and v.shape[-1] == hidden for k, v in sd.items()):
            continue
        fits.append((name, arch))
    if not fits:
        raise ConfigError(f"{path!r}: a {family.name.value} checkpoint whose sizes match none of the known "
                          f"architectures ({', '.join(RANDOM_ARCHS)}); convert it to a diffusers folder instead")
    fits.sort(key=lambda na: (("turbo" in na[0]) != turbo, na[0]))  # file name decides turbo vs base
    return fits[0][1]


def load_single_file(path: str, device: torch.device, dtype: torch.dtype, vae: VaeKind, vae_id: str | None,
                     local_files_only: bool | None, unet_device: torch.device) -> dict[str, Any]:
    """The networks of one checkpoint file, as keyword arguments for ``Components`` (less VAE dtype policy)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file

    from .loading import _strip, _text_model, read_config

    if not os.path.isfile(path):
        raise ModelNotFoundError(f"checkpoint file {path!r} does not exist")
    sd = load_file(path)
    family = family_of_checkpoint(sd, path)
    arch = arch_of_checkpoint(sd, family, path)
    unet_cfg = {**_strip(read_config(arch.unet)), **arch.unet_overrides}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, unet_cfg), strict=True, assign=True)
    encoders = []
    for i, (cfg_name, prefix) in enumerate(zip(arch.text_encoders, _TEXT_PREFIXES[family.name])):
        model = _text_model(read_config(cfg_name), i)  # on the CPU: its non-persistent buffers are made here
        if prefix.endswith(".model."):  # OpenCLIP layout (SD 2.1, SDXL's second encoder)
            weights = sfu.convert_open_clip_checkpoint(model, sd, prefix=prefix)
        else:
            weights = sfu.convert_ldm_clip_checkpoint(sd, remove_prefix=prefix)
        own = model.state_dict()
        missing, _ = model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing:
            raise ConfigError(f"{path!r}: text encoder {i + 1} lacks weights {missing[:3]}")
        encoders.append(model.to(device))
    vae_module = None
    if vae is VaeKind.KL and not vae_id:
        if not any(k.startswith(_VAE) for k in sd):
            raise ConfigError(f"{path!r} holds no VAE weights (first_stage_model.*): use vae='tiny' or pass vae_id")
        vae_cfg = _strip(read_config(arch.vae_kl))
        with torch.device("meta"):
            vae_module = AutoencoderKL.from_config(vae_cfg)
        vae_module.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, vae_cfg), strict=True, assign=True)
    tokenizers = _tokenizers(path, family, local_files_only)
    return dict(unet=unet.to(unet_device, dtype), text_encoders=encoders, tokenizers=tokenizers, vae=vae_module,
                family=family, arch=arch)


def _tokenizers(path: str, family: ModelFamily, local_files_only: bool | None) -> list:
    from transformers import CLIPTokenizer

    from .loading import resolve_model_folder
    from .tokenizer import ClipTokenizer

    names = ["tokenizer", "tokenizer_2"][: family.text_encoders]
    here = os.path.dirname(os.path.abspath(path))
    if all(os.path.isdir(os.path.join(here, n)) for n in names):
        root = here
    else:
        repo = _TOKENIZER_REPOS[family.name]
        try:
            root = resolve_model_folder(repo, local_files_only=local_files_only, subfolders=tuple(names))
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"{path!r} holds no tokenizer: put {'/ and '.join(names)}/ folders next to it, "
                                     f"or have {repo!r}'s tokenizers in the Hugging Face cache ({exc})") from exc
    return [ClipTokenizer(CLIPTokenizer.from_pretrained(root, subfolder=n)) for n in names]
