"""Engine configuration: frozen dataclasses and enums, validated in one place.

Two layers:
- :class:`EngineConfig` (here) is fixed for the life of an engine (model, resolution, device, dtype, backend),
  with the parsers of its arguments (device, dtype, threads, enums).
- :class:`StreamSettings` (``settings.py``) may change while frames run (prompt, seed, guidance, steps, filter,
  cache). Updates are validated when they arrive, on the caller's thread, and applied at the next frame
  boundary. Its names are re-exported here, so ``from rtdiffusion.config import StreamSettings`` keeps working.

Nothing in the frame loop compares strings: modes are enums, and mode choices become objects and
precomputed tensors when settings change (see ``guidance.py`` and ``schedule.py``).
"""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from .checks import finite as _finite
from .checks import parse_enum
from .errors import ConfigError
from .settings import (CONTROLNET_KEYS, UPDATE_KEYS, CacheSettings, CfgMode, ControlNetSettings,
                       FilterSettings, IPAdapterSettings, PromptBlend, PromptSpec, SeedSpec, StreamSettings,
                       apply_updates, check_cache_frames, update_controlnets, update_settings)
from .vocabulary import spell

__all__ = [  # the engine's config and parsers, and (from settings.py) the live settings
    "Backend", "CompilePreset", "CompileArtifacts", "VaeKind", "SchedulerKind", "EngineConfig", "parse_enum",
    "parse_dtype", "parse_device", "default_cpu_threads", "parse_threads", "set_cpu_threads",
    "CfgMode", "PromptBlend", "PromptSpec", "SeedSpec", "FilterSettings", "CacheSettings", "ControlNetSettings",
    "CONTROLNET_KEYS", "update_controlnets", "IPAdapterSettings", "StreamSettings", "UPDATE_KEYS", "apply_updates",
    "check_cache_frames", "update_settings",
]

log = logging.getLogger(__name__)


class Backend(enum.Enum):
    """How the networks and the frame step run (see ``engines``)."""

    AUTO = "auto"
    EAGER = "eager"
    GRAPH = "graph"
    COMPILED = "compiled"
    TRT = "trt"


class CompilePreset(enum.Enum):
    """Inductor settings of the 'compiled' backend (engines/compiled.py PRESETS)."""

    DEFAULT = "default"  # torch.compile's default mode: about a minute for an SD UNet
    FAST = "fast"  # + frozen weights, 1x1 convs as matmuls, fused q/k/v: longer compile, faster frames
    MAX = "max"  # + coordinate-descent kernel tuning: longest compile


class CompileArtifacts(enum.Enum):
    """What the 'compiled' backend compiles into (engines/compiled.py, engines/aoti.py)."""

    AUTO = "auto"  # JIT on CUDA (the measured path), AOTI on the CPU
    JIT = "jit"  # torch.compile; Inductor's own on-disk caches shorten (not skip) a restart's compile
    AOTI = "aoti"  # AOTInductor packages in the engine cache: a restart loads them and compiles nothing


class VaeKind(enum.Enum):
    TINY = "tiny"  # TAESD (AutoencoderTiny): about 2 ms a pass on an H200, the default
    KL = "kl"  # the model's own AutoencoderKL: higher fidelity, about 20x the FLOPs


class SchedulerKind(enum.Enum):
    LCM = "lcm"  # LCM boundary condition (SD 1.5 + LCM-LoRA / LCM models)
    TURBO = "turbo"  # x0 prediction with trailing timesteps (sd-turbo, sdxl-turbo)


_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def parse_dtype(value: Any, device: torch.device) -> torch.dtype:
    if value is None or value == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and value.lower() in _DTYPES:
        dtype = _DTYPES[value.lower()]
    else:
        raise ConfigError(f"{spell('dtype')} must be one of 'auto', 'float16', 'bfloat16', 'float32'; got {value!r}")
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError(f"{spell('dtype', 'float16')} needs a CUDA device; use {spell('dtype', 'float32')} or "
                          f"{spell('dtype', 'bfloat16')} on the CPU")
    return dtype


def parse_device(value: Any) -> torch.device:
    if value is None or value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{spell('device')} must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {value!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{spell('device')} must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{spell('device', value)} asked for, but torch sees no CUDA device "
                          f"(torch {torch.__version__}); use {spell('device', 'cpu')}")
    return device


