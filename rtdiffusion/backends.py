"""Pick and build the backend: which networks run, and how the frame step is launched.

    backend    networks                          launch
    eager      torch modules                     Python, kernel by kernel (CPU or GPU)
    graph      torch modules                     one CUDA graph per layout, replayed
    compiled   Inductor-compiled UNet and VAE    one CUDA graph per layout, replayed (Python on the CPU)
               (torch.compile, or AOTInductor
               packages in the engine cache)
    trt        TensorRT engines (engines/trt_*)  one CUDA graph per layout, replayed

``auto`` picks the fastest usable one and returns the reason, which the engine logs and reports.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from engines.base import TorchNetworks

from . import progress

from .config import Backend, CompileArtifacts, EngineConfig
from .executors import EagerExecutor, GraphExecutor
from .models.loading import Components
from .vocabulary import spell

log = logging.getLogger(__name__)


def tensorrt_usable() -> tuple[bool, str]:
    """(whether a supported TensorRT is installed, why not); engines/trt_caps.py decides what is supported."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt package is not installed (pip install 'rtdiffusion[tensorrt]')"
    from engines.trt_caps import installed_caps

    caps, why = installed_caps()
    if caps is None or caps.problem:
        return False, why
    return True, why


def choose_backend(config: EngineConfig) -> tuple[Backend, str]:
    """The backend to use and why (for the log and status())."""
    requested = config.backend
    cuda = config.device.type == "cuda"
    if config.max_vram_gb is not None and cuda:
        if requested is Backend.AUTO:
            return Backend.GRAPH, "auto: low-VRAM weight streaming (max_vram_gb) runs with the graph backend"
        if requested in (Backend.COMPILED, Backend.TRT):
            raise_config(f"{spell('max_vram_gb')} (low-VRAM weight streaming) works with {spell('backend', 'eager')} "
                         f"or {spell('backend', 'graph')}; got {spell('backend', requested.value)}")
    if requested is Backend.AUTO:
        if not cuda:
            return Backend.EAGER, "auto: no CUDA device, so eager (CUDA graphs, compile and TensorRT need one)"
        trt_ok, trt_why = tensorrt_usable()
        if trt_ok:
            return Backend.TRT, f"auto: CUDA device and {trt_why}"
        if importlib.util.find_spec("triton") is not None:
            return Backend.COMPILED, (f"auto: CUDA device without a usable TensorRT ({trt_why}); torch.compile'd networks in a "
                                      "whole-frame CUDA graph are the fastest measured (H200 sd-turbo 512: "
                                      "6.3 ms vs 9.7 ms for 'graph'), at the price of about 90 s of "
                                      "compile on a first start (about 35 s on restarts, cached on disk); use "
                                      "'graph' to start fast")
        return Backend.GRAPH, f"auto: CUDA device without a usable TensorRT ({trt_why}) or Triton; whole-frame CUDA graph"
    if requested in (Backend.GRAPH, Backend.TRT) and not cuda:
        raise_config(f"{spell('backend', requested.value)} needs a CUDA device; use {spell('backend', 'eager')}, "
                     f"{spell('backend', 'compiled')} or {spell('backend', 'auto')} on the CPU")
    if requested is Backend.TRT:
        trt_ok, trt_why = tensorrt_usable()
        if not trt_ok:
            raise_config(f"{spell('backend', 'trt')} needs TensorRT 10.1+ or 11.x: {trt_why}; use "
                         f"{spell('backend', 'graph')} or {spell('backend', 'compiled')} without it")
    if requested is Backend.COMPILED:
        check_aoti_on_cuda(config.compile_artifacts, config.device)
    return requested, f"{requested.value}: asked for"


# Loading an AOTInductor package on CUDA crashed the process (segfault inside aoti_load_package) on the
# H200 with torch 2.11 / CUDA 13, cold and on restart, on one- and two-GPU machines (BENCHMARKS.md, issue 17
# start-up). Until that is understood, CUDA + aoti is refused with this reason instead of crashing; setting
# RTDIFFUSION_AOTI_CUDA=1 lifts the refusal for whoever is debugging it.
AOTI_CUDA_ENV = "RTDIFFUSION_AOTI_CUDA"
AOTI_CUDA_REFUSED = ("AOTInductor packages on CUDA are disabled: loading one crashed the process (segfault in "
                     "aoti_load_package) on an H200 with torch 2.11 / CUDA 13 (BENCHMARKS.md); use {jit} (the "
                     "default on CUDA), or set " + AOTI_CUDA_ENV + "=1 to try anyway")


def check_aoti_on_cuda(artifacts: CompileArtifacts, device: torch.device) -> None:
    """ConfigError for AOTInductor packages on CUDA unless RTDIFFUSION_AOTI_CUDA=1 (see AOTI_CUDA_REFUSED)."""
    if artifacts is CompileArtifacts.AOTI and device.type == "cuda" and os.environ.get(AOTI_CUDA_ENV) != "1":
        raise_config(AOTI_CUDA_REFUSED.format(jit=spell("compile_artifacts", "jit")))


def compile_artifacts(config: EngineConfig) -> CompileArtifacts:
    """AUTO: torch.compile on CUDA (the measured path), AOTInductor packages on the CPU."""
    if config.compile_artifacts is not CompileArtifacts.AUTO:
        return config.compile_artifacts
    return CompileArtifacts.JIT if config.device.type == "cuda" else CompileArtifacts.AOTI


