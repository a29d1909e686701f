"""Build the networks an engine needs: from the hub / a local diffusers folder, or ``random:<arch>``.

``random:sd-turbo``, ``random:sd15`` and ``random:tiny`` are the exact published architectures (configs in
``configs/``, copied from the project's shared model configs) with seeded random weights and a locally made
tokenizer. They exist for benchmarks, tests and demos without downloads: their pictures are noise-like and
say nothing about image quality.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from ..config import SchedulerKind, VaeKind
from ..errors import ConfigError, ModelNotFoundError
from .tokenizer import ClipTokenizer, HashTokenizer, Tokenizer

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class RandomArch:
    unet: str
    text_encoder: str
    taesd: str
    vae_kl: str
    scheduler: SchedulerKind
    scheduler_config: str
    default_size: int


RANDOM_ARCHS = {
    "sd-turbo": RandomArch("sd_turbo_unet.json", "openclip_vit_h14_text_sd21.json", "taesd.json",
                           "sd21base_vae_kl.json", SchedulerKind.TURBO, "sd_turbo_scheduler.json", 512),
    "sd15": RandomArch("sd15_unet.json", "clip_vit_l14_text_sd15.json", "taesd.json", "sd_vae_kl.json",
                       SchedulerKind.LCM, "lcm_scheduler_sd15_lcmlora.json", 512),
    "tiny": RandomArch("tiny_unet_sd2style.json", "tiny_clip_text.json", "tiny_taesd_test.json",
                       "tiny_vae_kl.json", SchedulerKind.TURBO, "sd_turbo_scheduler.json", 64),
}


def read_config(name: str) -> dict[str, Any]:
    """One of the packaged architecture configs, by file name."""
    return json.loads(resources.files(__package__).joinpath("configs", name).read_text())


@dataclass
class Components:
    """Everything an engine runs, on its device and dtype. ``identity`` feeds engine-cache keys."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Tokenizer
    scheduler: SchedulerKind
    scheduler_config: dict[str, Any]
    default_size: int
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(_vae_blocks(self.vae.config)) - 1)

    @property
    def latent_scaling(self) -> float:
        return float(self.vae.config.get("scaling_factor", 1.0))


def _vae_blocks(cfg) -> list:
    return cfg.get("encoder_block_out_channels") or cfg.get("block_out_channels")


def load_components(model: str, device: torch.device, dtype: torch.dtype, vae: VaeKind = VaeKind.TINY,
                    *, seed: int = 0, vae_id: str | None = None,
                    lora: tuple[tuple[str, float], ...] = (), local_files_only: bool | None = None,
                    unet_device: torch.device | None = None) -> Components:
    """Load ``model`` (a hub id, a local diffusers folder or ``random:<arch>``) onto ``device`` in ``dtype``.

    unet_device: where the UNet's weights go (default ``device``); low-VRAM mode keeps them on the CPU and
    streams them."""
    unet_device = unet_device or device
    if not isinstance(model, str) or not model:
        raise ConfigError(f"model must be a hub id, a local folder or one of "
                          f"{', '.join(RANDOM_PREFIX + k for k in RANDOM_ARCHS)}; got {model!r}")
    if model.startswith(RANDOM_PREFIX):
        if lora:
            raise ConfigError("LoRA weights cannot be fused into a random: model")
        return _random_components(model[len(RANDOM_PREFIX):], device, dtype, vae, seed, unet_device)
    return _pretrained_components(model, device, dtype, vae, vae_id, lora, local_files_only, unet_device)


def _random_components(arch_name: str, device: torch.device, dtype: torch.dtype, vae: VaeKind,
                       seed: int, unet_device: torch.device) -> Components:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = RANDOM_ARCHS.get(arch_name)
    if arch is None:
        raise ConfigError(f"unknown random model {RANDOM_PREFIX + arch_name!r}; expected one of "
                          f"{', '.join(RANDOM_PREFIX + k for k in RANDOM_ARCHS)}")
    log.info("building %s%s with seeded random weights (noise-like output, for speed and tests only)",
             RANDOM_PREFIX, arch_name)
    text_cfg = read_config(arch.text_encoder)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        with torch.device(unet_device):
            unet = UNet2DConditionModel.from_config(_strip(read_config(arch.unet)))
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed + 1)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed + 1)
        if vae is VaeKind.TINY:
            vae_module = AutoencoderTiny.from_config(_strip(read_config(arch.taesd)))
        else:
            vae_module = AutoencoderKL.from_config(_strip(read_config(arch.vae_kl)))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_strip(text_cfg)))
    tokenizer = HashTokenizer(int(text_cfg["vocab_size"]), int(text_cfg.get("max_position_embeddings", 77)))
    return Components(
        unet=_ready(unet, dtype), vae=_ready(vae_module, dtype), text_encoder=_ready(text_encoder, dtype),
        tokenizer=tokenizer, scheduler=arch.scheduler, scheduler_config=read_config(arch.scheduler_config),
        default_size=arch.default_size,
        identity={"model": RANDOM_PREFIX + arch_name, "seed": seed, "vae": vae.value, "lora": []},
    )


