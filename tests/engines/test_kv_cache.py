"""Temporal KV cache on the tiny SD2-style UNet (CPU, fp32): plain parity, reference attention, ring, ONNX."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engines.kv_cache import CachedSelfAttnProcessor, Span, TemporalKVCache, install

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "rtdiffusion" / "models" / "configs" / "tiny_unet_sd2style.json"
B = 2  # UNet batch rows
TOL = dict(atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(json.loads(CONFIG.read_text())).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def plain(unet):
    """The UNet with its own processors, restored after each test."""
    original = dict(unet.attn_processors)
    yield unet
    unet.set_attn_processor(original)


def frame_inputs(n: int, hw: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + n)
    sample = torch.randn(B, 4, hw, hw, generator=g)  # [B, 4, h, w]
    timestep = torch.tensor([999.0, 500.0])  # [B], one noise level per row
    embeds = torch.randn(B, 77, 32, generator=g)  # [B, 77, 32]
    return sample, timestep, embeds


@torch.no_grad()
def run(unet, inputs) -> torch.Tensor:
    sample, timestep, embeds = inputs
    return unet(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]


@torch.no_grad()
def step(unet, cache: TemporalKVCache, inputs) -> torch.Tensor:
    """One frame as the engine runs it: UNet, ring write, host bookkeeping."""
    out = run(unet, inputs)
    cache.write_ring()
    cache.after_frame()
    return out


@pytest.mark.parametrize("span", list(Span))
def test_off_and_empty_equal_plain(plain, span):
    refs = [run(plain, frame_inputs(n)) for n in range(4)]
    cache = install(plain, B, (16, 16), 3, torch.float32, "cpu", span=span)
    assert len(cache.layers) == 6 and all(isinstance(p, CachedSelfAttnProcessor) for p in cache.processors.values())
    # Installed, never enabled: plain.
    torch.testing.assert_close(step(plain, cache, frame_inputs(0)), refs[0], **TOL)
    # Enabled with an empty bank: the first frame is plain.
    cache.set_settings(True, 3, 1)
    torch.testing.assert_close(step(plain, cache, frame_inputs(0)), refs[0], **TOL)
    # With two frames in the bank the output moves away from plain...
    step(plain, cache, frame_inputs(1))
    assert cache.bank_frames() == [True, True, False]
    assert (step(plain, cache, frame_inputs(2)) - refs[2]).abs().max() > 1e-3
    # ...off again: plain, with the stale bank still in memory.
    cache.set_settings(False, 3, 1)
    torch.testing.assert_close(step(plain, cache, frame_inputs(3)), refs[3], **TOL)
    # Reset while on: empty bank, plain again.
    cache.set_settings(True, 2, 1)
    step(plain, cache, frame_inputs(1))
    cache.reset()
    assert cache.bank_frames() == [False, False, False]
    torch.testing.assert_close(step(plain, cache, frame_inputs(2)), refs[2], **TOL)
    cache.uninstall()
    torch.testing.assert_close(run(plain, frame_inputs(1)), refs[1], atol=0, rtol=0)


def reference_attention(attn, x: torch.Tensor, bank_k: list[torch.Tensor], bank_v: list[torch.Tensor]) -> torch.Tensor:
    """Plain softmax attention over [current | bank frames] K/V, written out by hand. x [B, L, C]."""
    Bx, L, C = x.shape
    H = attn.heads
    D = C // H
    q = attn.to_q(x)
    k = torch.cat([attn.to_k(x), *bank_k], 1)  # [B, (1+m)*L, C]
    v = torch.cat([attn.to_v(x), *bank_v], 1)  # [B, (1+m)*L, C]
    heads = lambda t: t.view(Bx, -1, H, D).transpose(1, 2)  # noqa: E731  [B, H, N, D]
    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(D)  # [B, H, L, (1+m)*L]
    out = scores.softmax(-1) @ heads(v)  # [B, H, L, D]
    return attn.to_out[0](out.transpose(1, 2).reshape(Bx, L, C))


@pytest.mark.parametrize("span", list(Span))
@pytest.mark.parametrize("maxframes,frames_before", [(3, 2), (2, 4), (1, 1)])
def test_processor_equals_reference_over_concatenated_kv(plain, span, maxframes, frames_before):
    cache = install(plain, B, (16, 16), 3, torch.float32, "cpu", span=span)
    cache.set_settings(True, maxframes, 1)
    for n in range(frames_before):
        step(plain, cache, frame_inputs(n))
    visible = [s for s, on in enumerate(cache.bank_frames()) if on]
    assert len(visible) == min(frames_before, maxframes)
    assert cache.span == (3 if span is Span.FULL else maxframes)
    for idx in (0, 3, 5):  # a down, an up and the mid-block layer
        lay = cache.layers[idx]
        attn = plain.get_submodule(lay.name.removesuffix(".processor"))
        bank_k = [lay.ring_k[:, 1 + s].clone() for s in visible]  # each [B, L, C]
        bank_v = [lay.ring_v[:, 1 + s].clone() for s in visible]
        seen: dict[str, torch.Tensor] = {}

        def grab_in(module, args, kwargs):
            seen["x"] = args[0] if args else kwargs["hidden_states"]

        def grab_out(module, args, out):
            seen["y"] = out

        h_in = attn.register_forward_pre_hook(grab_in, with_kwargs=True)
        h_out = attn.register_forward_hook(grab_out)
        try:
            run(plain, frame_inputs(10 + idx))
        finally:
            h_in.remove()
            h_out.remove()
        with torch.no_grad():
            ref = reference_attention(attn, seen["x"], bank_k, bank_v)
        torch.testing.assert_close(seen["y"], ref, atol=2e-5, rtol=1e-5)
        # the bank really contributed: attention over the current frame alone differs
        with torch.no_grad():
            alone = reference_attention(attn, seen["x"], [], [])
        assert (alone - ref).abs().max() > 1e-4
    cache.uninstall()


def expected_ring(frames: int, interval: int, maxframes: int) -> dict[int, int]:
    """bank slot -> frame it holds after ``frames`` frames (the ring rule of the module docstring)."""
    slots: dict[int, int] = {}
    writes = 0
    for n in range(frames):
        if n % interval == 0:
            slots[writes % maxframes] = n
            writes += 1
    return slots


@pytest.mark.parametrize("interval,maxframes,max_frames,frames", [
    (1, 1, 1, 3), (1, 3, 3, 5), (2, 2, 4, 7), (3, 3, 3, 11), (1, 2, 4, 6), (4, 4, 4, 5)])
def test_ring_holds_the_right_frames(plain, interval, maxframes, max_frames, frames):
    cache = install(plain, B, (16, 16), max_frames, torch.float32, "cpu")
    cache.set_settings(True, maxframes, interval)
    lay = cache.layers[2]
    fresh_k, fresh_v = [], []
    for n in range(frames):
        step(plain, cache, frame_inputs(n))
        fresh_k.append(lay.ring_k[:, 0].clone())
        fresh_v.append(lay.ring_v[:, 0].clone())
    want = expected_ring(frames, interval, maxframes)
    assert cache.bank_frames() == [s in want for s in range(max_frames)]
    for s, n in want.items():
        assert torch.equal(lay.ring_k[:, 1 + s], fresh_k[n]), f"slot {s} should hold frame {n}"
        assert torch.equal(lay.ring_v[:, 1 + s], fresh_v[n])
    # the biases agree with the host view: 0 on visible slots, -inf elsewhere, 0 on the current frame
    L = lay.tokens
    bias = lay.bias.view(1 + max_frames, L)
    assert torch.all(bias[0] == 0)
    for s in range(max_frames):
        assert torch.all(bias[1 + s] == (0.0 if s in want else float("-inf")))
        assert cache.slot_bias[s].item() == (0.0 if s in want else float("-inf"))
    cache.uninstall()


def test_settings_validate_and_write_in_place(plain):
    one = tuple(t[:1] for t in frame_inputs(0))  # a 1-row batch
    ref_one = run(plain, one)
    cache = install(plain, B, (16, 16), 4, torch.float32, "cpu")
    ptrs = [(l.ring_k.data_ptr(), l.ring_v.data_ptr(), l.bias.data_ptr()) for l in cache.layers]
    index_ptr = cache.slot_index.data_ptr()
    for bad in [dict(enabled=1, maxframes=1, interval=1), dict(enabled=True, maxframes=5, interval=1),
                dict(enabled=True, maxframes=0, interval=1), dict(enabled=True, maxframes=2, interval=0),
                dict(enabled=True, maxframes=True, interval=1)]:
        with pytest.raises(ValueError, match="cache"):
            cache.set_settings(**bad)
    assert not cache.enabled  # a rejected update changes nothing
    cache.set_settings(True, 4, 1)
    for n in range(5):
        step(plain, cache, frame_inputs(n))
    cache.set_settings(True, 2, 3)  # shrink: slots 2, 3 drop out
    assert cache.bank_frames()[2:] == [False, False]
    cache.set_settings(False, 2, 3)
    cache.reset()
    assert [(l.ring_k.data_ptr(), l.ring_v.data_ptr(), l.bias.data_ptr()) for l in cache.layers] == ptrs
    assert cache.slot_index.data_ptr() == index_ptr
    with pytest.raises(ValueError, match="reinstall"):
        run(plain, frame_inputs(0, hw=32))  # installed for 16x16 latents
    # Fewer rows than allocated: the first rows of each ring.
    cache.set_settings(False, 2, 1)
    torch.testing.assert_close(step(plain, cache, one), ref_one, **TOL)
    cache.set_settings(True, 2, 1)
    step(plain, cache, one)
    assert cache.bank_frames() == [True, False, False, False]
    with pytest.raises(ValueError, match="max_frames"):
        install(plain, B, (16, 16), 0, torch.float32, "cpu")
    cache.uninstall()


def test_active_span_follows_settings(plain):
    cache = install(plain, B, (16, 16), 4, torch.float32, "cpu", span=Span.ACTIVE)
    assert cache.span == 0
    cache.set_settings(True, 2, 1)
    assert cache.span == 2
    cache.set_settings(False, 2, 1)
    assert cache.span == 0
    full = install(plain, B, (16, 16), 4, torch.float32, "cpu", span=Span.FULL)
    full.set_settings(False, 1, 1)
    assert full.span == 4
    full.uninstall()


def test_onnx_export_with_banks_matches_torch(plain, tmp_path):
    """Export through the engines spec API; ORT on the cache's real state equals the eager cached UNet."""
    ort = pytest.importorskip("onnxruntime")
    from engines.onnx_export import export_onnx, verify_onnx
    from engines.specs import AxisRange, SpecParams, unet_spec

    hw = 32  # latent 32x32: self-attention at 16x16 tokens
    cache = install(plain, B, (hw, hw), 3, torch.float32, "cpu")
    extra_in, extra_out = cache.export_bindings()
    params = SpecParams(width=hw * 8, height=hw * 8, embed_dim=32, dtype="float32", batch=AxisRange(1, 2, 2))
    spec = unet_spec(params, extra_in, extra_out)
    assert spec.input_names[:3] == ["sample", "timestep", "embeds"] and spec.input_names[-1] == "kv_slot_bias"
    path = tmp_path / "unet_kv.onnx"
    with cache.export_module() as module:
        export_onnx(module, spec, path)
        report = verify_onnx(module, spec, path, atol=1e-4)  # random banks and biases, B = 1 and 2
    assert report.ok, str(report)

    # Real state: two frames in a 3-slot bank (one slot still -inf), then frame 2 eager vs ORT.
    cache.set_settings(True, 3, 1)
    for n in range(2):
        step(plain, cache, frame_inputs(n, hw))
    bound = cache.binding_tensors()
    feeds = dict(zip(["sample", "timestep", "embeds"], (t.numpy() for t in frame_inputs(2, hw))))
    feeds.update({b.name: bound[b.name].contiguous().numpy() for b in extra_in})
    assert math.isinf(feeds["kv_slot_bias"][2]) and feeds["kv_slot_bias"][:2].tolist() == [0.0, 0.0]
    eps = run(plain, frame_inputs(2, hw))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(spec.output_names, feeds)
    torch.testing.assert_close(torch.from_numpy(got[0]), eps, atol=1e-4, rtol=1e-4)
    for b, g in zip(extra_out, got[1:]):
        torch.testing.assert_close(torch.from_numpy(g), bound[b.name], atol=1e-4, rtol=1e-4)
    cache.uninstall()


def test_compiled_unet_sees_settings_without_recompiling(plain):
    """torch.compile (aot_eager: the dynamo + AOT path without a C++ toolchain) reads the banks, bias and
    slot index as inputs: ring state and on/off changes take effect with no recompile (Span.FULL)."""
    import torch._dynamo

    cache = install(plain, B, (16, 16), 2, torch.float32, "cpu", span=Span.FULL)

    def frame(sample, timestep, embeds):
        out = plain(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
        cache.write_ring()
        return out

    cache.set_settings(True, 2, 1)
    eager = []
    for n in range(3):
        eager.append(step(plain, cache, frame_inputs(n)))
    cache.reset()
    torch._dynamo.reset()
    compiled = torch.compile(frame, backend="aot_eager")
    with torch.no_grad():
        got = [compiled(*frame_inputs(0))]
        cache.after_frame()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for n in (1, 2):
                got.append(compiled(*frame_inputs(n)))
                cache.after_frame()
            cache.set_settings(False, 1, 1)
            off = compiled(*frame_inputs(3))
            cache.after_frame()
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    cache.uninstall()
    torch.testing.assert_close(off, run(plain, frame_inputs(3)), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
