"""vae_overlap: TAESD on a parallel branch next to the UNet. Same arithmetic as the plain frame step; each
frame comes out 2 calls later (the CPU runs the branch in order, with the same data flow as on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdiffusion import StreamEngine
from rtdiffusion.bench import synthetic_frames
from rtdiffusion.config import Backend, EngineConfig, StreamSettings, apply_updates
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the device machine)")
def test_overlap_captured_on_cuda_is_the_plain_graph_two_calls_later():
    """On a GPU the branch is a second stream inside the captured graph: same pixels, 2 calls later, and no
    allocation per frame."""
    from rtdiffusion.config import VaeKind
    from rtdiffusion.models.loading import load_components

    comps = load_components("random:tiny", torch.device("cuda"), torch.float16, VaeKind.TINY, seed=0)

    def engine(overlap):
        config = EngineConfig("random:tiny", 64, 64, torch.device("cuda"), torch.float16, backend=Backend.GRAPH,
                              vae_overlap=overlap)
        return StreamEngine(config, comps, apply_updates(StreamSettings(), 50, t_index_list=[10, 30], cfg="self"))

    plain, over = engine(False), engine(True)
    assert plain.backend_fallback is None and over.backend_fallback is None
    frames = synthetic_frames(8, 64, 64)
    want = [plain(f) for f in frames]
    got = [over(f) for f in frames[:4]]
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    got += [over(f) for f in frames[4:]]
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    for n in range(1, len(frames) - 2):
        assert np.array_equal(got[n + 2], want[n])
