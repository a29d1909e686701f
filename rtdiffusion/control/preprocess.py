"""ControlNet preprocessors: the conditioning image of each ControlNet, computed from the frame on the device.

Every preprocessor is a small object made once per layout (frames F, height H, width W, dtype, device) and
called inside the frame:

    pre(image, out)     image [F, 3, H, W] in [-1, 1] (engine dtype)  ->  out [F, 3, H, W] in [0, 1], in place

A call only enqueues work on the current stream: no host sync, no data-dependent Python branching, and no
tensor allocation outside a network's own forward (every scratch tensor is made in the constructor and
written with ``out=`` / ``copy_`` / in-place ops), so the frame's CUDA graph can capture it.

    kind      object                  what it writes
    CANNY     canny.CannyPreprocessor  canny-style edges of the luminance, 0 / 1, on all 3 channels
    TILE      TilePreprocessor         the frame itself in [0, 1] (optionally area-downscaled, bilinear-upscaled)
    DEPTH     depth.DepthPreprocessor  relative depth of a depth network, per-frame min-max normalised
    EXTERNAL  ExternalPreprocessor     a control image the caller wrote with ``write(frame)``

``make_preprocessor(kind, frames=..., height=..., width=..., dtype=..., device=..., **options)`` validates
the kind and options (ConfigError naming the allowed values) and builds one.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import ConfigError, FrameError


class PreprocessorKind(enum.Enum):
    CANNY = "canny"
    TILE = "tile"
    DEPTH = "depth"
    EXTERNAL = "external"


class Preprocessor(Protocol):
    kind: PreprocessorKind

    def __call__(self, image: torch.Tensor, out: torch.Tensor) -> None:
        """image [F, 3, H, W] in [-1, 1] (engine dtype) -> writes out [F, 3, H, W] in [0, 1] (same dtype).
        Enqueues work only: no host sync, no allocation outside network forwards."""

    def describe(self) -> dict: ...


# ----------------------------------------------------------------------------------------------- options
def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number in [{lo}, {hi}]; got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}]; got {value!r}")
    return float(value)


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}]; got {value!r}")
    if not lo <= int(value) <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}]; got {value!r}")
    return int(value)


@dataclass(frozen=True)
class CannyOptions:
    """Canny-style edges (canny.py).

    low, high: hysteresis thresholds on the gradient magnitude of the luminance in [0, 1], scaled so that a
        sharp step from black to white has magnitude 1 (the Sobel response / 4). A pixel is an edge candidate
        above ``low`` and a seed above ``high``. OpenCV's ``cv2.Canny(gray_u8, T1, T2, L2gradient=True)`` on the
        same (unblurred) image is ``low = T1 / 1020, high = T2 / 1020``; ControlNet's usual 100 / 200 is about
        0.1 / 0.2 (its L1 gradient reads a little higher than this L2 one).
    sigma: Gaussian blur of the luminance before the gradients (kernel radius ceil(3 sigma)); 0 skips it, as
        OpenCV's Canny does. A little blur keeps camera noise out of the edges.
    hysteresis_iterations: steps of edge growth from the seeds into connected candidates (each step is a 3x3
        dilation restricted to candidates). OpenCV follows a chain without bound; here a candidate further
        than this many pixels along its chain from every seed is dropped. Cost: 5 small kernels per step.
    """

    low: float = 0.1
    high: float = 0.2
    sigma: float = 1.0
    hysteresis_iterations: int = 16

    def __post_init__(self) -> None:
        _number("canny option low", self.low, 0.0, 1.0)
        _number("canny option high", self.high, 0.0, 1.0)
        _number("canny option sigma", self.sigma, 0.0, 8.0)
        _integer("canny option hysteresis_iterations", self.hysteresis_iterations, 0, 256)
        if self.low > self.high:
            raise ConfigError(f"canny option low must be <= high; got low={self.low!r}, high={self.high!r}")


@dataclass(frozen=True)
class TileOptions:
    """The frame as the tile ControlNet sees it. downscale: 1 passes the frame through (mapped to [0, 1]); d > 1
    averages d x d blocks and scales back up bilinearly (a blurred, detail-free version; d must divide the
    frame's height and width)."""

    downscale: int = 1

    def __post_init__(self) -> None:
        _integer("tile option downscale", self.downscale, 1, 64)


@dataclass(frozen=True)
class DepthOptions:
    """A depth network (depth.py). model: ``random:depth-anything-v2-small`` (seeded random weights of
    Depth-Anything-V2-Small), ``random:tiny-depth`` (CPU tests), a transformers depth model id or a local folder.
    resolution: the network's input size along the frame's shorter side (a multiple of the model's patch size,
    14 for Depth Anything); the longer side keeps the aspect ratio, rounded to the same multiple."""

    model: str = "random:depth-anything-v2-small"
    resolution: int = 252
    seed: int = 0
    local_files_only: bool | None = None  # None: local only when HF_HUB_OFFLINE is set

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"depth option model must be a model id, a folder or random:depth-anything-v2-small; "
                              f"got {self.model!r}")
        _integer("depth option resolution", self.resolution, 14, 2044)
        _integer("depth option seed", self.seed, 0, 2**63 - 1)
        if self.local_files_only not in (None, True, False):
            raise ConfigError(f"depth option local_files_only must be true, false or null; got {self.local_files_only!r}")


