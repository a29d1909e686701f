"""Depth from a depth network, inside the frame: the DEPTH preprocessor.

    image [F, 3, H, W] in [-1, 1]
      -> bilinear, antialiased resize to the network's size       net_in [F, 3, h, w]   (h, w multiples of 14)
      -> ImageNet normalisation, in place
      -> depth network (transformers DepthAnythingForDepthEstimation or any AutoModelForDepthEstimation)
                                                                   predicted_depth [F, h', w'] (relative, near = high)
      -> bilinear resize back                                      up [F, 1, H, W]
      -> per-frame min-max to [0, 1] (amin / amax as device tensors: no host sync)   norm [F, 1, H, W]
      -> out [F, 3, H, W] (the same map on all 3 channels)

Allocation: the network's forward allocates its activations and its output (allowed: it is a network
forward; in a CUDA graph they come from the graph's private pool). Everything else writes preallocated
buffers: the resizes use the ``out=`` forms of ``upsample_bilinear2d`` / ``_upsample_bilinear2d_aa``
(``F.interpolate`` has none and would allocate), amin / amax / sub / div write with ``out=`` or in place.

Models: ``random:depth-anything-v2-small`` (Depth-Anything-V2-Small's architecture from the packaged config,
seeded random weights: a noise-like depth map, for speed and tests only), ``random:tiny-depth`` (a tiny config
for CPU tests), or a transformers depth model id / local folder (``AutoModelForDepthEstimation``; only local
files when offline).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..errors import ConfigError, ModelNotFoundError
from ..models.loading import RANDOM_PREFIX, _strip, read_config
from ..models.random_init import seeded_rng
from .preprocess import DepthOptions, PreprocessorKind

log = logging.getLogger(__name__)

RANDOM_DEPTH = {"depth-anything-v2-small": "depth_anything_v2_small.json", "tiny-depth": "tiny_depth_anything.json"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_depth_model(model: str, *, dtype: torch.dtype, device: torch.device, seed: int = 0,
                     local_files_only: bool | None = None) -> torch.nn.Module:
    """A depth network on ``device`` in ``dtype``, in eval mode with no gradients."""
    if model.startswith(RANDOM_PREFIX):
        name = model[len(RANDOM_PREFIX):]
        if name not in RANDOM_DEPTH:
            raise ConfigError(f"unknown random depth model {model!r}; expected one of "
                              f"{', '.join(RANDOM_PREFIX + k for k in RANDOM_DEPTH)}, a transformers depth model id "
                              "or a local folder")
        from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation

        cfg = _strip(read_config(RANDOM_DEPTH[name]))
        log.info("building %s with seeded random weights (noise-like depth, for speed and tests only)", model)
        with seeded_rng(seed, device), torch.device(device):
            net = DepthAnythingForDepthEstimation(DepthAnythingConfig(**cfg))
    else:
        from huggingface_hub.constants import HF_HUB_OFFLINE
        from transformers import AutoModelForDepthEstimation

        offline = HF_HUB_OFFLINE if local_files_only is None else local_files_only
        try:
            net = AutoModelForDepthEstimation.from_pretrained(model, local_files_only=offline, dtype=dtype)
        except Exception as exc:  # hub and config errors come in many classes; all mean "no such depth model"
            raise ModelNotFoundError(
                f"depth model {model!r} could not be loaded as a transformers depth model (id or local folder"
                f"{', local files only' if offline else ''}): {type(exc).__name__}: {exc}. Expected a transformers "
                f"depth model id or folder, or one of {', '.join(RANDOM_PREFIX + k for k in RANDOM_DEPTH)}") from exc
        net = net.to(device)
    return net.to(dtype=dtype).eval().requires_grad_(False)


def patch_size(net: torch.nn.Module) -> int:
    """The multiple the network's input sides must have (14 for Depth Anything's DINOv2; 1 if unknown)."""
    cfg = net.config
    for c in (getattr(cfg, "backbone_config", None), cfg):
        p = getattr(c, "patch_size", None)
        if isinstance(p, int) and p > 0:
            return p
    return 1


def network_size(height: int, width: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(h, w): the shorter frame side becomes ``resolution``, the longer keeps the aspect ratio, both rounded
    to ``multiple``."""
    s = resolution / min(height, width)
    return tuple(max(multiple, round(v * s / multiple) * multiple) for v in (height, width))  # type: ignore[return-value]


