"""The competitor `rtdiffusion bench --compare-baseline` measures: StreamDiffusion's plain loop, compiled.

This is StreamDiffusion's algorithm as its own ``StreamDiffusion.__call__`` / ``predict_x0_batch`` /
``unet_step`` write it (cumulo-autumn/StreamDiffusion, src/streamdiffusion/pipeline.py): diffusers modules,
a new tensor for every intermediate of every frame (``torch.cat`` of the stream batch, the stock noise and
the latent buffer rebuilt each call), the output copied to the host at the end of each call. The one change
a user makes to speed it up is :meth:`BaselineStream.compile`: ``torch.compile(mode="reduce-overhead")`` on
the UNet and on both TAESD halves (encoder, decoder), i.e. Inductor kernels replayed through CUDA graphs.
The input frame is already on the GPU (a uint8 [H, W, 3] tensor), which favours the baseline: our engine is
timed from host frames.

Not part of the engine: nothing in rtdiffusion imports this module except the bench command. The per-slot
constants come from :mod:`rtdiffusion.schedule` and the noise from :func:`rtdiffusion.prepare.make_noise`, so
with the same weights, seed and settings it computes what the engine computes (the CPU test holds the two
within one grey level), and any speed difference is the implementation's.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .config import CfgMode, StreamSettings, VaeKind
from .models.loading import Components
from .prepare import make_noise
from .schedule import SlotConstants

log = logging.getLogger(__name__)


class BaselineStream:
    """StreamDiffusion's img2img loop, one frame per call (frame_buffer_size 1)."""

    def __init__(self, comps: Components, consts: SlotConstants, settings: StreamSettings,
                 cond: torch.Tensor, uncond: torch.Tensor | None, height: int, width: int):
        unet, vae = comps.unet, comps.vae
        dev, dt = next(unet.parameters()).device, next(unet.parameters()).dtype
        S = len(consts.timesteps)
        scale = comps.vae_scale_factor
        self.unet, self.vae, self.device, self.dtype = unet, vae, dev, dt
        self.S, self.cfg = S, settings.effective_cfg
        self.guidance_scale, self.delta = settings.guidance_scale, settings.delta
        self.scaling = comps.latent_scaling

        def col(v):  # [S, 1, 1, 1]
            return torch.tensor(v, dtype=torch.float64).view(-1, 1, 1, 1).to(device=dev, dtype=dt)

        self.t_list = torch.tensor([int(t) for t in consts.timesteps], dtype=torch.long, device=dev)  # [S]
        self.alpha_prod_t_sqrt, self.beta_prod_t_sqrt = col(consts.alpha), col(consts.beta)
        self.c_skip, self.c_out = col(consts.c_skip), col(consts.c_out)
        h, w = height // scale, width // scale
        self.init_noise = make_noise(settings.seed, (S, 4, h, w), dev).to(dt)  # [S, 4, h, w], as the engine's
        self.stock_noise = torch.zeros_like(self.init_noise)
        self.x_t_latent_buffer = torch.zeros(S - 1, 4, h, w, dtype=dt, device=dev) if S > 1 else None
        self.prompt_embeds = cond.expand(S, -1, -1).contiguous()  # [S, T, D]
        if self.cfg is CfgMode.FULL:
            self.prompt_embeds = torch.cat([uncond.expand(S, -1, -1), self.prompt_embeds])
        elif self.cfg is CfgMode.INITIALIZE:
            self.prompt_embeds = torch.cat([uncond, self.prompt_embeds])
        self._unet, self._encoder, self._decoder = unet, vae.encoder, vae.decoder
        self.compiled = False

    def compile(self) -> None:
        """What a user adds: torch.compile(mode="reduce-overhead") on the UNet and both TAESD halves."""
        self._unet = torch.compile(self.unet, mode="reduce-overhead")
        self._encoder = torch.compile(self.vae.encoder, mode="reduce-overhead")
        self._decoder = torch.compile(self.vae.decoder, mode="reduce-overhead")
        self.compiled = True

    # ---- StreamDiffusion's methods, same names, same tensor flow ----------------------------------------
    def add_noise(self, original_samples, noise, t_index):
        return self.alpha_prod_t_sqrt[t_index] * original_samples + self.beta_prod_t_sqrt[t_index] * noise

    def scheduler_step_batch(self, model_pred_batch, x_t_latent_batch):
        F_theta = (x_t_latent_batch - self.beta_prod_t_sqrt * model_pred_batch) / self.alpha_prod_t_sqrt
        return self.c_out * F_theta + self.c_skip * x_t_latent_batch

    def unet_step(self, x_t_latent, t_list):
        g, cfg = self.guidance_scale, self.cfg
        if cfg is CfgMode.INITIALIZE:
            x_t_latent_plus_uc = torch.concat([x_t_latent[0:1], x_t_latent], dim=0)
            t_list = torch.concat([t_list[0:1], t_list], dim=0)
        elif cfg is CfgMode.FULL:
            x_t_latent_plus_uc = torch.concat([x_t_latent, x_t_latent], dim=0)
            t_list = torch.concat([t_list, t_list], dim=0)
        else:
            x_t_latent_plus_uc = x_t_latent
        model_pred = self._unet(x_t_latent_plus_uc, t_list, encoder_hidden_states=self.prompt_embeds,
                                return_dict=False)[0]
        if cfg is CfgMode.INITIALIZE:
            noise_pred_text = model_pred[1:]
            self.stock_noise = torch.concat([model_pred[0:1], self.stock_noise[1:]], dim=0)
        elif cfg is CfgMode.FULL:
            noise_pred_uncond, noise_pred_text = model_pred.chunk(2)
        else:
            noise_pred_text = model_pred
        if cfg in (CfgMode.SELF, CfgMode.INITIALIZE):
            noise_pred_uncond = self.stock_noise * self.delta
        if cfg is not CfgMode.NONE:
            model_pred = noise_pred_uncond + g * (noise_pred_text - noise_pred_uncond)
        else:
            model_pred = noise_pred_text
        denoised_batch = self.scheduler_step_batch(model_pred, x_t_latent)
        if cfg in (CfgMode.SELF, CfgMode.INITIALIZE):
            scaled_noise = self.beta_prod_t_sqrt * self.stock_noise
            delta_x = self.scheduler_step_batch(model_pred, scaled_noise)
            alpha_next = torch.concat([self.alpha_prod_t_sqrt[1:], torch.ones_like(self.alpha_prod_t_sqrt[0:1])])
            delta_x = alpha_next * delta_x
            beta_next = torch.concat([self.beta_prod_t_sqrt[1:], torch.ones_like(self.beta_prod_t_sqrt[0:1])])
            delta_x = delta_x / beta_next
            init_noise = torch.concat([self.init_noise[1:], self.init_noise[0:1]], dim=0)
            self.stock_noise = init_noise + delta_x
        return denoised_batch

    def predict_x0_batch(self, x_t_latent):
        t_list = self.t_list
        if self.S > 1:
            x_t_latent = torch.cat((x_t_latent, self.x_t_latent_buffer), dim=0)
            self.stock_noise = torch.cat((self.init_noise[0:1], self.stock_noise[:-1]), dim=0)
        x_0_pred_batch = self.unet_step(x_t_latent, t_list)
        if self.S > 1:
            x_0_pred_out = x_0_pred_batch[-1].unsqueeze(0)
            self.x_t_latent_buffer = (self.alpha_prod_t_sqrt[1:] * x_0_pred_batch[:-1]
                                      + self.beta_prod_t_sqrt[1:] * self.init_noise[1:])
        else:
            x_0_pred_out = x_0_pred_batch
        return x_0_pred_out

    @torch.no_grad()
    def __call__(self, frame: torch.Tensor) -> np.ndarray:
        """frame: uint8 [H, W, 3] on the device -> uint8 [H, W, 3] numpy (the frame S-1 calls earlier)."""
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # a new frame: earlier graph outputs may be reused
        x = frame.permute(2, 0, 1)[None].to(self.dtype) / 255.0 * 2.0 - 1.0  # [1, 3, H, W] in [-1, 1]
        img_latent = self._encoder(x) * self.scaling  # AutoencoderTiny.encode: the encoder itself
        x_t_latent = self.add_noise(img_latent, self.init_noise[0], 0)
        x_0_pred_out = self.predict_x0_batch(x_t_latent)
        image = self._decoder(x_0_pred_out / self.scaling)  # [1, 3, H, W] in about [-1, 1]
        out = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0)
        return out.cpu().numpy()  # the host copy syncs, as the original's torch.cuda.synchronize() does


