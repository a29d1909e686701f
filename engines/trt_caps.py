"""What the installed TensorRT supports: the one place that decides (build, runtime and `rtdiffusion doctor`).

    probe(trt) -> TrtCaps, read from the module's attributes only (nothing is built, no GPU is touched):
      typing            10.x: strongly typed when the network is created with
                              NetworkDefinitionCreationFlag.STRONGLY_TYPED (we always ask for it)
                        11.x: always strongly typed; the flag is kept for compatibility and ignored, so we
                              pass no flag
      precision         never a builder flag: the ONNX graph's own types decide (fp16 / bf16 exports from
                        fp16 / bf16 modules; fp32 where the graph says so). FP8 / INT8 only from Q/DQ nodes
                        in the graph. TensorRT 11 has no BuilderFlag.FP16 / BF16 / INT8 / FP8 at all.
      user_memory       activations in a buffer we own: ExecutionContextAllocationStrategy.USER_MANAGED,
                        ICudaEngine.device_memory_size_v2, IExecutionContext.set_device_memory (10.1+)
      timing_cache      IBuilderConfig.create_timing_cache (persistent kernel timings)
      weight_streaming  BuilderFlag.WEIGHT_STREAMING + ICudaEngine.weight_streaming_budget_v2 (reported;
                        the engine does not stream TensorRT weights yet)
      refit             BuilderFlag.REFIT + Refitter (reported; engines are rebuilt, not refitted, today)

Supported: SUPPORTED_MIN <= version < SUPPORTED_BELOW, which is what pyproject's ``[tensorrt]`` extra asks
for. Every TensorRT name this package uses is checked against the published 10.16 and 11.4 bindings by
tests/engines/test_trt_api_names.py (read from the wheels; TensorRT itself has not been run here).
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

SUPPORTED_MIN = (10, 1)  # device_memory_size_v2 / set_device_memory
SUPPORTED_BELOW = (12, 0)
SUPPORTED_TEXT = "10.x from 10.1, or 11.x"


class TensorRTUnavailable(RuntimeError):
    """tensorrt is not installed, cannot be imported or is not a supported version; the message says why."""


class Typing(enum.Enum):
    """How this TensorRT builds a strongly typed network."""

    FLAG = "flag"  # 10.x: NetworkDefinitionCreationFlag.STRONGLY_TYPED
    ALWAYS = "always"  # 11.x: the only mode


def parse_version(version: str) -> tuple[int, int]:
    """'10.16.1.11' -> (10, 16); ValueError for anything else."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    if not m:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class TrtCaps:
    """Features of one TensorRT module (see the module docstring for what each means)."""

    version: str
    typing: Typing | None  # None: this TensorRT cannot build strongly typed networks
    user_memory: bool
    timing_cache: bool
    weight_streaming: bool
    refit: bool

    @property
    def major_minor(self) -> tuple[int, int]:
        return parse_version(self.version)

    @property
    def problem(self) -> str | None:
        """Why the backend cannot use this TensorRT, or None when it can."""
        if not SUPPORTED_MIN <= self.major_minor < SUPPORTED_BELOW:
            return f"TensorRT {self.version} is not supported; the trt backend needs {SUPPORTED_TEXT}"
        if self.typing is None:
            return f"TensorRT {self.version} has no strongly typed networks"
        if not self.user_memory:
            return (f"TensorRT {self.version} lacks device_memory_size_v2 / set_device_memory "
                    "(user-managed activation memory)")
        return None

    def network_flags(self, trt) -> int:
        """Creation flags for ``Builder.create_network``: strongly typed, however this version spells it."""
        if self.typing is Typing.FLAG:
            return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return 0  # 11.x: always strongly typed

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["typing"] = {Typing.FLAG: "strongly typed (STRONGLY_TYPED network flag)",
                       Typing.ALWAYS: "strongly typed (always, no flag)", None: "not available"}[self.typing]
        d["precision"] = "from the ONNX graph's types; FP8/INT8 only from Q/DQ nodes (no builder flags)"
        d["supported"] = self.problem is None
        if self.problem:
            d["problem"] = self.problem
        return d


def probe(trt) -> TrtCaps:
    """Read the features of an imported ``tensorrt`` module (attributes only)."""
    version = str(getattr(trt, "__version__", "0.0"))
    try:
        major, _ = parse_version(version)
    except ValueError:
        major = 0
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    if major >= 11:
        typing = Typing.ALWAYS
    elif flags is not None and hasattr(flags, "STRONGLY_TYPED"):
        typing = Typing.FLAG
    else:
        typing = None
    engine = getattr(trt, "ICudaEngine", None)
    context = getattr(trt, "IExecutionContext", None)
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    builder_flag = getattr(trt, "BuilderFlag", None)
    config = getattr(trt, "IBuilderConfig", None)
    return TrtCaps(
        version=version,
        typing=typing,
        user_memory=(hasattr(strategy, "USER_MANAGED") and hasattr(engine, "device_memory_size_v2")
                     and hasattr(context, "set_device_memory")),
        timing_cache=hasattr(config, "create_timing_cache"),
        weight_streaming=(hasattr(builder_flag, "WEIGHT_STREAMING")
                          and hasattr(engine, "weight_streaming_budget_v2")),
        refit=hasattr(builder_flag, "REFIT") and hasattr(trt, "Refitter"),
    )


def import_tensorrt():
    """The ``tensorrt`` module when it imports and is supported; else TensorRTUnavailable saying why."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        raise TensorRTUnavailable(
            f"the TensorRT backend needs the tensorrt package ({SUPPORTED_TEXT}) and a CUDA GPU; importing it "
            f"failed ({type(exc).__name__}: {exc}). Install it with `pip install 'rtdiffusion[tensorrt]'` on a "
            "machine with an NVIDIA driver, or use --backend compiled / graph / eager") from exc
    problem = probe(trt).problem
    if problem:
        raise TensorRTUnavailable(f"{problem} (pip install 'rtdiffusion[tensorrt]' installs a supported one)")
    return trt


def installed_caps() -> tuple[TrtCaps | None, str]:
    """(features of the installed TensorRT or None, a one-line reason when it is missing or unusable)."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001
        return None, f"tensorrt is not importable ({type(exc).__name__}: {exc})"
    caps = probe(trt)
    return caps, caps.problem or f"TensorRT {caps.version} supported"
