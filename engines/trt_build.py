"""TensorRT engine build from an ONNX file and its ``NetworkSpec`` (TensorRT 10.1+ and 11.x Python API).

    onnx (cache entry) --OnnxParser--> INetworkDefinition, strongly typed (``trt_caps``: the
        STRONGLY_TYPED creation flag on 10.x, always on 11.x)
        + one IOptimizationProfile per spec profile (min/opt/max of every dynamic input, from the spec: the
          ControlNet residuals and the ControlNet engines' inputs too, by name)
        + IBuilderConfig: builder optimisation level, workspace limit, timing cache, progress monitor
    --build_serialized_network--> engine.plan (a cache entry of its own)

Precision: no builder precision flags (TensorRT 11 has none; on 10 a strongly typed network rejects them).
Every tensor's type comes from the ONNX graph: an fp16 export (from fp16 modules) builds fp16 kernels, a bf16
export bf16 ones, and what the graph keeps in fp32 (the timestep embedding diffusers computes in fp32, casts
it inserts) stays fp32. FP8 / INT8 come only from Q/DQ nodes in the graph. The dtype is part of the engine's
cache key (through the ONNX entry's key and digest).

Timing cache: one file per (TensorRT version, GPU capability) under ``<cache root>/timing/``, loaded before
each build and merged back after it under a lock, so later builds (another resolution, another LoRA) reuse
the kernel timings and take a fraction of the time.

Progress: TensorRT reports phases and steps through ``IProgressMonitor``; ``TqdmProgressMonitor`` shows
one tqdm bar per phase (nested bars for nested phases) on stderr.

Not run in this repository: TensorRT is not installable here. Every TensorRT name used is checked against the
published 10.16 and 11.4 bindings (tests/engines/test_trt_api_names.py); tested code paths stop at ONNX.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import file_lock, write_atomic
from .specs import NetworkSpec
from .trt_caps import TensorRTUnavailable, import_tensorrt, probe

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["ENGINE_FILE", "TensorRTUnavailable", "TrtBuildOptions", "build_engine", "check_dtype",
           "import_tensorrt", "timing_cache_path", "trt_logger"]

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.plan"

# Engine dtype -> the oldest GPU with fast kernels for it (the ONNX graph's type is the engine's precision).
_MIN_SM = {"float16": 53, "bfloat16": 80, "float32": 0}



def check_dtype(dtype: str, capability: str) -> None:
    """ValueError if engines of ``dtype`` (the ONNX export's type) cannot run well on ``capability``."""
    if dtype not in _MIN_SM:
        raise ValueError(f"TensorRT engines are built in float16, bfloat16 or float32 (the ONNX graph's type); "
                         f"got {dtype!r}")
    sm = int(capability.removeprefix("sm_")) if capability.startswith("sm_") else 0
    if sm < _MIN_SM[dtype]:
        raise ValueError(f"{dtype} engines need compute capability sm_{_MIN_SM[dtype]} or later; this GPU is "
                         f"{capability}. Use --dtype float16" + ("" if dtype != "float16" else " on a newer GPU"))


@dataclass(frozen=True)
class TrtBuildOptions:
    """Builder settings. All but ``timing_cache`` are part of the engine's cache key.

    There is no precision option: the engine's precision is the ONNX graph's (see the module docstring).
    optimization_level: 0-5, TensorRT's builder optimisation level. 3 is TensorRT's default; 5 searches
        longest (much longer builds, sometimes a few % faster engines); lower builds faster.
    workspace_gb: cap on the builder's scratch memory pool (None: TensorRT's default, the whole GPU).
    timing_cache: reuse and update the persistent timing cache.
    """

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
        return {"network": "strongly_typed", "optimization_level": self.optimization_level,
                "workspace_gb": self.workspace_gb}


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
    """Build a serialised, strongly typed TensorRT engine for ``spec`` from ``onnx_path`` into ``engine_path``.

    Returns build facts for the cache manifest (seconds, engine bytes, profiles). Raises RuntimeError naming
    the ONNX file and TensorRT's last error when parsing or building fails; never exits.
    """
    trt = import_tensorrt()
    caps = probe(trt)
    if capability is not None:
        check_dtype(spec.outputs[0].dtype, capability)
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(caps.network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    logger.clear()
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors or logger.last_error or 'no message'}")
    got = [network.get_input(i).name for i in range(network.num_inputs)]
    if got != spec.input_names:
        raise RuntimeError(f"{onnx_path} has inputs {got}; spec {spec.name!r} expects {spec.input_names}")

    config = builder.create_builder_config()  # no precision flags: the graph's types decide
    config.builder_optimization_level = options.optimization_level
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))

    dynamic = {b.name for b in spec.inputs if b.axes}  # every input by name, whatever the network adds
    for i in range(len(spec.profiles)):
        profile = builder.create_optimization_profile()
        for name, (lo, mid, hi) in spec.profile_shapes(i).items():
            if name in dynamic:  # a static input (an IP-Adapter UNet's ip_scale [1]) takes the graph's dims
                profile.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(profile)

    monitor = None
    if progress:
        monitor = TqdmProgressMonitor.make(trt, f"TensorRT {spec.name}")
        config.progress_monitor = monitor

    tc_path = Path(timing_cache) if (timing_cache and options.timing_cache and caps.timing_cache) else None
    if tc_path is not None:
        blob = tc_path.read_bytes() if tc_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)

    log.info("building strongly typed TensorRT %s engine %s from %s (%s, opt level %d, %d profile(s); this takes "
             "minutes for a UNet)", caps.version, spec.name, onnx_path, spec.outputs[0].dtype,
             options.optimization_level, len(spec.profiles))
    t0 = time.monotonic()
    logger.clear()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.monotonic() - t0
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {spec.name} from {onnx_path}: "
                           f"{logger.last_error or 'no error message (see the log above)'}")
    write_atomic(Path(engine_path), memoryview(serialized).tobytes())

    if tc_path is not None:
        _merge_timing_cache(config, tc_path)
    log.info("built %s in %.0f s (%.1f MB)", engine_path, seconds, serialized.nbytes / 1e6)
    del monitor
    return {"build_seconds": round(seconds, 1), "engine_bytes": int(serialized.nbytes),
            "tensorrt": caps.version, "network": "strongly_typed",
            "profiles": [spec.profile_shapes(i) for i in range(len(spec.profiles))]}


def _merge_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    """Combine this build's timings with what other builders saved meanwhile, then write atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock"), "the TensorRT timing cache"):
        ours = config.get_timing_cache()
        if path.is_file():
            theirs = config.create_timing_cache(path.read_bytes())
            ours.combine(theirs, True)
        write_atomic(path, memoryview(ours.serialize()).tobytes())
