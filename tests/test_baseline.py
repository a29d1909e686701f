"""bench --compare-baseline's competitor (rtdiffusion/baseline.py): StreamDiffusion's plain loop on the same
weights and settings computes what the engine computes (so a speed ratio compares implementations only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdiffusion.baseline import build_baseline, time_baseline
from rtdiffusion.bench import compare_baseline, run_bench, synthetic_frames
from rtdiffusion.models.loading import load_components
from rtdiffusion.config import VaeKind


@pytest.mark.parametrize("case", [dict(t_index_list=[32], cfg="none"),
                                  dict(t_index_list=[10, 30], cfg="self", guidance_scale=1.4, delta=0.8),
                                  dict(t_index_list=[10, 30], cfg="initialize", guidance_scale=1.4),
                                  dict(t_index_list=[20], cfg="full", guidance_scale=1.5)])
def test_baseline_matches_engine(case, make_engine):
    engine = make_engine(prompt="a test prompt", seed=5, **case)
    comps = load_components("random:tiny", torch.device("cpu"), torch.float32, VaeKind.TINY, seed=0)
    base = build_baseline(engine, comps)
    for i, f in enumerate(synthetic_frames(6, 64, 64)):
        ours = engine(f)
        theirs = base(torch.from_numpy(f))
        assert theirs.shape == ours.shape and theirs.dtype == np.uint8
        diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
        assert diff <= 1, f"frame {i}: engine and StreamDiffusion loop differ by {diff} grey levels"


def test_compare_baseline_records_the_ratio(make_engine):
    engine = make_engine()
    result = run_bench(engine, frames=3, warmup=1, profile=False, flops=False)
    b = compare_baseline(engine, result, frames=3, warmup=1)
    assert b is result.baseline and "eager" in b["name"]
    assert b["ratio"] == pytest.approx(b["frame_ms"]["median"] / result.frame_ms["median"])
    assert "baseline" in result.table() and "faster" in result.table()


def test_time_baseline_times_each_call(make_engine, tiny_components):
    engine = make_engine()
    base = build_baseline(engine, tiny_components)
    times = time_baseline(base, synthetic_frames(2, 64, 64), n=4, warmup=1)
    assert len(times) == 4 and all(t > 0 for t in times)