@dataclass(frozen=True)
class ExternalOptions:
    """No options: the caller writes the control image."""


OPTIONS: dict[PreprocessorKind, type] = {
    PreprocessorKind.CANNY: CannyOptions, PreprocessorKind.TILE: TileOptions,
    PreprocessorKind.DEPTH: DepthOptions, PreprocessorKind.EXTERNAL: ExternalOptions,
}


def parse_kind(kind: Any) -> PreprocessorKind:
    """A PreprocessorKind from itself or its name ("canny", "tile", "depth", "external")."""
    if isinstance(kind, PreprocessorKind):
        return kind
    if isinstance(kind, str):
        for k in PreprocessorKind:
            if k.value == kind.strip().lower():
                return k
    raise ConfigError(f"preprocessor must be one of {', '.join(k.value for k in PreprocessorKind)}; got {kind!r}")


def parse_options(kind: Any, options: dict[str, Any] | None = None):
    """The frozen options object of ``kind`` from a plain dict (ConfigError naming the allowed keys)."""
    k = parse_kind(kind)
    cls = OPTIONS[k]
    options = dict(options or {})
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(map(repr, unknown))} for the {k.value} preprocessor; "
                          f"allowed: {', '.join(allowed) if allowed else 'none'}")
    return cls(**options)


# ------------------------------------------------------------------------------------------ preprocessors
class TilePreprocessor:
    """out = (image + 1) / 2, or its d x d block means scaled back up bilinearly (align_corners=False, the same
    weights as ``F.interpolate(..., mode="bilinear")``), written without allocation."""

    kind = PreprocessorKind.TILE

    def __init__(self, options: TileOptions, *, frames: int, height: int, width: int, dtype: torch.dtype,
                 device: torch.device):
        d = options.downscale
        if height % d or width % d:
            raise ConfigError(f"tile option downscale must divide the frame's height and width ({height} x {width}); "
                              f"got {d}")
        self.options = options
        F, n, m = frames, height // d, width // d
        self._shape = (frames, 3, height, width)
        if d > 1:
            z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
            self._small = z(F, 3, n + 2, m + 2)  # [F, 3, H/d + 2, W/d + 2] block means in [0, 1], edge-replicated
            self._tall = z(F, 3, n * d, m + 2)  # [F, 3, H, W/d + 2] after the vertical pass
            # phase p of d: source offset (p + 0.5) / d - 0.5 from its block; weight |f| on the neighbour that way
            self._phases = [((p + 0.5) / d - 0.5) for p in range(d)]

    def __call__(self, image: torch.Tensor, out: torch.Tensor) -> None:
        d = self.options.downscale
        if d == 1:
            torch.mul(image, 0.5, out=out)
            out.add_(0.5).clamp_(0.0, 1.0)
            return
        F, _, H, W = self._shape
        n, m = H // d, W // d
        inner = self._small[:, :, 1:-1, 1:-1]  # [F, 3, n, m]
        torch.sum(image.view(F, 3, n, d, m, d), dim=(3, 5), out=inner)
        inner.mul_(0.5 / (d * d)).add_(0.5).clamp_(0.0, 1.0)
        _replicate_border(self._small, 1)
        tall = self._tall.view(F, 3, n, d, m + 2)  # [F, 3, n, d, m + 2]
        for p, f in enumerate(self._phases):  # vertical: row y*d + p from rows y and y +- 1
            o = 1 if f >= 0 else -1
            torch.mul(self._small[:, :, 1:n + 1], 1.0 - abs(f), out=tall[:, :, :, p])
            tall[:, :, :, p].add_(self._small[:, :, 1 + o:n + 1 + o], alpha=abs(f))
        wide = out.view(F, 3, H, m, d)  # [F, 3, H, m, d]
        for q, f in enumerate(self._phases):  # horizontal, the same weights
            o = 1 if f >= 0 else -1
            torch.mul(self._tall[:, :, :, 1:m + 1], 1.0 - abs(f), out=wide[..., q])
            wide[..., q].add_(self._tall[:, :, :, 1 + o:m + 1 + o], alpha=abs(f))

    def describe(self) -> dict:
        return {"kind": self.kind.value, **dataclasses.asdict(self.options)}


