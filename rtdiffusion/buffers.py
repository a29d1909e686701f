r"""Every device tensor a frame touches, allocated once per layout and then only written in place.

Notation: F frames per call, S denoising slots, SF = S*F stream rows, U extra uncond rows (0, F or SF by
CFG mode), B = U + SF UNet rows, H x W pixels, h x w latent (H / vae_scale), T x D text tokens x width.

UNet input layout (the stream batch ring is a slice of it, never a torch.cat):

    unet_in [B, 4, h, w]:  [ uncond copies (U rows) | x_t: slot 0 (new frames) | slot 1 | ... | slot S-1 ]
                                                     \______________ x_t = unet_in[U:] ______________/

Slot 0 holds the frames that just arrived; slot S-1 the frames about to be finished. Row r of slot s is
frame r of the frames that arrived s calls ago.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .conditioning import AddedConditioning, NoAddedConditioning
from .config import CfgMode
from .control.stack import NoControl


@dataclass(frozen=True)
class StreamLayout:
    """What fixes the shapes of a frame's work: one layout, one set of buffers, one captured graph."""

    frames: int  # F
    slots: int  # S
    cfg: CfgMode  # effective mode (NONE when guidance <= 1)
    height: int
    width: int
    latent_h: int
    latent_w: int
    text_tokens: int  # T
    text_dim: int  # D
    dtype: torch.dtype
    device: torch.device

    @property
    def stream_rows(self) -> int:
        return self.slots * self.frames

    @property
    def uncond_rows(self) -> int:
        return {CfgMode.NONE: 0, CfgMode.SELF: 0, CfgMode.INITIALIZE: self.frames,
                CfgMode.FULL: self.stream_rows}[self.cfg]

    @property
    def unet_rows(self) -> int:
        return self.uncond_rows + self.stream_rows


@dataclass(frozen=True)
class FrameIO:
    """Frames in and out, shared by every layout so their addresses never move (zero-copy handoff)."""

    frame_u8: torch.Tensor  # [F, H, W, 3] uint8, device: the step reads it
    out_u8: torch.Tensor  # [F, H, W, 3] uint8, device: the step writes it

    @staticmethod
    def allocate(frames: int, height: int, width: int, device: torch.device) -> "FrameIO":
        kw = dict(dtype=torch.uint8, device=device)
        return FrameIO(torch.zeros(frames, height, width, 3, **kw), torch.zeros(frames, height, width, 3, **kw))


class FrameBuffers:
    """All per-layout device state. Constants are rewritten in place by :meth:`write_constants` and
    friends when settings change, so a graph captured against these addresses stays valid."""

    def __init__(self, layout: StreamLayout, io: FrameIO, conditioning: AddedConditioning = NoAddedConditioning(),
                 control: Any = None):
        L, dev, dt = layout, layout.device, layout.dtype
        F, SF, U, B = L.frames, L.stream_rows, L.uncond_rows, L.unet_rows
        lat = (L.latent_h, L.latent_w)
        z = lambda *shape, dtype=dt: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
        self.layout = layout
        self.io = io
        # --- frame in ---
        self.image = z(F, 3, L.height, L.width)  # [F, 3, H, W] in [-1, 1]
        # --- stream batch ---
        self.unet_in = z(B, 4, *lat)  # [B, 4, h, w]
        self.x_t = self.unet_in[U:]  # [SF, 4, h, w] view: the stream ring
        self.t_unet = z(B, dtype=torch.float32)  # [B] float32 timesteps (the UNet embeds them in fp32)
        self.embeds = z(B, L.text_tokens, L.text_dim)  # [B, T, D] prompt embeddings per row
        # the UNet's added conditioning (conditioning.py), passed to nets.unet after embeds: () for SD 1.5 /
        # 2.1; SDXL: text_embeds [B, P] (written with the prompt), time_ids [B, 6] (written here, once)
        self.conditioning = conditioning
        self.added = conditioning.allocate(B, dt, dev)
        conditioning.write_size(self.added, L.height, L.width)
        # ControlNets (rtdiffusion/control/stack.py): this layout's control rows, row scales and residual sums,
        # and the frame stage that fills them; NoControl (no ControlNets) has no buffers and no residuals
        self.control = (control or NoControl()).frame(layout)
        self.denoised = z(SF, 4, *lat)  # [SF, 4, h, w]
        self.pred = z(SF, 4, *lat)  # [SF, 4, h, w] guided eps (unused with CFG NONE)
        self.stock = z(SF, 4, *lat)  # [SF, 4, h, w] residual-CFG stock noise
        self.stock_tmp = z(SF - F, 4, *lat)  # [SF-F, 4, h, w] scratch for shifting the stock
        self.dec_in = z(F, 4, *lat)  # [F, 4, h, w] finished latents / vae scaling
        self.latent = z(F, 4, *lat)  # [F, 4, h, w] vae_overlap: frames encoded in the previous call
        self.latent_next = z(F, 4, *lat)  # [F, 4, h, w] vae_overlap: frames encoded in this call
        # --- per-slot constants, repeated over the F rows of a slot ---
        self.init_noise = z(SF, 4, *lat)  # [SF, 4, h, w] fixed noise per row (seed)
        self.renoise = z(SF, 4, *lat)  # [SF, 4, h, w] b * init_noise
        self.stock_shift = z(SF, 4, *lat)  # [SF, 4, h, w] init_noise rolled by F rows
        self.alpha_in = z(F, 1, 1, 1)  # [F, 1, 1, 1] a_0 * vae scaling
        self.alpha_row = z(SF, 1, 1, 1)  # [SF, 1, 1, 1] a of the slot each row is in
        self.beta_row = z(SF, 1, 1, 1)  # [SF, 1, 1, 1] b of the slot each row is in
        self.coef_A = z(SF, 1, 1, 1)  # [SF, 1, 1, 1]
        self.coef_B = z(SF, 1, 1, 1)  # [SF, 1, 1, 1]
        self.stock_K1 = z(SF, 1, 1, 1)  # [SF, 1, 1, 1] residual-CFG stock update, see guidance.py
        self.stock_K2 = z(SF, 1, 1, 1)  # [SF, 1, 1, 1]
        self.g = z(1, 1, 1, 1)  # guidance scale
        self.g_uncond = z(1, 1, 1, 1)  # (1 - g) * delta  (SELF/INITIALIZE) or (1 - g)  (FULL)
        self.inv_scaling = 1.0
        # --- similar-frame filter probe: an 8x subsample of the input in fp32 ---
        ph, pw = -(-L.height // 8), -(-L.width // 8)
        self.probe = z(F, ph, pw, 3, dtype=torch.float32)  # [F, H/8, W/8, 3] in [-1, 1]
        self.probe_ref = z(F, ph, pw, 3, dtype=torch.float32)  # the last processed frame's probe
        self.probe_dots = z(3, dtype=torch.float32)  # [3]: <p, ref>, <p, p>, <ref, ref>

    def state_tensors(self) -> list[torch.Tensor]:
        """Tensors carried from frame to frame (saved and restored around graph warm-up)."""
        return [self.unet_in, self.stock, self.probe_ref, self.latent, self.dec_in]

    def reset_stream(self) -> None:
        """Forget the frames in flight (zeros, as StreamDiffusion starts)."""
        for t in self.state_tensors():
            t.zero_()
