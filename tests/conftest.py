"""Shared fixtures: the tiny random model, built once per session (CPU, float32)."""

from __future__ import annotations

import os

import pytest
import torch

from rtdiffusion.config import EngineConfig, StreamSettings, VaeKind
from rtdiffusion.models.loading import load_components


@pytest.fixture(scope="session")
def tiny_components():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_components("random:tiny", torch.device("cpu"), torch.float32, VaeKind.TINY, seed=0)


@pytest.fixture()
def make_engine(tiny_components):
    """Build a StreamEngine on the tiny components: make_engine(t_index_list=..., cfg=..., ...)."""
    from rtdiffusion import StreamEngine
    from rtdiffusion.config import apply_updates

    def make(*, width=64, height=64, frames=1, prompt=None, seed=None, **updates):
        config = EngineConfig("random:tiny", width, height, torch.device("cpu"), torch.float32,
                              frame_buffer_size=frames)
        s = StreamSettings()
        engine = StreamEngine(config, tiny_components, apply_updates(s, 50, **updates))
        if prompt is not None:
            engine.update_prompt(prompt)
        if seed is not None:
            engine.update_seed(seed)
        return engine

    return make


# One torch thread per process: the suite runs servers and bridges as real subprocesses next to pytest on
# 2 cores, and oversubscribed torch threads slow the tiny model by 10x or more. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
