"""The engine's per-frame recurrence against StreamDiffusion's algorithm written plainly.

The reference below follows StreamDiffusion's img2img stream batch (``predict_x0_batch``, ``unet_step``,
``scheduler_step_batch``) in its clearest form: torch.cat, fresh tensors, no buffers. Same components, same
noise, same frames; the engine must agree to 1e-4 on every latent and to 1 grey level on the pixels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rtdiffusion.config import CfgMode, SchedulerKind
from rtdiffusion.schedule import make_scheduler


class ReferenceStream:
    def __init__(self, comps, t_index_list, cfg, guidance_scale, delta, seed, prompt, negative="",
                 frames=1, steps=50, kind=SchedulerKind.TURBO, height=64, width=64):
        self.c = comps
        self.F, self.S = frames, len(t_index_list)
        self.cfg = CfgMode(cfg) if guidance_scale > 1 else CfgMode.NONE
        self.g, self.delta = guidance_scale, delta
        sched = make_scheduler(kind, comps.scheduler_config)
        sched.set_timesteps(steps)
        ts = [int(sched.timesteps[i]) for i in t_index_list]
        acp = sched.alphas_cumprod.double()
        rows = lambda v: torch.tensor(v, dtype=torch.float64).repeat_interleave(frames).view(-1, 1, 1, 1).float()  # noqa
        self.t = torch.tensor(ts, dtype=torch.float32).repeat_interleave(frames)
        self.alpha = rows([math.sqrt(acp[t]) for t in ts])
        self.beta = rows([math.sqrt(1 - acp[t]) for t in ts])
        if kind is SchedulerKind.LCM:
            sc = [sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t)) for t in ts]
            self.c_skip, self.c_out = rows([float(s[0]) for s in sc]), rows([float(s[1]) for s in sc])
        else:
            self.c_skip, self.c_out = rows([0.0] * len(ts)), rows([1.0] * len(ts))
        h, w = height // comps.vae_scale_factor, width // comps.vae_scale_factor
        SF = self.S * frames
        self.init_noise = torch.randn((SF, 4, h, w), generator=torch.Generator().manual_seed(seed))
        self.stock_noise = torch.zeros_like(self.init_noise)
        self.x_t_latent_buffer = torch.zeros(((self.S - 1) * frames, 4, h, w))
        enc = lambda text: comps.text_encoder(comps.tokenizer([text]))[0]  # noqa: E731
        cond = enc(prompt)
        if self.cfg is CfgMode.INITIALIZE:
            self.embeds = torch.cat([enc(negative).repeat(frames, 1, 1), cond.repeat(SF, 1, 1)])
        elif self.cfg is CfgMode.FULL:
            self.embeds = torch.cat([enc(negative).repeat(SF, 1, 1), cond.repeat(SF, 1, 1)])
        else:
            self.embeds = cond.repeat(SF, 1, 1)
        self.scaling = comps.latent_scaling
        self.denoised = None

    def scheduler_step_batch(self, model_pred, x_t):
        F_theta = (x_t - self.beta * model_pred) / self.alpha
        return self.c_out * F_theta + self.c_skip * x_t

    @torch.no_grad()
    def __call__(self, frame_u8: np.ndarray) -> np.ndarray:
        F, S = self.F, self.S
        frames = torch.from_numpy(frame_u8).reshape(F, *frame_u8.shape[-3:])
        x = frames.permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
        latent = self.c.vae.encode(x).latents * self.scaling
        x_t = self.alpha[:F] * latent + self.beta[:F] * self.init_noise[:F]
        t_list = self.t
        if S > 1:
            x_t = torch.cat([x_t, self.x_t_latent_buffer])
            self.stock_noise = torch.cat([self.init_noise[:F], self.stock_noise[:-F]])
        # unet_step
        if self.cfg is CfgMode.INITIALIZE:
            x_in, t_in = torch.cat([x_t[:F], x_t]), torch.cat([t_list[:F], t_list])
        elif self.cfg is CfgMode.FULL:
            x_in, t_in = torch.cat([x_t, x_t]), torch.cat([t_list, t_list])
        else:
            x_in, t_in = x_t, t_list
        pred = self.c.unet(x_in, t_in, encoder_hidden_states=self.embeds).sample
        if self.cfg is CfgMode.INITIALIZE:
            text = pred[F:]
            self.stock_noise = torch.cat([pred[:F], self.stock_noise[F:]])
        elif self.cfg is CfgMode.FULL:
            uncond, text = pred.chunk(2)
        else:
            text = pred
        if self.cfg in (CfgMode.SELF, CfgMode.INITIALIZE):
            uncond = self.stock_noise * self.delta
        model_pred = uncond + self.g * (text - uncond) if self.cfg is not CfgMode.NONE else text
        denoised = self.scheduler_step_batch(model_pred, x_t)
        if self.cfg in (CfgMode.SELF, CfgMode.INITIALIZE):
            delta_x = self.scheduler_step_batch(model_pred, self.beta * self.stock_noise)
            one = torch.ones(F, 1, 1, 1)
            delta_x = torch.cat([self.alpha[F:], one]) * delta_x / torch.cat([self.beta[F:], one])
            self.stock_noise = torch.cat([self.init_noise[F:], self.init_noise[:F]]) + delta_x
        if S > 1:
            out = denoised[-F:]
            self.x_t_latent_buffer = self.alpha[F:] * denoised[:-F] + self.beta[F:] * self.init_noise[F:]
        else:
            out = denoised
        self.denoised = denoised
        image = self.c.vae.decode(out / self.scaling).sample
        u8 = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        return u8.numpy().reshape(frame_u8.shape)


def moving_frames(n, frames=1, size=64, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        f = np.roll(base, shift=3 * i, axis=1)
        out.append(np.stack([np.roll(f, k, axis=0) for k in range(frames)]) if frames > 1 else f)
    return out


CASES = [
    dict(t_index_list=[32], cfg="none", guidance_scale=1.0),
    dict(t_index_list=[10, 30], cfg="none", guidance_scale=1.0),
    dict(t_index_list=[0, 16, 32, 45], cfg="self", guidance_scale=1.4, delta=0.8),
    dict(t_index_list=[20, 40], cfg="initialize", guidance_scale=1.3, delta=1.0),
    dict(t_index_list=[20, 40], cfg="full", guidance_scale=1.5),
    dict(t_index_list=[25], cfg="self", guidance_scale=2.0, delta=1.0),
    dict(t_index_list=[15, 35], cfg="initialize", guidance_scale=1.2, frames=2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['cfg']}-S{len(c['t_index_list'])}-F{c.get('frames', 1)}")
def test_engine_matches_reference(case, make_engine, tiny_components):
    case = dict(case)
    frames = case.pop("frames", 1)
    delta = case.get("delta", 1.0)
    engine = make_engine(frames=frames, prompt="a glass jellyfish", seed=7, **case)
    ref = ReferenceStream(tiny_components, case["t_index_list"], case["cfg"], case["guidance_scale"], delta,
                          seed=7, prompt="a glass jellyfish", frames=frames)
    worst_latent, worst_px = 0.0, 0
    for frame in moving_frames(5, frames):
        out = engine(frame)
        expect = ref(frame)
        b = engine._state.buffers
        # relative to the latent's size: an S=1 self-CFG stock grows frame by frame, and rounding with it
        scale = max(1.0, ref.denoised.abs().max().item())
        worst_latent = max(worst_latent, (b.denoised - ref.denoised).abs().max().item() / scale)
        worst_px = max(worst_px, int(np.abs(out.astype(int) - expect.astype(int)).max()))
        assert out.shape == expect.shape and out.dtype == np.uint8
    print(f"{case}: max latent diff (relative to max(1, |latent|)) {worst_latent:.2e}, max pixel diff {worst_px}")
    assert worst_latent < 1e-4
    assert worst_px <= 1


def test_stream_batch_latency_is_s_minus_1_frames(make_engine):
    """With S steps, frame k's result comes out at call k + S - 1 (the ring carries it)."""
    engine = make_engine(t_index_list=[10, 25, 40], seed=3)
    ref = ReferenceStream(engine.components, [10, 25, 40], "none", 1.0, 1.0, seed=3, prompt="")
    outs = [engine(f) for f in moving_frames(5)]
    refs = [ref(f) for f in moving_frames(5)]
    assert engine.status()["latency_frames"] == 2
    for o, r in zip(outs, refs):
        assert np.abs(o.astype(int) - r.astype(int)).max() <= 1
