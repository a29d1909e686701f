"""Residual classifier-free guidance (RCFG), one small object per mode, chosen when settings change.

With g the guidance scale, d the delta, eps_c the conditional prediction and eps_u the unconditional one:

    guided = eps_u + g * (eps_c - eps_u) = g * eps_c + (1 - g) * eps_u

NONE        guided = eps_c                              (no extra work)
SELF        eps_u = d * stock                           (stock: the previous step's residual noise)
INITIALIZE  like SELF, but slot 0's stock is the UNet's own uncond prediction of the new frames (F rows)
FULL        eps_u from SF extra uncond UNet rows        (ordinary CFG)

Stock noise for SELF / INITIALIZE (StreamDiffusion's RCFG). With a stream batch (S > 1) the stock first
moves one slot along with its frames (slot 0 gets the init noise); after the scheduler step each row is
advanced with next-slot constants a', b' (a' = b' = 1 on the last slot) and noise' = init noise rolled by
one slot:

    stock <- noise' + (a' / b') * (A * b * stock + B * guided)  =  noise' + K1 * stock + K2 * guided

Every method only writes preallocated buffers in place; none syncs the host.
"""

from __future__ import annotations

import torch

from .buffers import FrameBuffers
from .config import CfgMode


class Guidance:
    """NONE: the UNet's conditional prediction is used as is."""

    def fill_uncond_rows(self, b: FrameBuffers) -> None:
        """Copy the stream rows the UNet must also see unconditioned (none here)."""

    def combine(self, b: FrameBuffers, eps: torch.Tensor) -> torch.Tensor:
        return eps  # [SF, 4, h, w]

    def update_stock(self, b: FrameBuffers, guided: torch.Tensor) -> None:
        """Advance the residual noise (nothing to do without RCFG)."""


class SelfGuidance(Guidance):
    def __init__(self, ring: bool):
        self.ring = ring  # S > 1: the stock moves with the stream batch (fixed per layout)

    def shift_stock(self, b: FrameBuffers) -> None:
        if self.ring:
            F = b.layout.frames
            b.stock_tmp.copy_(b.stock[:-F])  # via a scratch buffer: source and target overlap
            b.stock[F:].copy_(b.stock_tmp)
            b.stock[:F].copy_(b.init_noise[:F])

    def combine(self, b: FrameBuffers, eps: torch.Tensor) -> torch.Tensor:
        self.shift_stock(b)
        return self.guide(b, eps)

    def guide(self, b: FrameBuffers, eps: torch.Tensor) -> torch.Tensor:
        torch.mul(eps, b.g, out=b.pred)  # g * eps_c
        b.pred.addcmul_(b.stock, b.g_uncond)  # + (1 - g) * d * stock
        return b.pred

    def update_stock(self, b: FrameBuffers, guided: torch.Tensor) -> None:
        b.stock.mul_(b.stock_K1).addcmul_(b.stock_K2, guided).add_(b.stock_shift)


class InitializeGuidance(SelfGuidance):
    def fill_uncond_rows(self, b: FrameBuffers) -> None:
        F = b.layout.frames
        b.unet_in[:F].copy_(b.x_t[:F])  # new frames, unconditioned

    def combine(self, b: FrameBuffers, eps: torch.Tensor) -> torch.Tensor:
        F = b.layout.frames
        self.shift_stock(b)
        b.stock[:F].copy_(eps[:F])  # the new frames' own uncond eps seeds the residual
        return self.guide(b, eps[F:])


class FullGuidance(Guidance):
    def fill_uncond_rows(self, b: FrameBuffers) -> None:
        b.unet_in[: b.layout.stream_rows].copy_(b.x_t)

    def combine(self, b: FrameBuffers, eps: torch.Tensor) -> torch.Tensor:
        SF = b.layout.stream_rows
        torch.mul(eps[SF:], b.g, out=b.pred)  # g * eps_c
        b.pred.addcmul_(eps[:SF], b.g_uncond)  # + (1 - g) * eps_u
        return b.pred


def make_guidance(cfg: CfgMode, slots: int) -> Guidance:
    """The guidance object of a layout (effective CFG mode, S slots)."""
    if cfg is CfgMode.SELF:
        return SelfGuidance(ring=slots > 1)
    if cfg is CfgMode.INITIALIZE:
        return InitializeGuidance(ring=slots > 1)
    return FullGuidance() if cfg is CfgMode.FULL else Guidance()