class DepthPreprocessor:
    kind = PreprocessorKind.DEPTH

    def __init__(self, options: DepthOptions, *, frames: int, height: int, width: int, dtype: torch.dtype,
                 device: torch.device):
        self.options = options
        self.model = load_depth_model(options.model, dtype=dtype, device=device, seed=options.seed,
                                      local_files_only=options.local_files_only)
        p = patch_size(self.model)
        if options.resolution % p:
            raise ConfigError(f"depth option resolution must be a multiple of {p} (the patch size of "
                              f"{options.model}); got {options.resolution}")
        F, H, W = frames, height, width
        self._frame = (F, H, W)
        self.net_size = network_size(H, W, options.resolution, p)
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        self._net_in = z(F, 3, *self.net_size)  # [F, 3, h, w] ImageNet-normalised network input
        # x in [-1, 1] -> ((x + 1) / 2 - mean) / std = x * scale + shift, per channel
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
        self._scale = (0.5 / std).to(dtype=dtype, device=device).view(1, 3, 1, 1)  # [1, 3, 1, 1]
        self._shift = ((0.5 - mean) / std).to(dtype=dtype, device=device).view(1, 3, 1, 1)  # [1, 3, 1, 1]
        with torch.no_grad():  # the output size of this network at this input size (construction only)
            self.depth_size = tuple(self._forward().shape[-2:])
        self._min = z(F, 1, 1, 1)  # [F, 1, 1, 1] per-frame minimum
        self._max = z(F, 1, 1, 1)  # [F, 1, 1, 1] per-frame maximum, then the range
        self._up = z(F, 1, H, W) if self.depth_size != (H, W) else None  # [F, 1, H, W] depth at the frame's size
        self._norm = z(F, 1, H, W)  # [F, 1, H, W] depth in [0, 1]
        # a constant map divides by this instead of 0 (and comes out 0); the smallest normal of the dtype
        self._eps = max(torch.finfo(dtype).tiny, 1e-12)

    def _forward(self) -> torch.Tensor:
        """The network on net_in -> depth [F, 1, h', w'] (allocated by the network)."""
        depth = self.model(pixel_values=self._net_in).predicted_depth  # [F, h', w'] (or [F, 1, h', w'])
        return depth.view(depth.shape[0], 1, *depth.shape[-2:])

    def __call__(self, image: torch.Tensor, out: torch.Tensor) -> None:
        F, H, W = self._frame
        h, w = self.net_size
        if (h, w) == (H, W):
            self._net_in.copy_(image)
        elif h * w < H * W:  # downscale: antialiased, like the PIL resize of the model's image processor
            torch._C._nn._upsample_bilinear2d_aa(image, [h, w], False, None, None, out=self._net_in)
        else:
            torch._C._nn.upsample_bilinear2d(image, [h, w], False, None, None, out=self._net_in)
        self._net_in.mul_(self._scale).add_(self._shift)
        with torch.no_grad():
            depth = self._forward()  # [F, 1, h', w']
        if self._up is not None:  # [F, 1, h', w'] -> [F, 1, H, W]
            torch._C._nn.upsample_bilinear2d(depth, [H, W], False, None, None, out=self._up)
            depth = self._up
        torch.amin(depth, dim=(2, 3), keepdim=True, out=self._min)
        torch.amax(depth, dim=(2, 3), keepdim=True, out=self._max)
        self._max.sub_(self._min).clamp_(min=self._eps)  # range, never 0
        torch.sub(depth, self._min, out=self._norm).div_(self._max)
        out.copy_(self._norm.expand(-1, 3, -1, -1))

    def describe(self) -> dict:
        return {"kind": self.kind.value, **dataclasses.asdict(self.options), "network_size": list(self.net_size)}


__all__ = ["DepthPreprocessor", "load_depth_model", "network_size", "patch_size", "RANDOM_DEPTH"]
