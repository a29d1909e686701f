"""Pick and build the backend: which networks run, and how the frame step is launched.

    backend    networks                          launch
    eager      torch modules                     Python, kernel by kernel (CPU or GPU)
    graph      torch modules                     one CUDA graph per layout, replayed
    compiled   torch.compile'd UNet and VAE      one CUDA graph per layout, replayed
    trt        TensorRT engines (engines/trt_*)  one CUDA graph per layout, replayed

``auto`` picks the fastest usable one and returns the reason, which the engine logs and reports.
"""

from __future__ import annotations

import importlib.util
import logging

from engines.base import TorchNetworks

from .config import Backend, EngineConfig
from .executors import EagerExecutor, GraphExecutor
from .models.loading import Components

log = logging.getLogger(__name__)


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def choose_backend(config: EngineConfig) -> tuple[Backend, str]:
    """The backend to use and why (for the log and status())."""
    requested = config.backend
    cuda = config.device.type == "cuda"
    if requested is Backend.AUTO:
        if not cuda:
            return Backend.EAGER, "auto: no CUDA device, so eager (CUDA graphs, compile and TensorRT need one)"
        if tensorrt_available():
            return Backend.TRT, "auto: CUDA device and TensorRT installed"
        return Backend.GRAPH, ("auto: CUDA device without TensorRT; whole-frame CUDA graph of the torch "
                               "networks (fastest start; 'compiled' trades minutes of compile for speed)")
    if requested is not Backend.EAGER and not cuda:
        raise_config(f"backend {requested.value!r} needs a CUDA device; use backend='eager' or 'auto' on the CPU")
    if requested is Backend.TRT and not tensorrt_available():
        raise_config("backend 'trt' needs the tensorrt package (pip install 'rtdiffusion[tensorrt]'); "
                     "use 'graph' or 'compiled' without it")
    return requested, f"{requested.value}: asked for"


def raise_config(msg: str) -> None:
    from .errors import ConfigError

    raise ConfigError(msg)


def build_executor(config: EngineConfig, comps: Components):
    backend, reason = choose_backend(config)
    torch_nets = TorchNetworks(comps.unet, comps.vae)
    if backend is Backend.EAGER:
        return EagerExecutor(torch_nets), reason
    if backend is Backend.GRAPH:
        return GraphExecutor(torch_nets, "graph"), reason
    if backend is Backend.COMPILED:
        from engines.compiled import CompiledNetworks

        return GraphExecutor(CompiledNetworks(comps.unet, comps.vae), "compiled"), reason
    from engines.trt_runtime import load_or_build_trt  # noqa: F401  (written against TensorRT 10)

    raise_config("the trt backend is wired in by the engines issue; see docs/engines.md")