def raise_config(msg: str) -> None:
    from .errors import ConfigError

    raise ConfigError(msg)


def prepare_cuda_modules(comps: Components) -> None:
    """How every CUDA backend runs the torch modules (also what `rtdiffusion build` compiles)."""
    # NHWC convolutions: measured 25% faster for graph, 10% for compiled (H200, fp16, 512x512)
    comps.unet.to(memory_format=torch.channels_last)
    comps.vae.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True  # fixed shapes per layout: let cuDNN pick its fastest kernels


# The UNet batch range TensorRT engines are built for: 1..4 steps in any CFG mode (the engine and
# `rtdiffusion build` must agree, or an ahead-of-time build is never found in the cache).
TRT_MIN_STEPS, TRT_MAX_STEPS, TRT_GUIDANCE = 1, 4, "full"


def build_executor(config: EngineConfig, comps: Components, controlnets: tuple[torch.nn.Module, ...] = (),
                   stage=progress.NO_STAGE):
    """The executor and its networks for ``config``; ``controlnets``: the engine's ControlNet modules, which
    the TensorRT backend builds engines of (the torch backends get them later, by ``attach_controlnets``).
    stage: the build-progress hook (``BuildProgress.stage``) around the networks' builds and loads."""
    backend, reason = choose_backend(config)
    if config.device.type == "cuda" and config.max_vram_gb is None:
        prepare_cuda_modules(comps)
    torch_nets = TorchNetworks(comps.unet, comps.vae)
    ov = config.vae_overlap  # the main stage's shape (executors.py), the same for every backend
    if backend is Backend.EAGER:
        return EagerExecutor(torch_nets, overlap=ov), reason
    if backend is Backend.GRAPH:
        return GraphExecutor(torch_nets, "graph", overlap=ov), reason
    if backend is Backend.COMPILED:
        from engines.cache import EngineCache
        from engines.compiled import compiled_networks

        artifacts = compile_artifacts(config)
        nets = compiled_networks(comps.unet, comps.vae, preset=config.compile_preset.value,
                                 aoti=artifacts is CompileArtifacts.AOTI, cache=EngineCache(config.engine_dir),
                                 model=config.model, identity=comps.identity, stage=stage)
        reason = f"{reason}; compile artifacts: {artifacts.value}"
        if config.device.type != "cuda":  # no CUDA graphs: the compiled calls are launched from Python
            return EagerExecutor(nets, "compiled", overlap=ov), reason
        return GraphExecutor(nets, "compiled", overlap=ov), reason
    try:
        with stage(progress.TRT):
            nets = trt_networks(config, comps, controlnets=controlnets)
        return GraphExecutor(nets, "trt", overlap=ov), reason
    except Exception as exc:  # a failed build must not take the engine down: fall back, loudly
        log.warning("TensorRT engines could not be built or loaded (%s: %s); falling back to 'graph'",
                    type(exc).__name__, exc)
        return GraphExecutor(torch_nets, "graph", overlap=ov), f"{reason}; FALLBACK to graph: trt failed: {exc}"


def trt_networks(config: EngineConfig, comps: Components, min_steps: int = TRT_MIN_STEPS,
                 max_steps: int = TRT_MAX_STEPS, controlnets: tuple[torch.nn.Module, ...] = ()):
    """TensorRT engines for UNet, VAE encoder and decoder, from the engine cache or built now (minutes).

    The UNet profile covers 1..4 steps with any CFG mode, so switching steps or guidance needs no rebuild.
    Engines are strongly typed: their precision is the modules' dtype (fp16, bf16 or fp32 engines).
    Written against the TensorRT 10.1+ and 11.x Python APIs; not run here (no TensorRT could be installed).
    """
    from engines.cache import EngineCache
    from engines.specs import AxisRange, SpecParams, unet_batch_range
    from engines.trt_runtime import load_or_build_trt
    from engines.versions import lora_identity

    if next(comps.vae.parameters()).dtype != next(comps.unet.parameters()).dtype:
        raise_config("TensorRT engines run the VAE in the UNet's dtype, but this model's KL VAE runs in float32 "
                     f"(SDXL's stock VAE overflows in float16): use {spell('vae', 'tiny')}, the fp16-fix VAE "
                     f"({spell('vae_id', 'madebyollin/sdxl-vae-fp16-fix')}), or {spell('backend', 'compiled')} / "
                     f"{spell('backend', 'graph')}")
    F = config.frame_buffer_size
    params = SpecParams.from_modules(comps.unet, comps.vae, config.width, config.height,
                                     batch=unet_batch_range(min_steps, max_steps, F, TRT_GUIDANCE),
                                     frames=AxisRange(F, F, F), dtype=config.dtype,
                                     ip_tokens=int(comps.identity.get("ip_tokens", 0)),  # IP-Adapter
                                     controlnets=controlnets)  # the UNet's residual inputs, controlnet_<i> engines
    lora = lora_identity([tuple(x) for x in comps.identity.get("lora", [])]) if comps.identity.get("lora") else ()
    return load_or_build_trt(comps.unet, comps.vae, params, EngineCache(config.engine_dir), model=config.model,
                             lora=lora, device=config.device, controlnets=controlnets)
