"""Build the networks an engine needs: from the hub / a local diffusers folder, one ``.safetensors``
checkpoint in the original layout (``single_file.py``), or ``random:<arch>``. What differs between SD 1.5,
SD 2.1 and SDXL is data in ``families.py``.

``random:sd-turbo``, ``random:sd15``, ``random:sdxl-turbo``, ``random:sdxl`` (SDXL base, 1024 px, LCM) and the
CPU-test ``random:tiny`` / ``random:tiny-sdxl`` are the exact published architectures (configs in ``configs/``,
copied from the project's shared model configs; the families and their configs are ``families.py``) with
seeded random weights and a locally made tokenizer. They exist for benchmarks, tests and demos without downloads: their pictures are noise-like and
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
from ..vocabulary import spell
from .families import RANDOM_ARCHS, ModelFamily, family_of
from .random_init import SCHEME as RANDOM_INIT
from .random_init import seeded_build
from .single_file import is_single_file
from .text import ClipText, DualClipText, TextStack
from .tokenizer import ClipTokenizer, HashTokenizer, Tokenizer

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"


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
    family: ModelFamily | None = None  # None: read from the UNet's config
    text_encoder_2: torch.nn.Module | None = None  # SDXL's OpenCLIP bigG (with projection)
    tokenizer_2: Tokenizer | None = None

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = family_of(self.unet.config)
        if (self.text_encoder_2 is None) != (self.family.text_encoders == 1):
            raise ConfigError(f"a {self.family.name.value} model needs {self.family.text_encoders} text encoder(s)")
        self._text: TextStack | None = None

    @property
    def text(self) -> TextStack:
        """Tokenizers and text encoders behind one call (``models/text.py``), made once."""
        if self._text is None:
            self._text = (ClipText(self.text_encoder, self.tokenizer) if self.text_encoder_2 is None else
                          DualClipText(self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2))
        return self._text

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(_vae_blocks(self.vae.config)) - 1)

    @property
    def latent_scaling(self) -> float:
        return float(self.vae.config.get("scaling_factor", 1.0))


def size_multiple(unet_config, vae_config) -> int:
    """Pixels a frame's width and height must be a multiple of: the VAE's scale times the UNet's downsampling."""
    return 2 ** (len(_vae_blocks(vae_config)) - 1) * 2 ** (len(unet_config["down_block_types"]) - 1)


def check_size_early(model: str, width: int | None, height: int | None, vae: VaeKind) -> None:
    """For ``random:`` models, reject a frame size the architecture cannot take before building anything
    (the engine checks every model again once loaded)."""
    arch = RANDOM_ARCHS.get(model[len(RANDOM_PREFIX):]) if isinstance(model, str) and model.startswith(RANDOM_PREFIX) else None
    if arch is None:
        return
    multiple = size_multiple(read_config(arch.unet), read_config(arch.taesd if vae is VaeKind.TINY else arch.vae_kl))
    check_size(model, width, height, multiple)


def check_size(model: str, width: int | None, height: int | None, multiple: int) -> None:
    """ConfigError naming the first of width / height (None: not given) that is not a multiple of ``multiple``."""
    for name, v in (("width", width), ("height", height)):
        if v is not None and v % multiple:
            raise ConfigError(f"{spell(name)} must be a multiple of {multiple} pixels for {model}; got {v}")


def _vae_blocks(cfg) -> list:
    return cfg.get("encoder_block_out_channels") or cfg.get("block_out_channels")


