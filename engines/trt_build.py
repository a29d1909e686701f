"""TensorRT engine build from an ONNX file and its ``NetworkSpec`` (TensorRT 10 Python API).

    onnx (cache entry) --OnnxParser--> INetworkDefinition
        + one IOptimizationProfile per spec profile (min/opt/max of every input, from the spec)
        + IBuilderConfig: fp16 (bf16/fp8/int8 where asked and allowed), builder optimisation level,
          workspace limit, timing cache, progress monitor
    --build_serialized_network--> engine.plan (a cache entry of its own)

Timing cache: one file per (TensorRT version, GPU capability) under ``<cache root>/timing/``, loaded before
each build and merged back after it under a lock, so later builds (another resolution, another LoRA) reuse
the kernel timings and take a fraction of the time.

Progress: TensorRT reports phases and steps through ``IProgressMonitor``; ``TqdmProgressMonitor`` shows
one tqdm bar per phase (nested bars for nested phases) on stderr.

Not run in this repository's CI: TensorRT is not installable there. Tested code paths stop at ONNX.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import file_lock, write_atomic
from .specs import NetworkSpec

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.plan"


class TensorRTUnavailable(RuntimeError):
    """tensorrt is not installed or cannot be imported; the message says how to get it."""


def import_tensorrt():
    """The ``tensorrt`` module, or TensorRTUnavailable with an install hint."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001
        raise TensorRTUnavailable(
            f"the TensorRT backend needs the tensorrt package (10.x) and a CUDA GPU; importing it failed "
            f"({type(exc).__name__}: {exc}). Install it with `pip install 'rtdiffusion[tensorrt]'` on a machine "
            "with an NVIDIA driver, or use --backend compiled / graph / eager") from exc
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTUnavailable(f"TensorRT 10 or later is needed; found {trt.__version__}")
    return trt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


@dataclass(frozen=True)
class TrtBuildOptions:
    """Builder settings. All of them are part of the engine's cache key.

    fp16: allow fp16 kernels (the default; about 2x fp32 speed on tensor cores).
    bf16: allow bf16 kernels (sm_80+). Rarely faster than fp16 for SD.
    fp8 / int8: allow FP8 (sm_89+) / INT8 kernels. They only matter for an ONNX graph with Q/DQ nodes
        (a quantised export); plain exports are unaffected. Asking on a GPU without support is an error.
    optimization_level: 0-5, TensorRT's builder optimisation level. 3 is TensorRT's default; 5 searches
        longest (much longer builds, sometimes a few % faster engines); lower builds faster.
    workspace_gb: cap on the builder's scratch memory pool (None: TensorRT's default, the whole GPU).
    timing_cache: reuse and update the persistent timing cache.
    """

    fp16: bool = True
    bf16: bool = False
    fp8: bool = False
    int8: bool = False
    optimization_level: int = 3
    workspace_gb: float | None = None
    timing_cache: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.optimization_level, int) or not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level must be an integer from 0 to 5; got {self.optimization_level!r}")
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise ValueError(f"workspace_gb must be a positive number of GiB; got {self.workspace_gb!r}")

    def key_fields(self) -> dict[str, Any]:
        """What changes the engine (``timing_cache`` does not)."""
        return {"fp16": self.fp16, "bf16": self.bf16, "fp8": self.fp8, "int8": self.int8,
                "optimization_level": self.optimization_level, "workspace_gb": self.workspace_gb}

    def check_gpu(self, capability: str) -> None:
        """ValueError if a requested precision is not supported by ``capability`` ('sm_90')."""
        sm = int(capability.removeprefix("sm_")) if capability.startswith("sm_") else 0
        need = {"fp8": 89, "bf16": 80, "int8": 61, "fp16": 53}
        for flag, min_sm in need.items():
            if getattr(self, flag) and sm < min_sm:
                raise ValueError(f"{flag} needs compute capability sm_{min_sm} or later; this GPU is {capability}. "
                                 f"Build without --{flag}")


class TqdmProgressMonitor:
    """Adapter from ``trt.IProgressMonitor`` callbacks to tqdm bars (created lazily: see ``make``).

    TensorRT calls it from several internal threads; a lock guards the bars.
    """

    @staticmethod
    def make(trt, title: str):
        from tqdm import tqdm

        class _Monitor(trt.IProgressMonitor):
            def __init__(self) -> None:
                trt.IProgressMonitor.__init__(self)
                self._bars: dict[str, Any] = {}
                self._lock = threading.Lock()
                self.cancelled = False

            def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
                with self._lock:
                    depth = 0
                    p = parent_phase
                    while p is not None and p in self._bars:
                        depth += 1
                        p = getattr(self._bars[p], "_rtd_parent", None)
                    bar = tqdm(total=num_steps, desc=f"{title}: {phase_name}" if depth == 0 else phase_name,
                               position=depth, leave=depth == 0, dynamic_ncols=True)
                    bar._rtd_parent = parent_phase
                    self._bars[phase_name] = bar

            def step_complete(self, phase_name: str, step: int) -> bool:
                with self._lock:
                    bar = self._bars.get(phase_name)
                    if bar is not None:
                        bar.update(step + 1 - bar.n)
                return not self.cancelled  # False asks TensorRT to cancel the build

            def phase_finish(self, phase_name: str) -> None:
                with self._lock:
                    bar = self._bars.pop(phase_name, None)
                    if bar is not None:
                        bar.close()

        return _Monitor()


