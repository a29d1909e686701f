"""Per-slot scheduler constants, computed when settings change, never inside a frame.

Notation (StreamDiffusion, after the LCM paper). For denoising slot i with timestep t_i:

    a_i = sqrt(alphas_cumprod[t_i])          b_i = sqrt(1 - alphas_cumprod[t_i])
    (1) x0_i       = (x_i - b_i * eps_i) / a_i                    # predicted clean latent
    (2) denoised_i = c_out_i * x0_i + c_skip_i * x_i              # LCM boundary condition
    (3) x_{i+1}    = a_{i+1} * denoised_i + b_{i+1} * noise_{i+1} # re-noise for the next slot

(1)+(2) fold into one multiply-add per element: denoised = A * x + B * eps with
    A = c_out / a + c_skip,   B = -c_out * b / a.

LCM takes c_skip, c_out from diffusers' LCMScheduler; TURBO (sd-turbo's Euler with trailing spacing) predicts
x0 directly: c_skip = 0, c_out = 1, which makes (2) the Euler x0 estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import SchedulerKind


@dataclass(frozen=True)
class SlotConstants:
    """Host-side constants of the S denoising slots (one value per slot, noisiest first)."""

    timesteps: tuple[float, ...]
    alpha: tuple[float, ...]  # a_i
    beta: tuple[float, ...]  # b_i
    c_skip: tuple[float, ...]
    c_out: tuple[float, ...]

    @property
    def A(self) -> tuple[float, ...]:
        return tuple(co / a + cs for co, a, cs in zip(self.c_out, self.alpha, self.c_skip))

    @property
    def B(self) -> tuple[float, ...]:
        return tuple(-co * b / a for co, a, b in zip(self.c_out, self.alpha, self.beta))


def make_scheduler(kind: SchedulerKind, config: dict[str, Any]):
    """The diffusers scheduler whose timesteps and constants we precompute from."""
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cls = LCMScheduler if kind is SchedulerKind.LCM else EulerDiscreteScheduler
    return cls.from_config(cfg)


def slot_constants(kind: SchedulerKind, config: dict[str, Any], num_inference_steps: int,
                   t_index_list: tuple[int, ...]) -> SlotConstants:
    sched = make_scheduler(kind, config)
    sched.set_timesteps(num_inference_steps, device="cpu")
    all_t = sched.timesteps.tolist()
    ts = [float(all_t[i]) for i in t_index_list]
    acp = sched.alphas_cumprod.double()
    alpha = tuple(float(acp[int(t)].sqrt()) for t in ts)
    beta = tuple(float((1 - acp[int(t)]).sqrt()) for t in ts)
    if kind is SchedulerKind.LCM:
        scal = [sched.get_scalings_for_boundary_condition_discrete(torch.tensor(int(t))) for t in ts]
        c_skip = tuple(float(s[0]) for s in scal)
        c_out = tuple(float(s[1]) for s in scal)
    else:
        c_skip, c_out = (0.0,) * len(ts), (1.0,) * len(ts)
    return SlotConstants(tuple(ts), alpha, beta, c_skip, c_out)
