"""Between frames: write settings into a layout's buffers, in place.

Everything here may allocate and may sync (it runs only when settings change); everything it writes lands
in the preallocated buffers with ``copy_`` / ``fill_``, so a captured frame graph stays valid.
"""

from __future__ import annotations

import torch

from .buffers import FrameBuffers
from .config import CfgMode, SeedSpec, StreamSettings
from .prompts import TextEmbedding
from .schedule import SlotConstants


def _rows(values: tuple[float, ...], frames: int) -> torch.Tensor:
    """Per-slot values repeated over the F rows of each slot: [S*F, 1, 1, 1] float64 on the CPU."""
    return torch.tensor(values, dtype=torch.float64).repeat_interleave(frames).view(-1, 1, 1, 1)


def write_schedule(b: FrameBuffers, c: SlotConstants, settings: StreamSettings, latent_scaling: float) -> None:
    F, U = b.layout.frames, b.layout.uncond_rows
    a, be, A, B = (_rows(v, F) for v in (c.alpha, c.beta, c.A, c.B))
    one = torch.ones(F, 1, 1, 1, dtype=torch.float64)
    a_next, b_next = torch.cat([a[F:], one]), torch.cat([be[F:], one])  # next slot's; 1 on the last slot
    for dst, src in ((b.alpha_row, a), (b.beta_row, be), (b.coef_A, A), (b.coef_B, B),
                     (b.alpha_in, a[:F] * latent_scaling),
                     (b.stock_K1, a_next / b_next * A * be), (b.stock_K2, a_next / b_next * B)):
        dst.copy_(src)
    t = _rows(c.timesteps, F).view(-1)
    b.t_unet.copy_(torch.cat([t[:U], t]) if b.layout.cfg is CfgMode.INITIALIZE else
                   torch.cat([t, t]) if b.layout.cfg is CfgMode.FULL else t)
    b.inv_scaling = 1.0 / latent_scaling
    g, d = settings.guidance_scale, settings.delta
    b.g.fill_(g)
    b.g_uncond.fill_((1.0 - g) if b.layout.cfg is CfgMode.FULL else (1.0 - g) * d)
    _write_noise_terms(b)


def make_noise(seed: SeedSpec, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Seeded gaussian noise; a blend of seeds is renormalised to unit variance. float32."""
    total = None
    for s, w in seed.parts:
        g = torch.Generator(device=device).manual_seed(s)
        n = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        total = n * w if total is None else total + n * w
    norm = sum(w * w for _, w in seed.parts) ** 0.5
    return total / norm


def write_noise(b: FrameBuffers, seed: SeedSpec) -> None:
    b.init_noise.copy_(make_noise(seed, tuple(b.init_noise.shape), b.init_noise.device))
    _write_noise_terms(b)


def _write_noise_terms(b: FrameBuffers) -> None:
    F = b.layout.frames
    torch.mul(b.init_noise, b.beta_row, out=b.renoise)  # b * noise, added to each slot's input
    b.stock_shift[:-F].copy_(b.init_noise[F:])  # init noise rolled by one slot (RCFG stock update)
    b.stock_shift[-F:].copy_(b.init_noise[:F])


def write_embeds(b: FrameBuffers, cond: TextEmbedding, uncond: TextEmbedding | None) -> None:
    """Prompt embeddings [1, T, D] into every row, and the prompt's part of the added conditioning (SDXL's
    pooled embedding). Uncond rows (INITIALIZE / FULL) come first, as in unet_in. With an IP-Adapter the
    embeds are [B, T + T_ip, D]: only the first T tokens are the prompt's (control/style.py writes the rest)."""
    U, T = b.layout.uncond_rows, cond.embeds.shape[1]
    b.embeds[U:, :T].copy_(cond.embeds.expand(b.layout.stream_rows, -1, -1))
    if U:
        b.embeds[:U, :T].copy_(uncond.embeds.expand(U, -1, -1))
    b.conditioning.write_prompt(b.added, cond, uncond, U)
