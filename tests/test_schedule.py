"""The precomputed scheduler constants against diffusers' own schedulers, step by step."""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler

from rtdiffusion.config import SchedulerKind
from rtdiffusion.models.loading import read_config
from rtdiffusion.schedule import slot_constants

T_INDEX = (0, 16, 32, 45)


def _ours(c, i, x, eps):
    return c.A[i] * x + c.B[i] * eps  # denoised = A x + B eps


@pytest.mark.parametrize("i", range(len(T_INDEX)))
def test_lcm_step_matches_diffusers(i):
    cfg = read_config("lcm_scheduler_sd15_lcmlora.json")
    c = slot_constants(SchedulerKind.LCM, cfg, 50, T_INDEX)
    g = torch.Generator().manual_seed(i)
    x, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    sched = LCMScheduler.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    sched.set_timesteps(50)
    t = sched.timesteps[T_INDEX[i]]
    assert float(t) == c.timesteps[i]
    ref = sched.step(eps, t, x).denoised
    diff = (ref - _ours(c, i, x, eps)).abs().max().item()
    print(f"LCM slot {i} t={int(t)}: max abs diff {diff:.2e}")
    assert diff < 1e-5  # diffusers keeps alphas_cumprod in float32
    # re-noising for the next slot (equation 3) is diffusers' add_noise at that slot's timestep
    if i + 1 < len(T_INDEX):
        t_next = sched.timesteps[T_INDEX[i + 1]]
        ref_next = sched.add_noise(ref, eps, torch.tensor([int(t_next)]))
        ours_next = c.alpha[i + 1] * _ours(c, i, x, eps) + c.beta[i + 1] * eps
        assert (ref_next - ours_next).abs().max().item() < 1e-5


@pytest.mark.parametrize("i", range(len(T_INDEX)))
def test_turbo_step_matches_diffusers_euler(i):
    cfg = read_config("sd_turbo_scheduler.json")
    c = slot_constants(SchedulerKind.TURBO, cfg, 50, T_INDEX)
    g = torch.Generator().manual_seed(100 + i)
    x, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    sched = EulerDiscreteScheduler.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    sched.set_timesteps(50)
    t = sched.timesteps[T_INDEX[i]]
    assert float(t) == c.timesteps[i]
    # Euler works on x / a (variance exploding); our x is variance preserving: x_VP = a * x_VE
    out = sched.step(eps, t, x / c.alpha[i])
    diff = (out.pred_original_sample - _ours(c, i, x, eps)).abs().max().item()
    print(f"Euler slot {i} t={int(t)}: max abs diff {diff:.2e}")
    assert diff < 1e-5
    # one Euler step to the next slot's sigma == equation 3 with the predicted noise
    if i + 1 < len(T_INDEX):
        sched2 = EulerDiscreteScheduler.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        sched2.set_timesteps(50)
        sigma_next = ((1 - c.alpha[i + 1] ** 2) ** 0.5) / c.alpha[i + 1]
        x0 = out.pred_original_sample
        ours_next = c.alpha[i + 1] * _ours(c, i, x, eps) + c.beta[i + 1] * eps
        assert (c.alpha[i + 1] * (x0 + sigma_next * eps) - ours_next).abs().max().item() < 1e-5