class _Logger:
    """A trt.ILogger that forwards to Python logging and keeps the last error (for exception messages)."""

    @staticmethod
    def make(trt):
        levels = {trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR, trt.ILogger.Severity.ERROR: logging.ERROR,
                  trt.ILogger.Severity.WARNING: logging.WARNING, trt.ILogger.Severity.INFO: logging.DEBUG,
                  trt.ILogger.Severity.VERBOSE: logging.DEBUG}

        class _L(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.last_error = ""

            def clear(self) -> None:
                """Forget the last error: call before each TensorRT call whose failure quotes it, so a
                failure never quotes an older, unrelated error (the logger is process-wide)."""
                self.last_error = ""

            def log(self, severity, msg: str) -> None:
                level = levels.get(severity, logging.INFO)
                if level >= logging.ERROR:
                    self.last_error = msg
                log.log(level, "TensorRT: %s", msg)

        return _L()


_LOGGER = None


def trt_logger(trt):
    """One process-wide logger (TensorRT wants a single logger for builder and runtime)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = _Logger.make(trt)
    return _LOGGER


def timing_cache_path(cache_root: Path, trt_version: str, capability: str) -> Path:
    return Path(cache_root) / "timing" / f"trt{trt_version}-{capability}.cache"


def build_engine(onnx_path: str | os.PathLike, spec: NetworkSpec, engine_path: str | os.PathLike,
                 options: TrtBuildOptions, *, timing_cache: str | os.PathLike | None = None,
                 capability: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Build a serialised TensorRT engine for ``spec`` from ``onnx_path`` into ``engine_path``.

    Returns build facts for the cache manifest (seconds, engine bytes, profiles). Raises RuntimeError naming
    the ONNX file and TensorRT's last error when parsing or building fails; never exits.
    """
    trt = import_tensorrt()
    if capability is not None:
        options.check_gpu(capability)
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    got = [network.get_input(i).name for i in range(network.num_inputs)]
    if got != spec.input_names:
        raise RuntimeError(f"{onnx_path} has inputs {got}; spec {spec.name!r} expects {spec.input_names}")

    config = builder.create_builder_config()
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.bf16:
        config.set_flag(trt.BuilderFlag.BF16)
    if options.fp8:
        config.set_flag(trt.BuilderFlag.FP8)
    if options.int8:
        config.set_flag(trt.BuilderFlag.INT8)
    config.builder_optimization_level = options.optimization_level
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))

    for i in range(len(spec.profiles)):
        profile = builder.create_optimization_profile()
        for name, (lo, mid, hi) in spec.profile_shapes(i).items():
            profile.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(profile)

    monitor = None
    if progress:
        monitor = TqdmProgressMonitor.make(trt, f"TensorRT {spec.name}")
        config.progress_monitor = monitor

    tc_path = Path(timing_cache) if (timing_cache and options.timing_cache) else None
    blob = tc_path.read_bytes() if tc_path is not None and tc_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("building TensorRT engine %s from %s (%s, %d profile(s); this takes minutes for a UNet)",
             spec.name, onnx_path, ", ".join(k for k, v in options.key_fields().items() if v is True) or "fp32",
             len(spec.profiles))
    t0 = time.monotonic()
    logger.clear()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.monotonic() - t0
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {spec.name} from {onnx_path}: "
                           f"{logger.last_error or 'no error message (see the log above)'}")
    write_atomic(Path(engine_path), memoryview(serialized).tobytes())

    if tc_path is not None:
        _merge_timing_cache(trt, config, tc_path)
    log.info("built %s in %.0f s (%.1f MB)", engine_path, seconds, serialized.nbytes / 1e6)
    del monitor
    return {"build_seconds": round(seconds, 1), "engine_bytes": int(serialized.nbytes),
            "profiles": [spec.profile_shapes(i) for i in range(len(spec.profiles))]}


def _merge_timing_cache(trt, config, path: Path) -> None:
    """Combine this build's timings with what other builders saved meanwhile, then write atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock"), "the TensorRT timing cache"):
        ours = config.get_timing_cache()
        if path.is_file():
            theirs = config.create_timing_cache(path.read_bytes())
            ours.combine(theirs, True)
        write_atomic(path, memoryview(ours.serialize()).tobytes())