def load_components(model: str, device: torch.device, dtype: torch.dtype, vae: VaeKind = VaeKind.TINY,
                    *, seed: int = 0, vae_id: str | None = None,
                    lora: tuple[tuple[str, float], ...] = (), local_files_only: bool | None = None,
                    unet_device: torch.device | None = None) -> Components:
    """Load ``model`` (a hub id, a local diffusers folder, a .safetensors file or ``random:<arch>``) onto
    ``device`` in ``dtype``.

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
    if model.lower().endswith((".ckpt", ".pt", ".pth", ".bin")):
        raise ConfigError(f"{model!r}: single-file checkpoints are loaded from .safetensors only (a pickled "
                          "checkpoint can run code when loaded); convert it to .safetensors or a diffusers folder")
    if is_single_file(model):
        return _single_file_components(model, device, dtype, vae, vae_id, lora, local_files_only, unet_device)
    return _pretrained_components(model, device, dtype, vae, vae_id, lora, local_files_only, unet_device)


def _single_file_components(path: str, device: torch.device, dtype: torch.dtype, vae: VaeKind,
                            vae_id: str | None, lora: tuple[tuple[str, float], ...],
                            local_files_only: bool | None, unet_device: torch.device) -> Components:
    from diffusers import AutoencoderKL

    from .single_file import load_single_file

    parts = load_single_file(path, device, dtype, vae, vae_id, local_files_only, unet_device)
    family, arch = parts["family"], parts["arch"]
    if lora:
        _fuse_loras(parts["unet"], lora, local_files_only)
    vae_dtype = _vae_dtype(family, vae, dtype, vae_id)
    if vae is VaeKind.TINY:
        vae_module = load_taesd(vae_id or family.taesd_repo, vae_dtype, local_files_only)
    else:
        vae_module = parts["vae"] or AutoencoderKL.from_pretrained(vae_id, torch_dtype=vae_dtype)
    encoders, toks = parts["text_encoders"], parts["tokenizers"]
    two = len(encoders) == 2
    return Components(
        unet=_ready(parts["unet"], dtype), vae=_ready(vae_module.to(device), vae_dtype),
        text_encoder=_ready(encoders[0], dtype), tokenizer=toks[0], scheduler=arch.scheduler,
        scheduler_config=read_config(arch.scheduler_config), default_size=arch.default_size,
        identity={"model": path, "file": os.path.abspath(path), "vae": vae.value, "vae_id": vae_id,
                  "lora": [list(x) for x in lora]},
        family=family, text_encoder_2=_ready(encoders[1], dtype) if two else None,
        tokenizer_2=toks[1] if two else None,
    )


def _random_components(arch_name: str, device: torch.device, dtype: torch.dtype, vae: VaeKind,
                       seed: int, unet_device: torch.device) -> Components:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    arch = RANDOM_ARCHS.get(arch_name)
    if arch is None:
        raise ConfigError(f"unknown random model {RANDOM_PREFIX + arch_name!r}; expected one of "
                          f"{', '.join(RANDOM_PREFIX + k for k in RANDOM_ARCHS)}")
    log.info("building %s%s with seeded random weights (noise-like output, for speed and tests only)",
             RANDOM_PREFIX, arch_name)
    # seeded_build: the initialisers' distributions, drawn fast and once per tensor on the CPU (random_init.py)
    with seeded_build(seed, device, "unet"), torch.device(unet_device):
        unet = UNet2DConditionModel.from_config({**_strip(read_config(arch.unet)), **arch.unet_overrides})
    with seeded_build(seed + 1, device, "vae+text_encoders"), torch.device(device):
        if vae is VaeKind.TINY:
            vae_module = AutoencoderTiny.from_config(_strip(read_config(arch.taesd)))
        else:
            vae_module = AutoencoderKL.from_config(_strip(read_config(arch.vae_kl)))
        encoders = [_text_model(read_config(name), i) for i, name in enumerate(arch.text_encoders)]
    two = len(encoders) == 2
    # SDXL pools the second encoder at the highest token id: make that EOS, as in CLIP's vocabulary
    tokenizers = [HashTokenizer(int(e.config.vocab_size), int(e.config.max_position_embeddings),
                                **({"eos": int(e.config.vocab_size) - 1} if two else {})) for e in encoders]
    return Components(
        unet=_ready(unet, dtype), vae=_ready(vae_module, _vae_dtype(arch.family, vae, dtype, None)),
        text_encoder=_ready(encoders[0], dtype), tokenizer=tokenizers[0], scheduler=arch.scheduler,
        scheduler_config=read_config(arch.scheduler_config), default_size=arch.default_size,
        identity={"model": RANDOM_PREFIX + arch_name, "seed": seed, "vae": vae.value, "lora": [],
                  "weights_init": RANDOM_INIT},
        family=arch.family, text_encoder_2=_ready(encoders[1], dtype) if two else None,
        tokenizer_2=tokenizers[1] if two else None,
    )


def _text_model(cfg: dict[str, Any], index: int) -> torch.nn.Module:
    """CLIPTextModel, or CLIPTextModelWithProjection for a config that names it (SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in cfg.get("architectures", ()) else CLIPTextModel
    return cls(CLIPTextConfig(**_strip(cfg)))


def _vae_dtype(family: ModelFamily, vae: VaeKind, dtype: torch.dtype, vae_id: str | None) -> torch.dtype:
    """The dtype the VAE runs in: fp32 for a KL VAE that overflows in fp16 (SDXL's stock VAE; not the
    fp16-fix VAE), the engine's dtype otherwise. ``engines.base.TorchNetworks`` casts around it."""
    if vae is VaeKind.TINY or dtype != torch.float16 or family.kl_vae_fp16_safe:
        return dtype
    if vae_id and "fp16-fix" in vae_id.lower():
        return dtype
    log.info("the %s KL VAE overflows in float16: it runs in float32 (pass vae_id=%r to run it in float16, or "
             "use the default TAESD)", family.name.value, family.fp16_fix_vae)
    return torch.float32


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


_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler", "vae")


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
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = resolve_model_folder(model, local_files_only=local_files_only)
    unet_cfg = os.path.join(root, "unet", "config.json")
    if not os.path.isfile(unet_cfg):
        raise ModelNotFoundError(f"{root!r} is not a diffusers Stable Diffusion folder: it has no unet/config.json")
    with open(unet_cfg) as f:
        family = family_of(json.load(f))
    needed = family.folder_parts + (("vae",) if vae is VaeKind.KL and not vae_id else ())
    for sub in needed:
        if not os.path.isdir(os.path.join(root, sub)):
            raise ModelNotFoundError(f"{root!r} is not a diffusers {family.name.value} folder: it has no {sub}/ "
                                     f"(expected {', '.join(p + '/' for p in needed)})")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype)
    if lora:
        _fuse_loras(unet, lora, local_files_only)
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype)
    tokenizer = ClipTokenizer(CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"))
    text_encoder_2 = tokenizer_2 = None
    if family.text_encoders == 2:
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2",
                                                                     torch_dtype=dtype).to(device)
        tokenizer_2 = ClipTokenizer(CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2"))
    vae_dtype = _vae_dtype(family, vae, dtype, vae_id)
    if vae is VaeKind.TINY:
        vae_module = load_taesd(vae_id or family.taesd_repo, vae_dtype, local_files_only)
    else:
        vae_module = AutoencoderKL.from_pretrained(vae_id or root, subfolder=None if vae_id else "vae",
                                                   torch_dtype=vae_dtype)
    with open(os.path.join(root, "scheduler", "scheduler_config.json")) as f:
        sched_cfg = json.load(f)
    return Components(
        unet=_ready(unet.to(unet_device), dtype), vae=_ready(vae_module.to(device), vae_dtype),
        text_encoder=_ready(text_encoder.to(device), dtype), tokenizer=tokenizer,
        scheduler=scheduler_kind(model, sched_cfg), scheduler_config=sched_cfg,
        default_size=int(unet.config.sample_size) * 2 ** (len(_vae_blocks(vae_module.config)) - 1),
        identity={"model": model, "folder": os.path.abspath(root), "vae": vae.value,
                  "vae_id": vae_id, "lora": [list(x) for x in lora]},
        family=family, text_encoder_2=None if text_encoder_2 is None else _ready(text_encoder_2, dtype),
        tokenizer_2=tokenizer_2,
    )


def load_taesd(source: str, dtype: torch.dtype, local_files_only: bool | None) -> torch.nn.Module:
    from diffusers import AutoencoderTiny

    folder = resolve_model_folder(source, local_files_only=local_files_only, subfolders=())
    return AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype)