def default_cpu_threads() -> int:
    """Torch threads for CPU inference when none are asked for: half the cores this process may use, at most 8.

    Torch's own default (every core) oversubscribes a machine that also runs TouchDesigner, a browser or
    other work: on a busy 2-core machine the eager engine was measured at 0.3 fps with torch's default and
    14-20 fps with one thread (issue 12). Half the cores leaves room for the rest of the show.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def parse_threads(value: Any) -> int | None:
    """``threads``: None or "auto" (None: the default rule, see :func:`default_cpu_threads`) or 1..1024."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
        raise ConfigError(f"{spell('threads')} must be 'auto' or an integer from 1 to 1024; got {value!r}")
    return value


def set_cpu_threads(device: torch.device, threads: int | None) -> None:
    """CPU inference: set torch's thread count (process-wide) to ``threads``, or with None to
    default_cpu_threads() unless the user set OMP_NUM_THREADS (torch follows it already). CUDA: untouched."""
    if device.type != "cpu" or (threads is None and os.environ.get("OMP_NUM_THREADS")):
        return
    n = default_cpu_threads() if threads is None else threads
    if torch.get_num_threads() != n:
        log.info("CPU inference on %d torch thread(s)%s", n, "" if threads else " (default: half the cores, "
                 "at most 8; set threads / --threads to change)")
        torch.set_num_threads(n)


@dataclass(frozen=True)
class EngineConfig:
    """What an engine is built for. Changing any of it means a new engine.

    width, height: output size in pixels; multiples of 8 (64 for the real UNets). Cost grows with area.
    frame_buffer_size: frames per UNet call (F). Raises throughput, adds F-1 frames of latency.
    dtype: float16 on GPUs (fast), float32 on the CPU (exact; the parity tests use it).
    backend: AUTO picks the fastest usable one and says why in the log and in status().
    vae: TINY (TAESD, default) or KL.
    """

    model: str
    width: int
    height: int
    device: torch.device
    dtype: torch.dtype
    backend: Backend = Backend.AUTO
    vae: VaeKind = VaeKind.TINY
    frame_buffer_size: int = 1
    num_inference_steps: int = 50
    scheduler: SchedulerKind | None = None  # None: the model's own
    max_vram_gb: float | None = None
    engine_dir: str | None = None  # on-disk engine cache; None: the default under the user's cache
    kv_max_frames: int = 4  # temporal KV cache banks hold up to this many earlier frames (memory grows with it)
    compile_preset: CompilePreset = CompilePreset.DEFAULT  # backend 'compiled' only
    compile_artifacts: CompileArtifacts = CompileArtifacts.AUTO  # backend 'compiled' only
    # TAESD encode of the next frames and decode of the previous ones run alongside the UNet (a parallel
    # branch of the captured frame): faster frames, each coming out 2 calls later (status latency_frames)
    vae_overlap: bool = False

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 8 or v > 4096 or v % 8:
                raise ConfigError(f"{spell(name)} must be a multiple of 8 between 8 and 4096 pixels; got {v!r}")
        if not isinstance(self.frame_buffer_size, int) or not 1 <= self.frame_buffer_size <= 16:
            raise ConfigError(f"{spell('frame_buffer_size')} must be an integer from 1 to 16; "
                              f"got {self.frame_buffer_size!r}")
        if not isinstance(self.num_inference_steps, int) or not 1 <= self.num_inference_steps <= 1000:
            raise ConfigError(f"num_inference_steps must be an integer from 1 to 1000; got {self.num_inference_steps!r}")
        if not isinstance(self.compile_preset, CompilePreset):
            object.__setattr__(self, "compile_preset", parse_enum(CompilePreset, self.compile_preset, "compile_preset"))
        if not isinstance(self.compile_artifacts, CompileArtifacts):
            object.__setattr__(self, "compile_artifacts",
                               parse_enum(CompileArtifacts, self.compile_artifacts, "compile_artifacts"))
        if not isinstance(self.vae_overlap, bool):
            raise ConfigError(f"vae_overlap must be True or False; got {self.vae_overlap!r}")
        if not isinstance(self.kv_max_frames, int) or not 1 <= self.kv_max_frames <= 16:
            raise ConfigError(f"kv_max_frames must be an integer from 1 to 16; got {self.kv_max_frames!r}")
        if self.max_vram_gb is not None and not (_finite(self.max_vram_gb) and self.max_vram_gb > 0):
            raise ConfigError(f"{spell('max_vram_gb')} must be a positive number of GiB; got {self.max_vram_gb!r}")
