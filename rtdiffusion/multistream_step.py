r"""Many streams, one UNet call per tick: the group layout, its buffers, and the group step (a hot path).

A group of N streams (each F frames per call, its own S_i slots, CFG mode, prompt, seed, constants) shares
one UNet call per tick. The UNet's inputs are allocated once per group layout as one arena, and each
stream's :class:`~rtdiffusion.buffers.FrameBuffers` holds VIEWS (row slices) of it, so the per-stream
stages of ``frame_step.py`` run unchanged on their views and the UNet runs once over every row:

    unet_in [R, 4, h, w], t_unet [R], embeds [R, T, D] (+ SDXL's text_embeds [R, P], time_ids [R, 6]),
    R = sum_i B_i rows:
        [ stream 0: uncond U_0 | x_t S_0*F ][ stream 1: uncond U_1 | x_t S_1*F ] ... [ stream N-1 ... ]
          \______ b_0.unet_in = unet_in[r_0 : r_0 + B_0] ______/

    frame_u8 / out_u8 [N*F, H, W, 3] uint8, image [N*F, 3, H, W], dec_in [N*F, 4, h, w]:
        rows [i*F, (i+1)*F) belong to stream i, so TAESD encodes and decodes every stream's frames in one call.

The I/O rows (frame_u8, out_u8) live as long as the group (their addresses never move); everything else
is per group layout. Like ``frame_step.py``, :func:`group_step` only enqueues work on the current stream:
no I/O, no allocation outside the networks, no host sync, no branching on settings (the guidance objects
and ring flags are fixed per layout), so a graph backend captures it as one CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.base import Networks

from .buffers import FrameBuffers, FrameIO, StreamLayout
from .conditioning import AddedConditioning
from .frame_step import postprocess, preprocess, scheduler_stage
from .guidance import Guidance, make_guidance


@dataclass(frozen=True)
class GroupLayout:
    """The layouts of the N streams, in stream order: what fixes the group's shapes and its captured graph."""

    streams: tuple[StreamLayout, ...]

    @property
    def row_starts(self) -> tuple[int, ...]:
        starts, r = [], 0
        for L in self.streams:
            starts.append(r)
            r += L.unet_rows
        return tuple(starts)

    @property
    def unet_rows(self) -> int:  # R
        return sum(L.unet_rows for L in self.streams)


@dataclass(frozen=True)
class GroupIO:
    """Every stream's frames in and out, [N*F, H, W, 3] uint8 on the device, made once per group."""

    frame_u8: torch.Tensor
    out_u8: torch.Tensor

    def stream(self, index: int, frames: int) -> FrameIO:
        rows = slice(index * frames, (index + 1) * frames)
        return FrameIO(self.frame_u8[rows], self.out_u8[rows])  # [F, H, W, 3] views


class GroupArena:
    """The tensors the group's batched calls read and write, allocated once per group layout."""

    def __init__(self, layout: GroupLayout, io: GroupIO, conditioning: AddedConditioning):
        L0 = layout.streams[0]
        R, NF = layout.unet_rows, io.frame_u8.shape[0]
        lat, dev, dt = (L0.latent_h, L0.latent_w), L0.device, L0.dtype
        z = lambda *shape, dtype=dt: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
        self.io = io
        self.image = z(NF, 3, L0.height, L0.width)  # [N*F, 3, H, W] in [-1, 1]
        self.dec_in = z(NF, 4, *lat)  # [N*F, 4, h, w] finished latents / vae scaling
        self.unet_in = z(R, 4, *lat)  # [R, 4, h, w]
        self.t_unet = z(R, dtype=torch.float32)  # [R] float32 timesteps
        self.embeds = z(R, L0.text_tokens, L0.text_dim)  # [R, T, D]
        self.added = conditioning.allocate(R, dt, dev)  # () or SDXL's text_embeds [R, P], time_ids [R, 6]


