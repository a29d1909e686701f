"""Canny-style edges on the device, as a fixed list of elementwise tensor ops on preallocated buffers.

    image [F, 3, H, W] in [-1, 1]
      1. luminance (Rec. 601: 0.299 R + 0.587 G + 0.114 B) in [0, 1], fp32      -> gray   [F, 1, H+2r, W+2r]
      2. Gaussian blur, separable, radius r = ceil(3 sigma), edge-replicated    -> img    [F, 1, H+2, W+2]
      3. Sobel 3x3 (edge-replicated, as OpenCV's Canny)                          -> dx, dy [F, 1, H, W]
      4. magnitude^2 = dx^2 + dy^2, direction quantised to 4 (OpenCV's tan 22.5 / tan 67.5 tests)
      5. non-maximum suppression along the direction (OpenCV's tie rules: > the neighbour before, >= the one
         after, both > on diagonals; the magnitude outside the frame is 0)
      6. double threshold: candidates m > low, seeds m > high (on magnitude^2 against (4 t)^2)
      7. hysteresis: ``hysteresis_iterations`` steps of  edges <- dilate3x3(edges) AND candidates, from the seeds
         (OpenCV grows without bound: a candidate chain longer than the step count past its seed is cut here)
      8. out [F, 3, H, W] = edges (0 / 1) on all 3 channels, in the engine's dtype

Everything between runs in fp32 in buffers made at construction; each op writes with ``out=`` or in place, so
a call allocates nothing, never syncs the host and has no data-dependent branch (CUDA-graph capturable).
With sigma = 0 and enough iterations the result is OpenCV's ``cv2.Canny(gray, 1020 low, 1020 high,
L2gradient=True)`` up to float rounding at exact ties (tests/test_control_preprocess.py holds it to that).
No convolution or pooling op is used: 3x3 and separable stencils are sums of shifted views, which have
``out=`` forms; ``conv2d`` / ``max_pool2d`` would allocate their outputs on every call.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .preprocess import CannyOptions, PreprocessorKind, _replicate_border

# OpenCV canny.cpp fixed point: TG22 = round(tan(22.5 deg) * 2^15); tan(67.5 deg) = tan(22.5 deg) + 2
_TAN22 = 13573 / 32768
_TAN67 = (13573 + (2 << 15)) / 32768
_LUMA = (0.299, 0.587, 0.114)


def gaussian_taps(sigma: float) -> list[float]:
    """The normalised 1-D Gaussian of radius ceil(3 sigma) (at least 1); [] for sigma 0 (no blur)."""
    if sigma == 0:
        return []
    r = max(1, math.ceil(3 * sigma))
    w = [math.exp(-((k - r) ** 2) / (2 * sigma * sigma)) for k in range(2 * r + 1)]
    s = sum(w)
    return [x / s for x in w]


class CannyPreprocessor:
    kind = PreprocessorKind.CANNY

    def __init__(self, options: CannyOptions, *, frames: int, height: int, width: int, dtype: torch.dtype,
                 device: torch.device):
        self.options = options
        self.taps = gaussian_taps(options.sigma)
        r = len(self.taps) // 2
        F, H, W = frames, height, width
        self._hw = (H, W)
        f32 = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        b8 = lambda *s: torch.zeros(*s, dtype=torch.bool, device=device)  # noqa: E731
        self._img = f32(F, 1, H + 2, W + 2)  # [F, 1, H+2, W+2] blurred luminance, 1 px replicated border
        if r:
            self._gray = f32(F, 1, H + 2 * r, W + 2 * r)  # [F, 1, H+2r, W+2r] luminance, r px replicated border
            self._hblur = f32(F, 1, H + 2 * r, W)  # [F, 1, H+2r, W] after the horizontal pass
        self._sv = f32(F, 1, H, W + 2)  # [F, 1, H, W+2] Sobel's vertical [1, 2, 1]
        self._sh = f32(F, 1, H + 2, W)  # [F, 1, H+2, W] Sobel's horizontal [1, 2, 1]
        self._dx = f32(F, 1, H, W)  # [F, 1, H, W] d/dx, then |d/dx|
        self._dy = f32(F, 1, H, W)  # [F, 1, H, W] d/dy, then |d/dy|
        self._t = f32(F, 1, H, W)  # [F, 1, H, W] scratch (direction bounds)
        self._mag = f32(F, 1, H + 2, W + 2)  # [F, 1, H+2, W+2] magnitude^2, border 0 (never written)
        self._n1 = f32(F, 1, H, W)  # [F, 1, H, W] neighbour magnitude before, along the direction
        self._n2 = f32(F, 1, H, W)  # [F, 1, H, W] neighbour magnitude after
        self._is_h = b8(F, 1, H, W)  # [F, 1, H, W] gradient mostly horizontal: compare left / right
        self._is_v = b8(F, 1, H, W)  # mostly vertical: compare up / down
        self._is_d = b8(F, 1, H, W)  # diagonal
        self._anti = b8(F, 1, H, W)  # dx, dy of opposite signs: the up-right / down-left diagonal
        self._b = b8(F, 1, H, W)  # bool scratch
        self._cand = b8(F, 1, H, W)  # [F, 1, H, W] NMS survivors above low
        self._edges = b8(F, 1, H + 2, W + 2)  # [F, 1, H+2, W+2] edges, border False (never written)
        self._rows = b8(F, 1, H + 2, W)  # [F, 1, H+2, W] dilation: horizontal 3-max
        self._dil = b8(F, 1, H, W)  # [F, 1, H, W] dilation: 3x3 max
        self._low2 = (4.0 * options.low) ** 2  # thresholds on the unnormalised Sobel magnitude^2
        self._high2 = (4.0 * options.high) ** 2

    def __call__(self, image: torch.Tensor, out: torch.Tensor) -> None:
        H, W = self._hw
        taps, r = self.taps, len(self.taps) // 2
        img_in = self._img[:, :, 1:-1, 1:-1]  # [F, 1, H, W]
        # 1-2. luminance in [0, 1], blurred
        gray_in = self._gray[:, :, r:-r, r:-r] if r else img_in
        gray_in.copy_(image[:, 0:1]).mul_(0.5 * _LUMA[0])
        gray_in.add_(image[:, 1:2], alpha=0.5 * _LUMA[1]).add_(image[:, 2:3], alpha=0.5 * _LUMA[2]).add_(0.5)
        if r:
            _replicate_border(self._gray, r)
            torch.mul(self._gray[..., 0:W], taps[0], out=self._hblur)
            for k in range(1, len(taps)):
                self._hblur.add_(self._gray[..., k:k + W], alpha=taps[k])
            torch.mul(self._hblur[:, :, 0:H], taps[0], out=img_in)
            for k in range(1, len(taps)):
                img_in.add_(self._hblur[:, :, k:k + H], alpha=taps[k])
        _replicate_border(self._img, 1)
        # 3. Sobel: dx = [1 2 1]^T (x) [-1 0 1], dy = its transpose
        P = self._img
        torch.add(P[:, :, 0:H], P[:, :, 2:H + 2], out=self._sv).add_(P[:, :, 1:H + 1], alpha=2.0)
        torch.sub(self._sv[..., 2:], self._sv[..., :-2], out=self._dx)
        torch.add(P[..., 0:W], P[..., 2:W + 2], out=self._sh).add_(P[..., 1:W + 1], alpha=2.0)
        torch.sub(self._sh[:, :, 2:], self._sh[:, :, :-2], out=self._dy)
        # 4. direction (sign pattern first, then magnitudes) and magnitude^2
        torch.lt(self._dx, 0.0, out=self._b)
        torch.lt(self._dy, 0.0, out=self._anti)
        self._anti.logical_xor_(self._b)
        ax, ay = self._dx.abs_(), self._dy.abs_()
        torch.mul(ax, _TAN22, out=self._t)
        torch.lt(ay, self._t, out=self._is_h)
        torch.mul(ax, _TAN67, out=self._t)
        torch.gt(ay, self._t, out=self._is_v)
        torch.logical_or(self._is_h, self._is_v, out=self._is_d).logical_not_()
        M = self._mag
        m = M[:, :, 1:-1, 1:-1]  # [F, 1, H, W]
        torch.mul(ax, ax, out=m).addcmul_(ay, ay)
        # 5. neighbours along the direction: n1 (must be >), n2 (must be >=, or > on diagonals)
        up, down = M[:, :, :-2, 1:-1], M[:, :, 2:, 1:-1]
        left, right = M[:, :, 1:-1, :-2], M[:, :, 1:-1, 2:]
        ul, ur, dl, dr = M[:, :, :-2, :-2], M[:, :, :-2, 2:], M[:, :, 2:, :-2], M[:, :, 2:, 2:]
        torch.where(self._anti, ur, ul, out=self._n1)
        torch.where(self._is_v, up, self._n1, out=self._n1)
        torch.where(self._is_h, left, self._n1, out=self._n1)
        torch.where(self._anti, dl, dr, out=self._n2)
        torch.where(self._is_v, down, self._n2, out=self._n2)
        torch.where(self._is_h, right, self._n2, out=self._n2)
        cand, b = self._cand, self._b
        torch.eq(m, self._n2, out=b).logical_and_(self._is_d)  # a diagonal tie: not a maximum
        torch.ge(m, self._n2, out=cand).logical_and_(b.logical_not_())
        cand.logical_and_(torch.gt(m, self._n1, out=b))
        # 6. double threshold
        cand.logical_and_(torch.gt(m, self._low2, out=b))
        edges_in = self._edges[:, :, 1:-1, 1:-1]  # [F, 1, H, W]
        torch.gt(m, self._high2, out=b)
        torch.logical_and(b, cand, out=edges_in)
        # 7. hysteresis: grow the seeds through 8-connected candidates, a fixed number of steps
        E, R = self._edges, self._rows
        for _ in range(self.options.hysteresis_iterations):
            torch.logical_or(E[..., 0:W], E[..., 1:W + 1], out=R).logical_or_(E[..., 2:W + 2])
            torch.logical_or(R[:, :, 0:H], R[:, :, 1:H + 1], out=self._dil).logical_or_(R[:, :, 2:H + 2])
            torch.logical_and(self._dil, cand, out=edges_in)
        # 8. 0 / 1 on 3 channels
        out.copy_(edges_in.expand(-1, 3, -1, -1))

    def describe(self) -> dict:
        return {"kind": self.kind.value, **dataclasses.asdict(self.options), "blur_radius": len(self.taps) // 2}
