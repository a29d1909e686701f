"""Weight streaming on CPU: the planner on the real architectures (meta device, no weights) and the executor
on the tiny UNet (streamed output == resident output, exactly, fp32)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from engines.weight_streaming import (
    GiB,
    StreamingPlanError,
    StreamMode,
    WeightStreamer,
    budget_for_segments,
    plan_streaming,
)

CONFIGS = Path(__file__).resolve().parents[2] / "rtdiffusion" / "models" / "configs"
RESERVE = int(2.5 * GiB)  # VAE + text encoders + activations, as the engine would pass


def _config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


@pytest.fixture(scope="module", params=["sd_turbo_unet", "sdxl_unet"])
def meta_unet(request):
    with torch.device("meta"):
        return request.param, UNet2DConditionModel.from_config(_config(request.param))


def _all_unit_params_once(plan, unet) -> None:
    from engines.weight_streaming import _resolve_units

    units = _resolve_units(unet)
    seen = [id(p) for s in plan.segments for n in s.units for p in units[n].params()]
    assert len(seen) == len(set(seen)), "a parameter is in two segments"
    assert set(seen) == {id(p) for p in unet.parameters()}, "every UNet parameter streams (none are left over)"


@pytest.mark.parametrize("segments", [1, 3, 9])
def test_planner_respects_budget_for_real_architectures(meta_unet, segments):
    name, unet = meta_unet
    budget = budget_for_segments(unet, segments, RESERVE)
    plan = plan_streaming(unet, budget, RESERVE, torch.float16)
    total = sum(p.numel() * 2 for p in unet.parameters())
    assert plan.total_bytes >= total  # aligned, so a little more
    if segments == 1:
        assert not plan.streaming and plan.bytes_per_call == 0
        assert plan.total_bytes + RESERVE <= budget
        return
    assert len(plan.segments) == segments, f"{name}: no budget gives exactly {segments} segments"
    # The budget identity, and double buffering sized by the largest segment.
    assert plan.resident_bytes + 2 * plan.buffer_bytes + RESERVE <= budget
    assert plan.buffer_bytes == max(s.param_bytes for s in plan.segments)
    assert plan.bytes_per_call == plan.total_bytes - plan.resident_bytes
    assert [s.index for s in plan.segments] == list(range(segments))
    _all_unit_params_once(plan, unet)
    # One byte less than the budget found for this count needs more segments (the search is tight).
    fewer = plan_streaming(unet, budget - 1, RESERVE, torch.float16)
    assert len(fewer.segments) > segments
    d = plan.describe()
    assert d["num_segments"] == segments and d["streaming"] and len(d["segments"]) == segments


def test_planner_splits_sdxl_transformer_blocks_when_needed():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config("sdxl_unet"))
    plan = plan_streaming(unet, budget_for_segments(unet, 9, RESERVE), RESERVE)
    names = [n for s in plan.segments for n in s.units]
    assert any(".transformer_blocks." in n for n in names)  # a 10-layer block exceeds a ninth of the UNet
    # Forward order is kept: the down path comes before the mid block before the up path.
    first = {k: min(i for i, n in enumerate(names) if n.startswith(k))
             for k in ("down_blocks", "mid_block", "up_blocks")}
    assert first["down_blocks"] < first["mid_block"] < first["up_blocks"]
    assert names[0] == "stem" and names[-1] == "head"


def test_planner_errors_name_the_unit_when_budget_too_small(meta_unet):
    _, unet = meta_unet
    with pytest.raises(StreamingPlanError, match=r"unit '.+' needs .* MiB per segment buffer .* GiB at least"):
        plan_streaming(unet, RESERVE + 50 * 2**20, RESERVE)
    with pytest.raises(ValueError):
        plan_streaming(unet, 0, RESERVE)


def test_planner_sync_buffers_budget_for_one_buffer(meta_unet):
    _, unet = meta_unet
    budget = RESERVE + int(1.0 * GiB)
    plan = plan_streaming(unet, budget, RESERVE, num_buffers=1)
    assert plan.streaming and plan.num_buffers == 1
    assert plan.resident_bytes + plan.buffer_bytes + RESERVE <= budget


# ------------------------------------------------------------------------------------------- executor


def _tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_config("tiny_unet_sd2style")).eval()
    with torch.no_grad():  # non-trivial weights everywhere (zero-initialised convs would hide swaps)
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=g)  # [B, 4, h, w] fp32
    t = torch.tensor([999.0, 500.0])  # [B]
    embeds = torch.randn(2, 7, 32, generator=g)  # [B, T, D]
    return sample, t, embeds


@pytest.fixture(scope="module")
def tiny_reference():
    unet = _tiny_unet()
    with torch.no_grad():
        outs = [unet(*_inputs(s)[:2], encoder_hidden_states=_inputs(s)[2]).sample for s in range(3)]
    return unet, outs


@pytest.mark.parametrize("mode", [StreamMode.PREFETCH, StreamMode.SYNC])
@pytest.mark.parametrize("segments", [3, 8])  # 8: a segment starts at an upsampler
def test_streamed_tiny_unet_equals_resident(tiny_reference, mode, segments):
    ref_unet, ref_outs = tiny_reference
    unet = copy.deepcopy(ref_unet)
    budget = budget_for_segments(unet, segments, 0, torch.float32)
    plan = plan_streaming(unet, budget, 0, torch.float32)
    assert len(plan.segments) == segments
    streamer = WeightStreamer.install(unet, plan, "cpu", mode=mode)
    assert streamer is not None and streamer.mode is mode
    n_buf = 2 if mode is StreamMode.PREFETCH else 1
    assert len(streamer._bufs) == n_buf
    # Every parameter is now a view into a device segment buffer; segments sharing a buffer alias.
    buf_ptrs = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in streamer._bufs]
    for p in unet.parameters():
        assert any(lo <= p.data_ptr() < hi for lo, hi in buf_ptrs)
    with torch.no_grad():
        for call, s in enumerate([0, 1, 2, 0]):  # several calls: the buffers are reused across calls
            sample, t, embeds = _inputs(s)
            out = unet(sample, t, encoder_hidden_states=embeds).sample
            assert torch.equal(out, ref_outs[s]), f"call {call} differs (max {float((out - ref_outs[s]).abs().max())})"
    d = streamer.describe()
    assert d["mode"] == mode.value and d["calls"] == 4 and d["num_segments"] == segments
    assert d["bytes_per_call"] == plan.bytes_per_call and d["fallback"] is None

    streamer.remove()
    with torch.no_grad():
        sample, t, embeds = _inputs(0)
        assert torch.equal(unet(sample, t, encoder_hidden_states=embeds).sample, ref_outs[0])


def test_streaming_is_wrong_without_the_hooks(tiny_reference):
    """The equality test can fail: with the hooks gone, parameters read whatever the buffers hold."""
    ref_unet, ref_outs = tiny_reference
    unet = copy.deepcopy(ref_unet)
    plan = plan_streaming(unet, budget_for_segments(unet, 4, 0, torch.float32), 0, torch.float32)
    streamer = WeightStreamer.install(unet, plan, "cpu")
    for h in streamer._hooks + streamer._check_hooks:
        h.remove()
    with torch.no_grad():
        sample, t, embeds = _inputs(0)
        assert not torch.equal(unet(sample, t, encoder_hidden_states=embeds).sample, ref_outs[0])


def test_fits_means_nothing_changes(tiny_reference):
    ref_unet, ref_outs = tiny_reference
    unet = copy.deepcopy(ref_unet)
    plan = plan_streaming(unet, 10 * GiB, GiB, torch.float32)
    assert not plan.streaming
    assert WeightStreamer.install(unet, plan, "cpu") is None
    assert not unet._forward_pre_hooks
    with torch.no_grad():
        sample, t, embeds = _inputs(1)
        assert torch.equal(unet(sample, t, encoder_hidden_states=embeds).sample, ref_outs[1])


def test_out_of_order_execution_is_reported(tiny_reference):
    ref_unet, _ = tiny_reference
    unet = copy.deepcopy(ref_unet)
    plan = plan_streaming(unet, budget_for_segments(unet, 3, 0, torch.float32), 0, torch.float32)
    WeightStreamer.install(unet, plan, "cpu")
    from engines.weight_streaming import _resolve_units

    # A later segment's first module run outside a UNet call enters its segment out of order; the pre-hook
    # raises before the module computes with weights that are not loaded.
    module = _resolve_units(unet)[plan.segments[2].units[0]].modules[0]
    with torch.no_grad(), pytest.raises(RuntimeError, match="segment 2 entered after segment -1"):
        module(torch.zeros(1))


def test_install_validates_inputs(tiny_reference):
    ref_unet, _ = tiny_reference
    unet = copy.deepcopy(ref_unet)
    plan = plan_streaming(unet, budget_for_segments(unet, 3, 0, torch.float32), 0, torch.float32)
    with pytest.raises(ValueError, match="mode must be one of"):
        WeightStreamer.install(unet, plan, "cpu", mode="fast")
    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(_config("tiny_unet_sd2style"))
    with pytest.raises(ValueError, match="meta"):
        WeightStreamer.install(meta, plan, "cpu")
    with torch.device("meta"):
        other = UNet2DConditionModel.from_config(_config("sd_turbo_unet"))
    big_plan = plan_streaming(other, budget_for_segments(other, 9, 0), 0)
    with pytest.raises(ValueError, match="plan does not match"):
        WeightStreamer.install(unet, big_plan, "cpu")


def test_call_that_raises_part_way_does_not_poison_the_next(tiny_reference):
    """A UNet call that fails inside a later segment leaves another segment in buffer 0; the next call
    reloads segment 0 and is exact again."""
    ref_unet, ref_outs = tiny_reference
    unet = copy.deepcopy(ref_unet)
    plan = plan_streaming(unet, budget_for_segments(unet, 8, 0, torch.float32), 0, torch.float32)
    streamer = WeightStreamer.install(unet, plan, "cpu")
    sample, t, embeds = _inputs(0)
    with torch.no_grad():
        with pytest.raises(RuntimeError):  # wrong text width: fails in the first cross-attention, not segment 0
            unet(sample, t, encoder_hidden_states=torch.randn(2, 7, 16))
        assert streamer._active > 0
        assert torch.equal(unet(sample, t, encoder_hidden_states=embeds).sample, ref_outs[0])