def _strip(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype",
                                                                                   "transformers_version")}


def _ready(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # .to(dtype) warns about an empty keep-in-fp32 list on every model
    try:
        return module.to(dtype=dtype).eval().requires_grad_(False)
    finally:
        dlog.set_verbosity(level)


_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler", "vae")


def resolve_model_folder(model: str, *, local_files_only: bool | None = None,
                         subfolders: tuple[str, ...] = _SUBFOLDERS) -> str:
    """A local folder for ``model``: the folder itself, or the hub snapshot (downloaded unless offline)."""
    if os.path.isdir(model):
        return model
    if model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model:
        raise ModelNotFoundError(f"model folder {model!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    offline = HF_HUB_OFFLINE if local_files_only is None else local_files_only
    if subfolders:  # a pipeline folder: only the parts we load
        patterns = ["model_index.json"] + [f"{s}/*{ext}" for s in subfolders
                                           for ext in (".json", ".txt", ".safetensors", ".model")]
    else:  # a single-model repo (TAESD, a LoRA)
        patterns = ["*.json", "*.txt", "*.safetensors"]
    try:
        return snapshot_download(model, allow_patterns=patterns, local_files_only=offline)
    except Exception as exc:  # hub errors come in many classes; all mean "not here"
        raise ModelNotFoundError(
            f"model {model!r} was not found as a local folder, nor in the Hugging Face cache ({HF_HUB_CACHE})"
            + ("" if offline else ", and could not be downloaded")
            + f": {type(exc).__name__}: {exc}. Pass a local diffusers folder, download it first, "
            f"or use one of {', '.join(RANDOM_PREFIX + k for k in RANDOM_ARCHS)} for tests.") from exc


def _pretrained_components(model: str, device: torch.device, dtype: torch.dtype, vae: VaeKind,
                           vae_id: str | None, lora: tuple[tuple[str, float], ...],
                           local_files_only: bool | None, unet_device: torch.device) -> Components:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = resolve_model_folder(model, local_files_only=local_files_only)
    needed = ("unet", "text_encoder", "tokenizer", "scheduler") + (("vae",) if vae is VaeKind.KL and not vae_id else ())
    for sub in needed:
        if not os.path.isdir(os.path.join(root, sub)):
            raise ModelNotFoundError(f"{root!r} is not a diffusers Stable Diffusion folder: it has no {sub}/ "
                                     f"(expected unet/, text_encoder/, tokenizer/, scheduler/, vae/)")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype)
    if lora:
        _fuse_loras(unet, lora, local_files_only)
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype)
    tokenizer = ClipTokenizer(CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"))
    if vae is VaeKind.TINY:
        tiny_root = vae_id or ("madebyollin/taesdxl" if "xl" in model.lower() else "madebyollin/taesd")
        tiny_root = resolve_model_folder(tiny_root, local_files_only=local_files_only, subfolders=())
        vae_module = AutoencoderTiny.from_pretrained(tiny_root, torch_dtype=dtype)
    else:
        vae_module = AutoencoderKL.from_pretrained(vae_id or root, subfolder=None if vae_id else "vae",
                                                   torch_dtype=dtype)
    with open(os.path.join(root, "scheduler", "scheduler_config.json")) as f:
        sched_cfg = json.load(f)
    kind = SchedulerKind.TURBO if ("turbo" in model.lower() or sched_cfg.get("timestep_spacing") == "trailing"
                                   and sched_cfg.get("_class_name", "").startswith("Euler")) else SchedulerKind.LCM
    return Components(
        unet=_ready(unet.to(unet_device), dtype), vae=_ready(vae_module.to(device), dtype),
        text_encoder=_ready(text_encoder.to(device), dtype), tokenizer=tokenizer, scheduler=kind,
        scheduler_config=sched_cfg,
        default_size=int(unet.config.sample_size) * 2 ** (len(_vae_blocks(vae_module.config)) - 1),
        identity={"model": model, "folder": os.path.abspath(root), "vae": vae.value,
                  "vae_id": vae_id, "lora": [list(x) for x in lora]},
    )


def _fuse_loras(unet: torch.nn.Module, lora: tuple[tuple[str, float], ...], local_files_only: bool | None) -> None:
    """Fuse LoRA weights (for example latent-consistency/lcm-lora-sdv1-5) into the UNet. Needs peft."""
    try:
        import peft  # noqa: F401
        from diffusers.loaders import StableDiffusionLoraLoaderMixin
    except ImportError as exc:
        raise ConfigError("LoRA weights need the 'peft' package: pip install 'rtdiffusion[lora]'") from exc
    for i, (source, scale) in enumerate(lora):
        path = source if os.path.exists(source) else resolve_model_folder(
            source, local_files_only=local_files_only, subfolders=())
        state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(path)
        name = f"lora{i}"
        unet.load_lora_adapter(state_dict, network_alphas=alphas, prefix="unet", adapter_name=name)
        unet.fuse_lora(lora_scale=float(scale), adapter_names=[name])
        unet.unload_lora()
        log.info("fused LoRA %s at scale %.2f", source, scale)
