"""``StreamEngine.from_pretrained``: its arguments checked, the model loaded, the engine built.

Every argument is parsed before anything loads (a typo fails in milliseconds); then the model, the
IP-Adapter and the ControlNets load and the engine class is called with them. The engine module binds
``from_pretrained`` here as its classmethod.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from . import control
from .backends import choose_backend
from .config import (Backend, EngineConfig, SchedulerKind, VaeKind, parse_device, parse_dtype, parse_enum,
                     parse_threads, set_cpu_threads)
from .control import ip_adapter as ip_adapter_mod
from .models.loading import check_size_early, load_components
from .progress import LOAD, BuildProgress, NoProgress, plan_build
from .settings import (CacheSettings, FilterSettings, PromptSpec, SeedSpec, StreamSettings, apply_updates,
                       check_cache_frames)

if TYPE_CHECKING:
    from .engine import StreamEngine


def from_pretrained(cls, model: str, *, width: int | None = None, height: int | None = None,
                    strength: float | None = None, steps: int | None = None, t_index_list=None,
                    cfg: Any = "none", guidance_scale: float = 1.2, delta: float = 1.0,
                    device: Any = "auto", dtype: Any = "auto", seed: Any = 2, backend: Any = "auto",
                    vae: Any = "tiny", frame_buffer_size: int = 1, num_inference_steps: int = 50,
                    scheduler: Any = None, prompt: Any = "", negative_prompt: str = "",
                    prompt_method: Any = "linear", similar_filter: bool = False,
                    similar_threshold: float = 0.98, similar_max_skip: int = 10,
                    max_vram_gb: float | None = None, engine_dir: str | None = None,
                    lora: tuple = (), vae_id: str | None = None, local_files_only: bool | None = None,
                    model_seed: int = 0, graph_cache_size: int = 4, kv_max_frames: int = 4,
                    cache_enabled: bool = False, cache_maxframes: int = 1,
                    cache_interval: int = 1, compile_preset: str = "default",
                    compile_artifacts: str = "auto", threads: int | None = None, ip_adapter: Any = None,
                    vae_overlap: bool = False, controlnets: Any = (),
                    progress: BuildProgress | None = None) -> "StreamEngine":
    """Load ``model`` (hub id, local diffusers folder, one ``.safetensors`` checkpoint, or
    ``random:sd-turbo|sd15|sdxl-turbo|sdxl|tiny|tiny-sdxl``) and prepare. Width and height default to the
    model's own size (512 for sd-turbo and SDXL-Turbo, 1024 for SDXL base).

    Every argument is checked before the model loads, so a typo fails in milliseconds.
    ip_adapter: {"model": "random:ip-adapter-sd15" | a .bin / .safetensors file, "image_encoder": folder or
    hub id, "scale": 0.6, "enabled": True} (rtdiffusion/control/ip_adapter.py); style images come with
    set_style_image(), scale and on/off with update(ip_adapter_scale=, ip_adapter_enabled=).
    strength (0 keeps the input, 1 restyles fully) and steps (denoising steps per frame) are the friendly
    form of t_index_list (rtdiffusion/vocabulary.py); give one form or the other. Default: strength 0.35,
    1 step, which is t_index_list [32]. threads: torch threads for CPU inference (None: half the cores,
    at most 8; process-wide, set here only when the device is the CPU). vae_overlap: run the TAESD encode
    of each call's frames and the decode of the previous call's results next to the UNet, on a parallel
    branch of the captured frame: faster frames (BENCHMARKS.md, issue 17), each coming out 2 calls later
    (status()["latency_frames"] counts them). controlnets: ControlNets, each a dict (model, preprocessor,
    scale, start, end, enabled, preprocessor_options), a ControlNetSpec or a model name (rtdiffusion/control).
    progress: a BuildProgress (rtdiffusion/progress.py) told each stage of the build, up to the first frame.
    """
    dev = parse_device(device)
    set_cpu_threads(dev, parse_threads(threads))
    dt = parse_dtype(dtype, dev)
    be = parse_enum(Backend, backend, "backend")
    vk = parse_enum(VaeKind, vae, "vae")
    sk = None if scheduler is None else parse_enum(SchedulerKind, scheduler, "scheduler")
    # validate sizes early with a provisional config (the model may supply the default size)
    early = EngineConfig(model, _given(width, 512), _given(height, 512), dev, dt, be, vk, frame_buffer_size,
                         num_inference_steps, sk, max_vram_gb, engine_dir, kv_max_frames,
                         compile_preset, compile_artifacts, vae_overlap=vae_overlap)
    chosen, _ = choose_backend(early)
    settings = apply_updates(StreamSettings(
        prompt=PromptSpec.parse(prompt, prompt_method, negative_prompt), seed=SeedSpec.parse(seed),
        filter=FilterSettings(similar_filter, similar_threshold, similar_max_skip),
        cache=CacheSettings(cache_enabled, cache_maxframes, cache_interval)),
        num_inference_steps, strength=strength, steps=steps, t_index_list=t_index_list, cfg=cfg,
        guidance_scale=guidance_scale, delta=delta)
    check_cache_frames(settings, kv_max_frames)
    ip_spec = None if ip_adapter is None else ip_adapter_mod.IPAdapterSpec.parse(ip_adapter)
    if ip_spec is not None:
        ip_adapter_mod.check_family_early(ip_spec, model)  # random: models: before building
        settings = dataclasses.replace(settings, ip_adapter=ip_spec.settings())
    specs = control.parse_specs(controlnets)
    low_vram = max_vram_gb is not None and dev.type == "cuda"
    check_size_early(model, width, height, vk)  # random: models: a wrong size fails before building
    progress = progress if progress is not None else NoProgress()
    plan_build(progress, early, chosen.value, load=True, width=width, height=height, vae_id=vae_id,
               lora=[list(x) for x in lora], controlnets=[[c.model, str(c.preprocessor)] for c in specs],
               ip_adapter=None if ip_spec is None else [ip_spec.model, ip_spec.image_encoder])
    with progress.stage(LOAD):  # the model, then the IP-Adapter's image encoder and the ControlNets
        comps = load_components(model, dev, dt, vk, seed=model_seed, vae_id=vae_id, lora=tuple(lora),
                                local_files_only=local_files_only,
                                unet_device=torch.device("cpu") if low_vram else None)
        ip = None if ip_spec is None else ip_adapter_mod.load(ip_spec, comps, dev, dt, seed=model_seed,
                                                            local_files_only=local_files_only)
        size = comps.default_size
        config = EngineConfig(model, _given(width, size), _given(height, size), dev, dt, be, vk, frame_buffer_size,
                              num_inference_steps, sk, max_vram_gb, engine_dir, kv_max_frames, compile_preset,
                              compile_artifacts, vae_overlap=vae_overlap)
        stack = control.make_control(specs, comps, config, seed=model_seed, local_files_only=local_files_only)
    return cls(config, comps, settings, ip_adapter=ip, graph_cache_size=graph_cache_size, controlnets=stack,
               progress=progress)


def _given(value: Any, default: int) -> Any:
    """``default`` only when ``value`` is None: a 0 width is an error (EngineConfig says so), not "the default"."""
    return default if value is None else value

