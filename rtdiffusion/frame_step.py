"""THE FRAME STEP: the work of one frame, as a list of stages. This is the hot path.

What may NOT go in this file:
- I/O, logging, Python-side state that changes per frame;
- allocation of tensors outside the networks' own forward passes (use the buffers, `out=`, `copy_`,
  in-place ops; no torch.cat, no randn, no clone);
- host syncs (.item(), .cpu(), .tolist(), bool(tensor), torch.cuda.synchronize, printing tensors);
- branching on modes or settings: those choices are made between frames (engine.py / prepare.py) and
  arrive here as the guidance object and as the constants already written into the buffers.

The whole step can therefore be replayed as one CUDA graph (engines/graph.py). Both functions below only
enqueue work on the current stream.

    probe:  frame_u8 -> 8x-subsampled probe, dot products with the last processed probe (similar-frame filter)
    main:   preprocess -> VAE encode -> add noise -> [uncond rows] -> [ControlNets] -> UNet over the stream
            batch -> guidance -> scheduler step -> stock update -> shift the ring -> VAE decode -> postprocess
    overlapped (vae_overlap): the same stages, with the VAE on a parallel branch of the same graph:

        side branch:  preprocess -> encode this call's frames -> latent_next | decode dec_in -> out_u8
        main branch:  x_t[:F] from latent (encoded last call) -> UNet ... ring shift
        join, then:   latent <- latent_next; dec_in <- finished slot      (a frame comes out 2 calls later)
"""

from __future__ import annotations

from typing import Callable

import torch

from engines.base import Networks
from engines.graph import Branch

from .buffers import FrameBuffers
from .guidance import Guidance


def probe_step(b: FrameBuffers) -> None:
    """Similarity of the new frames to the last processed ones, as three dot products (no sync)."""
    b.probe.copy_(b.io.frame_u8[:, ::8, ::8, :])  # [F, H/8, W/8, 3] uint8 -> fp32
    b.probe.mul_(2.0 / 255.0).sub_(1.0)
    p, r = b.probe.view(-1), b.probe_ref.view(-1)
    torch.dot(p, r, out=b.probe_dots[0])
    torch.dot(p, p, out=b.probe_dots[1])
    torch.dot(r, r, out=b.probe_dots[2])


def preprocess(frame_u8: torch.Tensor, image: torch.Tensor) -> None:
    """uint8 NHWC [N, H, W, 3] -> [-1, 1] NCHW [N, 3, H, W], into ``image``."""
    image.copy_(frame_u8.permute(0, 3, 1, 2))
    image.mul_(2.0 / 255.0).sub_(1.0)


def postprocess(image: torch.Tensor, out_u8: torch.Tensor) -> None:
    """[-1, 1] NCHW [N, 3, H, W] (overwritten) -> uint8 NHWC [N, H, W, 3], rounded, into ``out_u8``."""
    image.mul_(127.5).add_(128.0).clamp_(0.0, 255.0)
    out_u8.copy_(image.permute(0, 2, 3, 1))


def no_mark(stage: str) -> None:
    """Stage marker used in production: nothing. The benchmark passes one that records CUDA events."""


def denoise(b: FrameBuffers, nets: Networks, guidance: Guidance, ring_shift: bool,
            mark: Callable[[str], None] = no_mark) -> None:
    """Stages 3-5 of a frame, from x_t (slot 0 already holds the new frames) to ``denoised`` and the ring."""
    # 3. UNet over the stream batch (plus uncond rows for INITIALIZE / FULL), with the family's added
    #    conditioning bundle (b.added: () for SD 1.5 / 2.1; SDXL's text_embeds [B, P], time_ids [B, 6])
    guidance.fill_uncond_rows(b)
    #    ControlNets (control/stack.py): the summed, per-row scaled residuals (down_0 .. mid), or () without
    residuals = b.control.run(b, nets)
    eps = nets.unet(b.unet_in, b.t_unet, b.embeds, *b.added, *residuals)  # [B, 4, h, w]
    mark("unet")
    scheduler_stage(b, eps, guidance, ring_shift)  # 4-5
    mark("scheduler")