def scheduler_kind(model: str, sched_cfg: dict[str, Any]) -> SchedulerKind:
    """TURBO for sd-turbo / sdxl-turbo (Euler or Euler ancestral with trailing spacing), LCM otherwise."""
    euler = sched_cfg.get("_class_name", "").startswith("Euler")
    return (SchedulerKind.TURBO if "turbo" in model.lower() or (euler and sched_cfg.get("timestep_spacing") == "trailing")
            else SchedulerKind.LCM)


def _fuse_loras(unet: torch.nn.Module, lora: tuple[tuple[str, float], ...], local_files_only: bool | None) -> None:
    """Fuse LoRA weights (latent-consistency/lcm-lora-sdv1-5, lcm-lora-sdxl, ...) into the UNet. Needs peft.

    A LoRA whose layers do not fit this UNet (made for another family, say an SD 1.5 LoRA on SDXL) is a
    ConfigError naming the first layer that differs, before anything is changed."""
    try:
        import peft  # noqa: F401
        from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    except ImportError as exc:
        raise ConfigError("LoRA weights need the 'peft' package: pip install 'rtdiffusion[lora]'") from exc
    family = family_of(unet.config)
    loader = StableDiffusionXLLoraLoaderMixin if family.text_encoders == 2 else StableDiffusionLoraLoaderMixin
    for i, (source, scale) in enumerate(lora):
        path = source if os.path.exists(source) else resolve_model_folder(
            source, local_files_only=local_files_only, subfolders=())
        state_dict, alphas = loader.lora_state_dict(path)
        check_lora_fits(unet, state_dict, source, family)
        name = f"lora{i}"
        unet.load_lora_adapter(state_dict, network_alphas=alphas, prefix="unet", adapter_name=name)
        unet.fuse_lora(lora_scale=float(scale), adapter_names=[name])
        unet.unload_lora()
        log.info("fused LoRA %s at scale %.2f", source, scale)