def build_baseline(engine, comps: Components) -> BaselineStream:
    """A baseline with ``engine``'s settings on ``comps`` (a separate copy of the same weights: the engine
    changes its own modules' memory format, a plain user's loop does not)."""
    with engine._frame_lock:
        engine._boundary()  # settings given but not yet applied (they apply at the next frame) count
    s = engine.settings
    if engine.config.frame_buffer_size != 1 or engine.config.vae is not VaeKind.TINY:
        raise ValueError("the baseline runs one frame per call (frame_buffer_size 1) with TAESD (vae 'tiny')")
    if engine.components.unet.config.get("addition_embed_type"):
        raise ValueError("the baseline covers SD 1.5 / 2.1 UNets (no added conditioning); got an SDXL-style UNet")
    cond = engine._prompts.embed(s.prompt)  # [1, T, D], the same embedding the engine uses
    uncond = engine._prompts.negative(s.prompt) if s.effective_cfg in (CfgMode.FULL, CfgMode.INITIALIZE) else None
    cond, uncond = (getattr(e, "embeds", e) for e in (cond, uncond))  # a TextEmbedding bundle or a tensor
    consts = engine._slot_constants(s.t_index_list)
    return BaselineStream(comps, consts, s, cond, uncond, engine.height, engine.width)


def time_baseline(stream: BaselineStream, frames: list[np.ndarray], n: int, warmup: int) -> list[float]:
    """Wall-clock ms per call over ``n`` calls after ``warmup`` (frames uploaded once, before timing)."""
    dev = stream.device
    gpu = [torch.from_numpy(f).to(dev) for f in frames]
    for i in range(warmup):
        stream(gpu[i % len(gpu)])
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        stream(gpu[i % len(gpu)])
        times.append((time.perf_counter() - t0) * 1e3)
    return times
