"""rtdiffusion: real-time diffusion img2img for live video.

    from rtdiffusion import StreamEngine
    engine = StreamEngine.from_pretrained("random:tiny")
    out = engine(frame)   # uint8 HxWx3 in, uint8 HxWx3 out
"""

from .config import Backend, CfgMode, EngineConfig, SchedulerKind, StreamSettings, VaeKind
from .errors import ConfigError, FrameError, ModelNotFoundError, RtDiffusionError

__all__ = [
    "StreamEngine", "MultiStreamEngine", "Backend", "CfgMode", "EngineConfig", "SchedulerKind", "StreamSettings", "VaeKind",
    "ConfigError", "FrameError", "ModelNotFoundError", "RtDiffusionError",
]


def __getattr__(name: str):  # keep `import rtdiffusion` light: the engine pulls in diffusers
    if name == "StreamEngine":
        from .engine import StreamEngine

        return StreamEngine
    if name == "MultiStreamEngine":  # many streams, one model, one UNet call per tick (docs/multistream.md)
        from .multistream import MultiStreamEngine

        return MultiStreamEngine
    raise AttributeError(name)
