"""The temporal KV cache through StreamEngine: on/off between frames, layout changes, exact plain when off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdiffusion import StreamEngine
from rtdiffusion.config import EngineConfig, StreamSettings, VaeKind, apply_updates
from rtdiffusion.models.loading import load_components


@pytest.fixture(scope="module")
def own_components():
    # its own modules: enabling the cache installs attention processors on this UNet
    return load_components("random:tiny", torch.device("cpu"), torch.float32, VaeKind.TINY, seed=0)


def engine_on(comps, **updates):
    config = EngineConfig("random:tiny", 64, 64, torch.device("cpu"), torch.float32, kv_max_frames=3)
    return StreamEngine(config, comps, apply_updates(StreamSettings(), 50, **updates))


def frames(n):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return [np.roll(base, 2 * i, axis=1) for i in range(n)]


def test_cache_on_changes_frames_and_off_is_exactly_plain(own_components):
    src = frames(6)
    plain = engine_on(own_components)
    expect = [plain(f) for f in src]
    e = engine_on(own_components)
    e.update(cache_enabled=True, cache_maxframes=2)
    cached = [e(f) for f in src]
    assert e.status()["temporal_cache"]["active"] and e.status()["temporal_cache"]["span"] == 2
    assert np.array_equal(cached[0], expect[0])  # the first frame has an empty bank: plain
    assert any(not np.array_equal(c, p) for c, p in zip(cached[1:], expect[1:]))  # later frames attend to the bank
    e.update(cache_enabled=False)
    again = engine_on(own_components)
    for f in src:
        assert np.array_equal(e(f), again(f))  # off: the UNet's own processors, frame for frame
    assert not e.status()["temporal_cache"]["active"]


def test_toggle_across_a_layout_change_with_more_unet_rows(own_components):
    """Banks sized for one row; steps raised while off, then on again: the banks grow, frames keep flowing."""
    e = engine_on(own_components, t_index_list=[32])
    f = frames(1)[0]
    e.update(cache_enabled=True)
    e(f)
    assert e.status()["temporal_cache"]["rows"] == 1
    e.update(cache_enabled=False)
    e(f)
    e.update(t_index_list=[16, 32], cfg="full", guidance_scale=1.5)  # 4 UNet rows
    e(f)
    e.update(cache_enabled=True, cache_maxframes=3)
    outs = [e(f) for _ in range(4)]
    s = e.status()["temporal_cache"]
    assert s["rows"] == 4 and s["span"] == 3 and s["active"]
    assert all(o.shape == (64, 64, 3) and o.dtype == np.uint8 for o in outs)
    e.update(cache_enabled=False)
    e(f)  # applied at a frame boundary: the shared UNet gets its own processors back


def test_cache_reset_empties_the_bank(own_components):
    src = frames(4)
    plain = engine_on(own_components)  # before the cached engine: they share the UNet module
    plain_first = plain(src[0])
    e = engine_on(own_components, cache_enabled=True, cache_maxframes=2)
    assert np.array_equal(e(src[0]), plain_first)  # an empty bank pulls attention nowhere
    for f in src[1:]:
        e(f)
    assert e._temporal.cache.bank_frames() == [True, True, False]
    e.update(cache_reset=True)
    e(src[0])
    assert e._temporal.cache.bank_frames() == [True, False, False]  # only the frame after the reset
    e.update(cache_enabled=False)
    e(src[0])


def test_cache_with_the_trt_backend_is_refused_not_ignored(own_components):
    """TensorRT engines do not take the banks yet: asking for the cache there is an error, never a no-op."""
    from rtdiffusion import ConfigError

    e = engine_on(own_components)
    e._executor.name = "trt"  # the check reads only the backend's name (TensorRT cannot run here)
    with pytest.raises(ConfigError, match="not available with backend 'trt'"):
        e.update(cache_enabled=True)
    assert not e.settings.cache.enabled