_LORA_DOWN = (".lora.down.weight", ".lora_A.weight", ".lora_down.weight")


def check_lora_fits(unet: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                    family: ModelFamily) -> None:
    """Every UNet layer the LoRA adapts must exist here and take inputs of the LoRA's width."""
    modules = dict(unet.named_modules())
    checked = 0
    for key, w in state_dict.items():
        marker = next((m for m in _LORA_DOWN if key.endswith(m)), None)
        if marker is None or not key.startswith("unet."):
            continue  # text-encoder layers, alphas, magnitudes: not fused into the UNet
        target = key[len("unet."):-len(marker)].replace(".processor", "")
        for suffix in ("_lora", ""):  # attention-processor style names: to_q_lora -> to_q
            if target.endswith(suffix) and target[: len(target) - len(suffix)] in modules:
                target = target[: len(target) - len(suffix)]
                break
        module = modules.get(target)
        width = getattr(module, "in_features", None) or getattr(module, "in_channels", None)
        checked += 1
        if module is None or width != int(w.shape[1]):
            what = ("has no layer " + repr(target) if module is None else
                    f"layer {target!r} takes {width} inputs but the LoRA's takes {int(w.shape[1])}")
            raise ConfigError(f"LoRA {source!r} does not fit this {family.name.value} UNet: {what}. It was "
                              "made for another model family (an SD 1.5 LoRA on an SDXL model, say); use a LoRA "
                              f"trained for {family.name.value} (for LCM: latent-consistency/lcm-lora-"
                              f"{'sdxl' if family.text_encoders == 2 else 'sdv1-5'})")
    if not checked:
        log.warning("LoRA %s: no UNet layers recognised to check; fusing as diffusers reads it", source)