class ExternalPreprocessor:
    """A control image supplied by the caller.

    ``frame_u8`` [F, H, W, 3] uint8 lives on the device. ``write(frame)`` (the caller's thread; the engine calls
    it between frames, under its frame lock) validates and copies a frame in, on the current stream; the
    call in the frame converts whatever frame_u8 holds, ignoring ``image``."""

    kind = PreprocessorKind.EXTERNAL

    def __init__(self, options: ExternalOptions | None = None, *, frames: int, height: int, width: int,
                 dtype: torch.dtype, device: torch.device):
        self.options = options or ExternalOptions()
        self.frame_u8 = torch.zeros(frames, height, width, 3, dtype=torch.uint8, device=device)  # [F, H, W, 3]
        self.writes = 0

    def expected(self) -> str:
        F, H, W, _ = self.frame_u8.shape
        return f"uint8 [H, W, 3] = [{H}, {W}, 3] or [F, H, W, 3] = [{F}, {H}, {W}, 3]"

    def write(self, frame: Any) -> None:
        """Copy a control image in: numpy or torch, uint8, [H, W, 3] (every frame row) or [F, H, W, 3]."""
        if isinstance(frame, np.ndarray):
            if frame.dtype != np.uint8:
                raise FrameError(f"control image must be {self.expected()}; got dtype {frame.dtype}")
            t = frame
        elif isinstance(frame, torch.Tensor):
            if frame.dtype != torch.uint8:
                raise FrameError(f"control image must be {self.expected()}; got dtype {frame.dtype}")
            t = frame
        else:
            raise FrameError(f"control image must be a numpy array or torch tensor, {self.expected()}; "
                             f"got {type(frame).__name__}")
        shape = tuple(t.shape)
        if shape not in (tuple(self.frame_u8.shape[1:]), tuple(self.frame_u8.shape)):
            raise FrameError(f"control image must be {self.expected()}; got shape {list(shape)}")
        if isinstance(t, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(t))
        self.frame_u8.copy_(t)  # broadcasts [H, W, 3] over the F rows
        self.writes += 1

    def __call__(self, image: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(self.frame_u8.permute(0, 3, 1, 2))  # [F, 3, H, W]
        out.mul_(1.0 / 255.0)

    def describe(self) -> dict:
        return {"kind": self.kind.value, "writes": self.writes}


def _replicate_border(buf: torch.Tensor, p: int) -> None:
    """Fill the outer ``p`` pixels of buf [..., h + 2p, w + 2p] with copies of its inner edge (in place)."""
    buf[..., :p, p:-p].copy_(buf[..., p:p + 1, p:-p])
    buf[..., -p:, p:-p].copy_(buf[..., -p - 1:-p, p:-p])
    buf[..., :, :p].copy_(buf[..., :, p:p + 1])
    buf[..., :, -p:].copy_(buf[..., :, -p - 1:-p])


# --------------------------------------------------------------------------------------------- factory
def make_preprocessor(kind: Any, *, frames: int, height: int, width: int, dtype: torch.dtype,
                      device: torch.device | str, **options: Any) -> Preprocessor:
    """Build the ``kind`` preprocessor for frames [F=frames, 3, height, width] of ``dtype`` on ``device``.

    kind: a PreprocessorKind or its name; options: see CannyOptions, TileOptions, DepthOptions (none for
    external). Bad kinds, options or sizes are ConfigErrors naming the allowed values."""
    k = parse_kind(kind)
    opts = parse_options(k, options)
    for name, v in (("frames", frames), ("height", height), ("width", width)):
        _integer(name, v, 1, 1 << 16)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch.dtype (float16, bfloat16, float32); got {dtype!r}")
    device = torch.device(device)
    kw = dict(frames=int(frames), height=int(height), width=int(width), dtype=dtype, device=device)
    if k is PreprocessorKind.CANNY:
        from .canny import CannyPreprocessor

        return CannyPreprocessor(opts, **kw)
    if k is PreprocessorKind.TILE:
        return TilePreprocessor(opts, **kw)
    if k is PreprocessorKind.DEPTH:
        from .depth import DepthPreprocessor

        return DepthPreprocessor(opts, **kw)
    return ExternalPreprocessor(opts, **kw)