class StreamRows(FrameBuffers):
    """One stream's FrameBuffers whose UNet inputs, image and dec_in are row slices of the group's arena.

    Everything else (ring constants, noise, stock, denoised) is the stream's own, as in a single engine."""

    def __init__(self, layout: StreamLayout, arena: GroupArena, index: int, row_start: int,
                 conditioning: AddedConditioning):
        F = layout.frames
        super().__init__(layout, arena.io.stream(index, F), conditioning)
        rows, frames = slice(row_start, row_start + layout.unet_rows), slice(index * F, (index + 1) * F)
        # replace the stream's own UNet inputs by views of the arena (the freshly made ones are dropped)
        self.unet_in = arena.unet_in[rows]  # [B, 4, h, w] view
        self.x_t = self.unet_in[layout.uncond_rows:]  # [SF, 4, h, w] view: the stream ring
        self.t_unet = arena.t_unet[rows]  # [B] view
        self.embeds = arena.embeds[rows]  # [B, T, D] view
        self.added = tuple(a[rows] for a in arena.added)
        conditioning.write_size(self.added, layout.height, layout.width)
        self.image = arena.image[frames]  # [F, 3, H, W] view
        self.dec_in = arena.dec_in[frames]  # [F, 4, h, w] view


@dataclass
class StreamSlot:
    """One stream's part of a group layout."""

    buffers: StreamRows
    guidance: Guidance
    ring_shift: bool  # S > 1
    rows: slice  # its rows of the UNet batch
    frames: slice  # its rows of the [N*F] frame arenas


class GroupState:
    """A group layout's arena and per-stream buffers (one per group layout; rebuilt when a layout changes)."""

    def __init__(self, layout: GroupLayout, io: GroupIO, conditioning: AddedConditioning):
        self.layout = layout
        self.arena = GroupArena(layout, io, conditioning)
        self.slots: list[StreamSlot] = []
        for i, (L, r0) in enumerate(zip(layout.streams, layout.row_starts)):
            b = StreamRows(L, self.arena, i, r0, conditioning)
            self.slots.append(StreamSlot(b, make_guidance(L.cfg, L.slots), L.slots > 1,
                                         slice(r0, r0 + L.unet_rows), slice(i * L.frames, (i + 1) * L.frames)))

    def state_tensors(self) -> list[torch.Tensor]:
        """Tensors carried from tick to tick, every stream's (graph warm-up saves and restores them)."""
        return [t for s in self.slots for t in s.buffers.state_tensors()]


def group_step(g: GroupState, nets: Networks) -> None:
    """One tick: every stream's new frames in, every stream's oldest frames in flight out (io.out_u8).

    The same arithmetic per stream as frame_step.main_step; the networks run once over all streams' rows."""
    a = g.arena
    # 1-2. preprocess and encode every stream's frames at once, then each stream adds its own slot-0 noise
    preprocess(a.io.frame_u8, a.image)  # [N*F, 3, H, W]
    latent = nets.encode(a.image)  # [N*F, 4, h, w]
    for s in g.slots:
        b = s.buffers
        torch.addcmul(b.renoise[:b.layout.frames], b.alpha_in, latent[s.frames], out=b.x_t[:b.layout.frames])
        s.guidance.fill_uncond_rows(b)
    # 3. ONE UNet call over every stream's rows (each stream's timesteps, prompt and added conditioning)
    eps = nets.unet(a.unet_in, a.t_unet, a.embeds, *a.added)  # [R, 4, h, w]
    # 4-5. per stream, on its rows: guidance, scheduler step, stock update, ring shift; its finished slot out
    for s in g.slots:
        b = s.buffers
        scheduler_stage(b, eps[s.rows], s.guidance, s.ring_shift)
        torch.mul(b.denoised[-b.layout.frames:], b.inv_scaling, out=b.dec_in)
    # 6. decode every stream's finished frames at once and postprocess
    image = nets.decode(a.dec_in)  # [N*F, 3, H, W]
    postprocess(image, a.io.out_u8)