def scheduler_stage(b: FrameBuffers, eps: torch.Tensor, guidance: Guidance, ring_shift: bool) -> None:
    """Stages 4-5, from the UNet's rows of this stream (eps [B, 4, h, w]) to ``denoised`` and the shifted ring.
    (multistream_step.py runs it per stream on that stream's rows of the group's one UNet call.)"""
    F = b.layout.frames
    guided = guidance.combine(b, eps)  # [SF, 4, h, w]
    # 4. scheduler step: denoised = A * x_t + B * eps   (schedule.py, equations 1-2)
    torch.mul(b.x_t, b.coef_A, out=b.denoised)
    b.denoised.addcmul_(b.coef_B, guided)
    guidance.update_stock(b, guided)
    # 5. shift the ring in place: slot s+1 <- a_{s+1} * denoised_s + b_{s+1} * noise_{s+1}  (equation 3)
    if ring_shift:  # fixed per layout (S > 1), not per frame
        torch.addcmul(b.renoise[F:], b.alpha_row[F:], b.denoised[:-F], out=b.x_t[F:])


def main_step(b: FrameBuffers, nets: Networks, guidance: Guidance, ring_shift: bool,
              mark: Callable[[str], None] = no_mark) -> None:
    """One stream-batch denoising call: new frames in, the oldest frames in flight out (b.io.out_u8).

    ``mark(name)`` is called as each named stage ends (bench.py times stages with it)."""
    F = b.layout.frames
    b.probe_ref.copy_(b.probe)  # this frame is the filter's new reference
    # 1. preprocess: uint8 NHWC -> [-1, 1] NCHW
    preprocess(b.io.frame_u8, b.image)
    mark("preprocess")
    # 2. encode and add slot-0 noise: x_t[:F] = a_0 * scaling * z + b_0 * noise_0
    latent = nets.encode(b.image)  # [F, 4, h, w]
    torch.addcmul(b.renoise[:F], b.alpha_in, latent, out=b.x_t[:F])
    mark("encode")
    denoise(b, nets, guidance, ring_shift, mark)  # 3-5
    # 6. decode the finished slot and postprocess: [-1, 1] NCHW -> uint8 NHWC, rounded
    torch.mul(b.denoised[-F:], b.inv_scaling, out=b.dec_in)
    image = nets.decode(b.dec_in)  # [F, 3, H, W]
    mark("decode")
    postprocess(image, b.io.out_u8)
    mark("postprocess")


def overlapped_step(b: FrameBuffers, nets: Networks, guidance: Guidance, ring_shift: bool, side: Branch) -> None:
    """main_step with TAESD off the UNet's path: while the UNet denoises the frames encoded in the previous
    call, ``side`` (a second stream, a parallel branch of the captured graph) encodes this call's frames and
    decodes the latents finished in the previous call. Same arithmetic as main_step, the output is the frame
    that came in 2 calls earlier. Only buffers cross between the branches (latent, latent_next, dec_in)."""
    F = b.layout.frames
    b.probe_ref.copy_(b.probe)
    side.fork()
    with side:  # decode first: it reads dec_in, which the main branch rewrites only after the join
        image = nets.decode(b.dec_in)  # [F, 3, H, W]
        postprocess(image, b.io.out_u8)
        preprocess(b.io.frame_u8, b.image)
        b.latent_next.copy_(nets.encode(b.image))  # [F, 4, h, w]
    torch.addcmul(b.renoise[:F], b.alpha_in, b.latent, out=b.x_t[:F])
    denoise(b, nets, guidance, ring_shift)
    side.join()
    b.latent.copy_(b.latent_next)
    torch.mul(b.denoised[-F:], b.inv_scaling, out=b.dec_in)
