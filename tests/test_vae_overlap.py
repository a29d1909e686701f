"""vae_overlap: TAESD on a parallel branch next to the UNet. Same arithmetic as the plain frame step; each
frame comes out 2 calls later (the CPU runs the branch in order, with the same data flow as on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdiffusion import StreamEngine
from rtdiffusion.bench import synthetic_frames
from rtdiffusion.config import EngineConfig, StreamSettings, apply_updates
from rtdiffusion.errors import ConfigError


def _engine(comps, overlap: bool, **updates) -> StreamEngine:
    config = EngineConfig("random:tiny", 64, 64, torch.device("cpu"), torch.float32, vae_overlap=overlap)
    return StreamEngine(config, comps, apply_updates(StreamSettings(), 50, **updates))


@pytest.mark.parametrize("case", [dict(t_index_list=[32], cfg="none"),
                                  dict(t_index_list=[10, 30], cfg="self", guidance_scale=1.4)])
def test_overlap_is_the_plain_step_two_calls_later(case, tiny_components):
    plain, over = _engine(tiny_components, False, **case), _engine(tiny_components, True, **case)
    frames = synthetic_frames(7, 64, 64)
    want = [plain(f) for f in frames]
    got = [over(f) for f in frames]
    first = len(case["t_index_list"]) - 1  # the plain step's first S-1 outputs are the empty ring's
    for n in range(first, len(frames) - 2):
        assert np.array_equal(got[n + 2], want[n]), f"overlapped call {n + 2} is not the plain call {n}"
    assert over.status()["latency_frames"] == plain.status()["latency_frames"] + 2
    assert over.status()["vae_overlap"] is True and plain.status()["vae_overlap"] is False


def test_overlap_eager_bypass_keeps_the_same_flow(tiny_components):
    over = _engine(tiny_components, True)
    frames = synthetic_frames(4, 64, 64)
    ref = _engine(tiny_components, True)
    a = [over(f, use_graph=False) for f in frames]
    b = [ref(f) for f in frames]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_vae_overlap_must_be_a_bool():
    with pytest.raises(ConfigError, match="vae_overlap must be True or False"):
        EngineConfig("random:tiny", 64, 64, torch.device("cpu"), torch.float32, vae_overlap="yes")
