"""The public engine API on the CPU: bad input at every boundary, and the documented behaviours.

Real engine, tiny random model (``random:tiny``), 64x64 frames. With one denoising step (S=1) and no
guidance state an output depends only on its input frame and the settings, so "the state did not change"
is checked the strongest way: the same frame gives the same bytes as before the bad input.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from rtdiffusion import ConfigError, FrameError, ModelNotFoundError, StreamEngine
from rtdiffusion.config import Backend, EngineConfig

H = W = 64



def rand_frame(seed: int = 0, shape=(H, W, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


FRAME = rand_frame(0)


@pytest.fixture(scope="module")
def shared(tiny_components):
    """One engine for every bad-input case, and its output for FRAME before any of them."""
    config = EngineConfig("random:tiny", W, H, torch.device("cpu"), torch.float32)
    engine = StreamEngine(config, tiny_components)
    engine.update_prompt("a red fox")
    return engine, engine(FRAME)


def assert_untouched(engine: StreamEngine, ref_out: np.ndarray, status_before: dict, settings_before) -> None:
    """Nothing observable moved, and the next valid frame gives exactly the old result."""
    assert engine.status() == status_before
    assert engine.settings == settings_before
    out = engine(FRAME)
    assert engine.settings == settings_before  # nothing half-validated was left pending either
    np.testing.assert_array_equal(out, ref_out)


# ---------------------------------------------------------------------------------------------- bad frames
BAD_FRAMES = [
    pytest.param(rand_frame(1, (32, 32, 3)), FrameError, r"shape \[64, 64, 3\].*got \[32, 32, 3\]", id="32x32x3"),
    pytest.param(rand_frame(1, (64, 64, 4)), FrameError, r"shape \[64, 64, 3\].*got \[64, 64, 4\]", id="rgba"),
    pytest.param(rand_frame(1, (64, 64)), FrameError, r"shape \[64, 64, 3\].*got \[64, 64\]", id="grey-2d"),
    pytest.param(rand_frame(1, (1, 64, 64, 3)), FrameError, r"shape \[64, 64, 3\]", id="batched-1"),
    pytest.param(np.zeros((64, 64, 3), np.float32), FrameError, r"uint8.*got dtype float32", id="float32"),
    pytest.param(np.zeros((64, 64, 3), np.int16), FrameError, r"uint8.*got dtype int16", id="int16"),
    pytest.param(torch.zeros(64, 64, 3), FrameError, r"uint8.*got dtype torch.float32", id="torch-float"),
    pytest.param(FRAME.tolist(), FrameError, r"numpy array or a torch tensor.*got list", id="list"),
    pytest.param(None, FrameError, r"numpy array or a torch tensor.*got NoneType", id="none"),
]


@pytest.mark.parametrize("frame,exc,match", BAD_FRAMES)
def test_bad_frame_is_rejected_and_changes_nothing(shared, frame, exc, match):
    engine, ref_out = shared
    before, settings = engine.status(), engine.settings
    with pytest.raises(exc, match=match):
        engine(frame)
    assert_untouched(engine, ref_out, before, settings)


def test_frame_errors_are_value_errors():
    # callers that catch ValueError (the CLI does) see frame and config errors alike
    assert issubclass(FrameError, ValueError) and issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------------- bad settings
NAN, INF = float("nan"), float("inf")
BAD_UPDATES = [
    ("update", dict(guidance_scale=NAN), "guidance_scale must be a number from 0 to 30"),
    ("update", dict(guidance_scale=INF), "guidance_scale must be a number from 0 to 30"),
    ("update", dict(guidance_scale=-1.0), "guidance_scale must be a number from 0 to 30"),
    ("update", dict(guidance_scale=31), "guidance_scale must be a number from 0 to 30"),
    ("update", dict(guidance_scale="2"), "guidance_scale must be a number"),
    ("update", dict(guidance_scale=True), "guidance_scale must be a number"),
    ("update", dict(delta=NAN), "delta must be a number from 0 to 10"),
    ("update", dict(delta=-INF), "delta must be a number from 0 to 10"),
    ("update", dict(delta=-0.5), "delta must be a number from 0 to 10"),
    ("update", dict(delta=10.5), "delta must be a number from 0 to 10"),
    ("update_seed", -1, r"seed must be an integer from 0 to 2\*\*63-1"),
    ("update_seed", 2**63, r"seed must be an integer from 0 to 2\*\*63-1"),
    ("update_seed", True, r"seed must be an integer"),
    ("update_seed", 1.5, r"seed must be an integer"),
    ("update_seed", [(1, -0.5)], r"\(seed, weight\) pairs with finite weights >= 0"),
    ("update_seed", [(1, 0.0), (2, 0.0)], "at least one weight > 0"),
    ("update", dict(seed=-3), r"seed must be an integer from 0 to 2\*\*63-1"),
    ("update", dict(t_index_list=[]), "t_index_list must be a non-empty list"),
    ("update", dict(t_index_list=[50]), r"integers from 0 to 49 \(num_inference_steps=50\); got \[50\]"),
    ("update", dict(t_index_list=[-1]), "integers from 0 to 49"),
    ("update", dict(t_index_list=[40, 20]), r"strictly increasing.*got \[40, 20\]"),
    ("update", dict(t_index_list=[20, 20]), r"strictly increasing.*got \[20, 20\]"),
    ("update", dict(t_index_list=[20.0]), "integers from 0 to 49"),
    ("update", dict(t_index_list="20"), "t_index_list must be a list of integers"),
    ("update", dict(cfg="bogus"), r"cfg must be one of 'none', 'self', 'initialize', 'full'; got 'bogus'"),
    ("update", dict(bogus=1), r"unknown setting 'bogus'; expected one of .*guidance_scale.*t_index_list"),
    ("update", dict(prompt="a new prompt", guidance_scale=NAN), "guidance_scale"),  # all or nothing
    ("update_prompt", [("a cat", -1.0)], r"\(text, weight\) pairs with finite weights >= 0"),
    ("update_prompt", [("a cat", NAN)], r"\(text, weight\) pairs with finite weights >= 0"),
    ("update_prompt", [("a cat",)], r"\(text, weight\) pairs"),
    ("update_prompt", [("a cat", 1.0, 2.0)], r"\(text, weight\) pairs"),
    ("update_prompt", [(3, 1.0)], r"\(text, weight\) pairs"),
    ("update_prompt", [("a cat", 0.0), ("a dog", 0)], "at least one weight > 0"),
    ("update_prompt", [], "prompt must be a string or a non-empty list"),
    ("update_prompt", 42, "prompt must be a string or a non-empty list"),
    ("update", dict(prompt="x", prompt_method="cubic"), r"prompt blend method must be one of 'linear', 'slerp'"),
    ("update", dict(negative_prompt=5), "negative prompt must be a string"),
    ("update", dict(similar_threshold=1.5), "similar_threshold must be a number from 0 to 1"),
    ("update", dict(similar_threshold=-0.1), "similar_threshold must be a number from 0 to 1"),
    ("update", dict(similar_threshold=NAN), "similar_threshold must be a number from 0 to 1"),
    ("update", dict(similar_max_skip=-1), "similar_max_skip must be an integer from 0 to 1000"),
    ("update", dict(similar_filter="yes"), "similar_filter must be true or false"),
    ("update", dict(cache_maxframes=5), r"cache_maxframes must be at most kv_max_frames=4"),
    ("update", dict(cache_maxframes=0), "cache_maxframes must be an integer from 1 to 16"),
    ("update", dict(cache_interval=0), "cache_interval must be an integer from 1 to 1000"),
]


@pytest.mark.parametrize("method,arg,match", BAD_UPDATES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BAD_UPDATES)])
def test_bad_setting_is_rejected_and_changes_nothing(shared, method, arg, match):
    engine, ref_out = shared
    before, settings = engine.status(), engine.settings
    call = getattr(engine, method)
    with pytest.raises(ConfigError, match=match):
        call(**arg) if isinstance(arg, dict) else call(arg)
    assert_untouched(engine, ref_out, before, settings)


def test_failed_update_keeps_an_earlier_valid_pending_one(make_engine):
    """A rejected update drops only itself: a valid update made before it still lands."""
    engine = make_engine()
    engine(FRAME)
    engine.update(guidance_scale=2.5)
    with pytest.raises(ConfigError):
        engine.update(guidance_scale=2.0, delta=NAN)
    engine(FRAME)
    assert engine.status()["guidance_scale"] == 2.5 and engine.status()["delta"] == 1.0


# ----------------------------------------------------------------------------- bad engine construction
def test_unknown_random_model_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="random:nope") as e:
        StreamEngine.from_pretrained("random:nope", device="cpu")
    for name in ("random:sd-turbo", "random:sd15", "random:tiny"):
        assert name in str(e.value)


def test_uncached_hub_id_with_local_files_only():
    with pytest.raises(ModelNotFoundError, match="rtdiffusion-tests/no-such-model"):
        StreamEngine.from_pretrained("rtdiffusion-tests/no-such-model", device="cpu", local_files_only=True)


def test_uncached_hub_id_with_hf_hub_offline(tmp_path):
    """HF_HUB_OFFLINE=1 in the environment: no download attempt, a ModelNotFoundError naming the id."""
    code = ("from rtdiffusion import StreamEngine, ModelNotFoundError\n"
            "try:\n"
            "    StreamEngine.from_pretrained('rtdiffusion-tests/no-such-model', device='cpu')\n"
            "except ModelNotFoundError as exc:\n"
            "    print('MNF:', exc)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("MNF:") and "rtdiffusion-tests/no-such-model" in r.stdout
    assert "could not be downloaded" not in r.stdout  # offline: it says it looked in the cache only


@pytest.mark.parametrize("path", ["/nonexistent/rtdiffusion-model", "./no-such-model-folder", "a/b/c"])
def test_nonexistent_folder(path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        StreamEngine.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("kw,match", [
    (dict(width=60), "width must be a multiple of 8 between 8 and 4096 pixels; got 60"),
    (dict(height=4104), "height must be a multiple of 8 between 8 and 4096 pixels; got 4104"),
    (dict(dtype="float64"), r"dtype must be one of 'auto', 'float16', 'bfloat16', 'float32'; got 'float64'"),
    (dict(dtype="float16"), "float16.*needs a CUDA device"),
    (dict(device="tpu"), r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'tpu'"),
    (dict(device="cuda:0"), "torch sees no CUDA device"),
    (dict(backend="bogus"), r"backend must be one of 'auto', 'eager', 'graph', 'compiled', 'trt'"),
    (dict(vae="medium"), r"vae must be one of 'tiny', 'kl'"),
    (dict(frame_buffer_size=0), "frame_buffer_size must be an integer from 1 to 16"),
    (dict(cache_maxframes=8, kv_max_frames=4), "cache_maxframes must be at most kv_max_frames=4"),
    (dict(t_index_list=[60]), "integers from 0 to 49"),
])
def test_bad_construction_argument_fails_before_loading(kw, match):
    """Checked before the model loads: the model here does not exist, yet the argument error comes first."""
    kw.setdefault("device", "cpu")
    if torch.cuda.is_available() and "CUDA" in match:
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match=match):
        StreamEngine.from_pretrained("/nonexistent/rtdiffusion-model", **kw)


def test_graph_backend_on_cpu_is_a_config_error(tiny_components):
    config = EngineConfig("random:tiny", W, H, torch.device("cpu"), torch.float32, backend=Backend.GRAPH)
    with pytest.raises(ConfigError, match="backend='graph' needs a CUDA device"):
        StreamEngine(config, tiny_components)
    with pytest.raises(ConfigError, match="CUDA"):
        StreamEngine.from_pretrained("random:tiny", device="cpu", backend="graph", width=W, height=H)


def test_graph_backend_on_cpu_fails_before_loading():
    # from_pretrained promises every argument is checked before the model loads
    with pytest.raises(ConfigError, match="CUDA"):
        StreamEngine.from_pretrained("/nonexistent/rtdiffusion-model", device="cpu", backend="graph")


def test_size_must_be_a_multiple_of_the_models_own_multiple(tiny_components):
    """A UNet with 4 resolutions and a 2x VAE needs multiples of 2 * 2**3 = 16 pixels, not just of 8."""
    from diffusers import UNet2DConditionModel

    cfg = dict(block_out_channels=[8, 8, 8, 8], layers_per_block=1, sample_size=32, in_channels=4,
               out_channels=4, norm_num_groups=4, cross_attention_dim=32, attention_head_dim=2,
               down_block_types=["DownBlock2D"] * 4, up_block_types=["UpBlock2D"] * 4)
    comps = dataclasses.replace(tiny_components, unet=UNet2DConditionModel.from_config(cfg).eval())
    with pytest.raises(ConfigError, match="width must be a multiple of 16 pixels for random:tiny; got 72"):
        StreamEngine(EngineConfig("random:tiny", 72, 64, torch.device("cpu"), torch.float32), comps)
    with pytest.raises(ConfigError, match="height must be a multiple of 16 pixels for random:tiny; got 40"):
        StreamEngine(EngineConfig("random:tiny", 64, 40, torch.device("cpu"), torch.float32), comps)
    engine = StreamEngine(EngineConfig("random:tiny", 80, 48, torch.device("cpu"), torch.float32), comps)
    assert (engine.width, engine.height) == (80, 48)


# ------------------------------------------------------------------------------------------------ prompts
def test_prompt_is_encoded_once_and_cached(make_engine):
    engine = make_engine()
    engine(FRAME)
    n0 = engine.status()["prompt_encodes"]
    engine.update_prompt("a red fox")
    engine(FRAME)
    assert engine.status()["prompt_encodes"] == n0 + 1
    engine.update_prompt("a red fox")  # the same text again: nothing to encode
    engine(FRAME)
    assert engine.status()["prompt_encodes"] == n0 + 1
    engine.update_prompt("a blue whale")
    engine(FRAME)
    assert engine.status()["prompt_encodes"] == n0 + 2
    engine.update_prompt("a red fox")  # back to an earlier prompt: from the cache
    out_back = engine(FRAME)
    assert engine.status()["prompt_encodes"] == n0 + 2
    assert engine.status()["prompt"] == [["a red fox", 1.0]]
    # the cached embedding is the real one: same output as an engine that encoded it fresh
    fresh = make_engine(prompt="a red fox")
    np.testing.assert_array_equal(fresh(FRAME), out_back)


@pytest.mark.parametrize("cfg,matters", [("none", False), ("self", False), ("initialize", True), ("full", True)])
def test_negative_prompt_matters_only_with_initialize_or_full(make_engine, cfg, matters):
    """Two engines see the same frames; only one gets a negative prompt (then drops it again)."""
    a = make_engine(cfg=cfg, guidance_scale=1.8, prompt="a red fox")
    b = make_engine(cfg=cfg, guidance_scale=1.8, prompt="a red fox")
    frames = [rand_frame(i) for i in range(3)]
    np.testing.assert_array_equal(a(frames[0]), b(frames[0]))
    encodes = a.status()["prompt_encodes"]
    a.update_prompt("a red fox", negative_prompt="blurry, low quality, watermark")
    neg, plain = a(frames[1]), b(frames[1])
    assert a.status()["negative_prompt"] == "blurry, low quality, watermark"
    assert (not np.array_equal(neg, plain)) is matters
    assert a.status()["prompt_encodes"] == encodes + (1 if matters else 0)
    a.update_prompt("a red fox", negative_prompt="")  # back: the same results as the other engine again
    np.testing.assert_array_equal(a(frames[2]), b(frames[2]))


def test_prompt_blend_with_weights_one_zero_is_the_single_prompt(make_engine):
    engine = make_engine(prompt="a red fox")
    engine(FRAME)
    single = engine._state.buffers.embeds.clone()  # [S*F, T, D]
    for method in ("linear", "slerp"):
        engine.update_prompt([("a red fox", 1.0), ("an oil painting of a city", 0.0)], method=method)
        engine(FRAME)
        torch.testing.assert_close(engine._state.buffers.embeds, single, atol=1e-5, rtol=1e-5)
    other = make_engine(prompt="an oil painting of a city")
    other(FRAME)
    other_embeds = other._state.buffers.embeds.clone()
    halves = {}
    for method in ("linear", "slerp"):
        engine.update_prompt([("a red fox", 0.5), ("an oil painting of a city", 0.5)], method=method)
        engine(FRAME)
        halves[method] = engine._state.buffers.embeds.clone()
    torch.testing.assert_close(halves["linear"], (single + other_embeds) / 2, atol=1e-5, rtol=1e-5)
    assert (halves["slerp"] - halves["linear"]).abs().max() > 1e-3
    # slerp keeps each token vector's norm at the mean of the two norms (linear shrinks it)
    mean_norm = (single.norm(dim=-1) + other_embeds.norm(dim=-1)) / 2
    torch.testing.assert_close(halves["slerp"].norm(dim=-1), mean_norm, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------- seeds
def _noise(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_update_seed_rewrites_the_noise_in_place_and_changes_the_output(make_engine):
    engine = make_engine(seed=1)
    out1 = engine(FRAME)
    noise = engine._state.buffers.init_noise  # [S*F, 4, h, w]
    ptr, n1 = noise.data_ptr(), noise.clone()
    torch.testing.assert_close(n1, _noise(1, n1.shape), atol=0, rtol=0)
    engine.update_seed(2)
    out2 = engine(FRAME)
    assert engine._state.buffers.init_noise.data_ptr() == ptr  # same buffer, new values
    torch.testing.assert_close(noise, _noise(2, n1.shape), atol=0, rtol=0)
    assert not np.array_equal(out1, out2)
    engine.update_seed([(1, 0.5), (2, 0.5)])
    blend = engine(FRAME)
    assert noise.data_ptr() == ptr
    # a blend is the weighted sum renormalised to unit variance
    expect = (0.5 * _noise(1, n1.shape) + 0.5 * _noise(2, n1.shape)) / math.sqrt(0.5)
    torch.testing.assert_close(noise, expect, atol=1e-6, rtol=1e-6)
    assert not np.array_equal(blend, out1) and not np.array_equal(blend, out2)
    assert engine.status()["seed"] == [[1, 0.5], [2, 0.5]]
    engine.update_seed(1)
    np.testing.assert_array_equal(engine(FRAME), out1)


# ------------------------------------------------------------------------------------------------ threads
def test_update_during_a_frame_applies_at_the_next_boundary(make_engine, tiny_components):
    """An update made while a frame runs returns at once (it never waits for the frame) and changes
    nothing inside that frame; the next frame uses it."""
    engine = make_engine(guidance_scale=1.2)
    engine(FRAME)
    inside = {}

    def mid_frame(module, args):  # runs on the frame thread, inside the UNet call
        if inside:
            return
        t = threading.Thread(target=engine.update, kwargs=dict(guidance_scale=3.0, delta=0.5))
        t.start()
        t.join(timeout=30)
        inside["returned"] = not t.is_alive()
        inside["settings_g"] = engine.settings.guidance_scale
        inside["buffer_g"] = float(engine._state.buffers.g.reshape(-1)[0])

    handle = tiny_components.unet.register_forward_pre_hook(mid_frame)
    try:
        engine(FRAME)
    finally:
        handle.remove()
    assert inside == {"returned": True, "settings_g": 1.2, "buffer_g": pytest.approx(1.2)}
    assert engine.status()["guidance_scale"] == 1.2  # between frames: not applied yet
    engine(FRAME)
    assert engine.status()["guidance_scale"] == 3.0 and engine.status()["delta"] == 0.5
    assert float(engine._state.buffers.g.reshape(-1)[0]) == pytest.approx(3.0)


def test_updates_from_a_control_thread_are_consistent_and_the_last_wins(make_engine):
    engine = make_engine()
    n = 60
    # each update sets four fields from one i: any state seen between frames must be one such tuple
    combos = [dict(guidance_scale=1.0 + i / 20, delta=i / 20, prompt=f"prompt number {i}", seed=i)
              for i in range(n)]
    done = threading.Event()

    def control():
        for kw in combos:
            engine.update(**kw)
            done.wait(0.004)
        done.set()

    seen = []
    t = threading.Thread(target=control)
    t.start()
    frames = [rand_frame(i) for i in range(3)]
    k = 0
    while not done.is_set() or k < 2:
        engine(frames[k % 3])
        k += 1
        s = engine.status()
        seen.append((s["guidance_scale"], s["delta"], s["prompt"][0][0], s["seed"][0][0]))
    t.join()
    engine(FRAME)
    s = engine.status()
    assert (s["guidance_scale"], s["delta"], s["prompt"], s["seed"]) == (1.0 + (n - 1) / 20, (n - 1) / 20,
                                                                         [[f"prompt number {n - 1}", 1.0]],
                                                                         [[n - 1, 1.0]])
    for g, d, p, seed in seen:
        if p == "":  # the initial settings
            assert (g, d, seed) == (1.2, 1.0, 2)
            continue
        i = int(p.rsplit(" ", 1)[1])
        assert (g, d, seed) == (1.0 + i / 20, i / 20, i), "a frame saw a mix of two updates"


def test_update_during_settings_application_is_not_lost(make_engine, tiny_components):
    """Two control calls for different fields, the second arriving while the first is being applied:
    both must survive."""
    engine = make_engine()
    engine(FRAME)
    engine.update(guidance_scale=2.0, prompt="a new prompt")
    fired = []

    def during_apply(module, args):  # the text encoder runs inside _apply, encoding "a new prompt"
        if not fired:
            fired.append(1)
            t = threading.Thread(target=engine.update, kwargs=dict(delta=0.5))
            t.start()
            t.join(timeout=30)

    handle = tiny_components.text_encoder.register_forward_pre_hook(during_apply)
    try:
        engine(FRAME)
    finally:
        handle.remove()
    assert fired
    engine(FRAME)
    s = engine.status()
    assert (s["guidance_scale"], s["delta"], s["prompt"]) == (2.0, 0.5, [["a new prompt", 1.0]])


# ----------------------------------------------------------------------------------------- steps, kinds
def test_t_index_change_sets_latency_at_the_next_frame(make_engine):
    engine = make_engine(t_index_list=[32])
    engine(FRAME)
    assert engine.status()["latency_frames"] == 0
    engine.update(t_index_list=[20, 40])
    assert engine.status()["latency_frames"] == 0 and engine.status()["t_index_list"] == [32]
    engine(FRAME)
    assert engine.status()["latency_frames"] == 1 and engine.status()["t_index_list"] == [20, 40]
    assert engine._state.buffers.init_noise.shape[0] == 2  # two stream rows now


def test_torch_in_torch_out_numpy_in_numpy_out(make_engine):
    engine = make_engine()
    out_np = engine(FRAME)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.uint8 and out_np.shape == (H, W, 3)
    out_t = engine(torch.from_numpy(FRAME.copy()))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.uint8 and tuple(out_t.shape) == (H, W, 3)
    assert out_t.device.type == "cpu"
    np.testing.assert_array_equal(out_t.numpy(), out_np)
    # the result is the caller's own: the next frame does not overwrite it
    keep = out_np.copy()
    engine(rand_frame(5))
    np.testing.assert_array_equal(out_np, keep)


def test_frame_buffer_of_two(make_engine):
    engine = make_engine(frames=2)
    batch = np.stack([rand_frame(1), rand_frame(2)])
    out = engine(batch)
    assert out.shape == (2, H, W, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[0], out[1])
    before = engine.status()
    with pytest.raises(FrameError, match=r"shape \[2, 64, 64, 3\].*got \[64, 64, 3\]"):
        engine(FRAME)
    assert engine.status() == before
    np.testing.assert_array_equal(engine(batch), out)


def test_use_graph_false_matches_the_default_path(make_engine):
    a, b = make_engine(t_index_list=[20, 40]), make_engine(t_index_list=[20, 40])
    for i in range(3):
        f = rand_frame(10 + i)
        np.testing.assert_array_equal(a(f), b(f, use_graph=False))


def test_status_keys(make_engine):
    engine = make_engine()
    engine(FRAME)
    engine(FRAME)
    s = engine.status()
    for key in ("frames", "fps", "prompt_encodes", "skipped_frames", "backend", "device", "backend_reason",
                "latency_frames", "t_index_list", "guidance_scale", "seed", "prompt"):
        assert key in s, key
    assert s["frames"] == 2 and s["skipped_frames"] == 0 and s["fps"] > 0
    assert s["backend"] == "eager" and s["device"] == "cpu" and "CUDA" in s["backend_reason"]


def test_register_input_rejects_a_wrong_tensor_and_reads_a_right_one(make_engine):
    engine = make_engine()
    ref = engine(FRAME)
    for bad in (torch.zeros(H, W, 3), torch.zeros(32, 32, 3, dtype=torch.uint8),
                torch.zeros(H, W, 4, dtype=torch.uint8), torch.zeros(W, H, 3, dtype=torch.uint8).transpose(0, 1),
                FRAME):
        with pytest.raises(FrameError, match=r"contiguous uint8 tensor of shape \[64, 64, 3\] on cpu"):
            engine.register_input(bad)
    buf = torch.zeros(H, W, 3, dtype=torch.uint8)
    engine.register_input(buf)
    assert engine.input_buffer.data_ptr() == buf.data_ptr()
    buf.copy_(torch.from_numpy(FRAME))
    result = engine.step()
    np.testing.assert_array_equal(result.output.numpy(), ref)


# --------------------------------------------------------------------------------------- similar filter
def _was_skipped(engine, frame):
    n = engine.status()["skipped_frames"]
    out = engine(frame)
    return out, engine.status()["skipped_frames"] - n


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_similar_filter_skips_near_identical_frames_up_to_max_skip(make_engine, threshold):
    """Frames a few grey levels apart (cosine ~ 1, so skip probability 1 - (1 - cos) / (1 - threshold) ~ 1)
    are skipped, at most max_skip in a row; a skipped frame returns the previous output, a processed one
    the real result."""
    base = rand_frame(3).clip(20, 230)
    frames = [base + np.uint8(2 * i) for i in range(12)]
    engine = make_engine(similar_filter=True, similar_threshold=threshold, similar_max_skip=2)
    plain = make_engine()  # no filter: every frame's real result
    prev, run, skipped, differs = None, 0, 0, False
    for f in frames:
        out, s = _was_skipped(engine, f)
        real = plain(f)
        if s:
            np.testing.assert_array_equal(out, prev)
            differs |= not np.array_equal(out, real)
            run += 1
            skipped += 1
            assert run <= 2, "more than max_skip frames skipped in a row"
        else:
            np.testing.assert_array_equal(out, real)
            run = 0
        prev = out
    assert skipped >= 4 and engine.status()["skipped_frames"] == skipped
    assert differs  # the skipped outputs really were stale, not recomputed
    assert engine.status()["frames"] == len(frames)


@pytest.mark.parametrize("update", [dict(similar_max_skip=0), dict(similar_threshold=1.0),
                                    dict(similar_filter=False)])
def test_similar_filter_never_skips_when_it_cannot(make_engine, update):
    engine = make_engine(similar_filter=True, similar_threshold=0.5, similar_max_skip=3)
    engine.update(**update)
    for _ in range(4):
        engine(FRAME)
    assert engine.status()["skipped_frames"] == 0


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_similar_filter_does_not_skip_very_different_frames(make_engine, threshold):
    """Alternating a frame and its negative: cosine -1, skip probability 0, never skipped."""
    engine = make_engine(similar_filter=True, similar_threshold=threshold, similar_max_skip=10)
    a = rand_frame(4)
    for f in (a, 255 - a) * 3:
        engine(f)
    assert engine.status()["skipped_frames"] == 0


def test_similar_filter_does_not_skip_a_scene_cut(make_engine):
    engine = make_engine(similar_filter=True, similar_threshold=0.5, similar_max_skip=10)
    a = rand_frame(4)
    for _ in range(4):
        prev, _ = _was_skipped(engine, a)
    cut = 255 - a  # cosine -1 to the last processed frame
    out, skipped = _was_skipped(engine, cut)
    assert skipped == 0
    assert not np.array_equal(out, prev)


def test_backend_choice_follows_device_and_low_vram_mode():
    """auto: eager on the CPU; with a CUDA device, low-VRAM streaming forces graph and rejects compiled/trt.

    The CUDA cases are decided from the config alone, so they are checked here without a GPU."""
    from rtdiffusion.backends import choose_backend

    def cfg(backend, device="cpu", max_vram_gb=None):
        c = EngineConfig("random:tiny", 64, 64, torch.device("cpu"), torch.float32, Backend(backend),
                         max_vram_gb=max_vram_gb)
        object.__setattr__(c, "device", torch.device(device))  # a CUDA config without building CUDA tensors
        return c

    assert choose_backend(cfg("auto"))[0] is Backend.EAGER
    backend, reason = choose_backend(cfg("auto", "cuda", max_vram_gb=4.0))
    assert backend is Backend.GRAPH and "low-VRAM" in reason
    for bad in ("compiled", "trt"):
        with pytest.raises(ConfigError, match="max_vram_gb .* backend='eager' or backend='graph'"):
            choose_backend(cfg(bad, "cuda", max_vram_gb=4.0))
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        choose_backend(cfg("graph"))
    # compiled runs on the CPU too (AOTInductor packages, launched from Python); auto artifacts follow the device
    from rtdiffusion.backends import compile_artifacts
    from rtdiffusion.config import CompileArtifacts

    assert choose_backend(cfg("compiled"))[0] is Backend.COMPILED
    assert compile_artifacts(cfg("compiled")) is CompileArtifacts.AOTI
    assert compile_artifacts(cfg("compiled", "cuda")) is CompileArtifacts.JIT
    with pytest.raises(ConfigError, match="compile_artifacts must be one of 'auto', 'jit', 'aoti'; got 'pt2'"):
        EngineConfig("random:tiny", 64, 64, torch.device("cpu"), torch.float32, compile_artifacts="pt2")


def test_settings_that_fail_to_apply_leave_the_engine_running_on_the_old_ones(make_engine):
    """If applying accepted settings fails between frames (out of memory for new buffers, say), that frame
    reports the error, and the engine keeps running exactly as before on the settings it had."""
    engine = make_engine(prompt="a quiet lake", t_index_list=[32])
    before = engine(FRAME)
    real_embed = engine._prompts.embed
    calls = {"n": 0}

    def failing_embed(spec):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated failure while encoding")
        return real_embed(spec)

    engine._prompts.embed = failing_embed
    try:
        engine.update(t_index_list=[20, 40], prompt="a storm")
        with pytest.raises(RuntimeError, match="simulated failure"):
            engine(FRAME)
        assert engine.status()["t_index_list"] == [32] and engine.status()["prompt"] == [["a quiet lake", 1.0]]
        np.testing.assert_array_equal(engine(FRAME), before)  # same settings, same buffers, same output
        engine.update(seed=5)  # later updates build on what runs, not on the failed change
        engine(FRAME)
        assert engine.status()["t_index_list"] == [32] and engine.status()["seed"] == [[5, 1.0]]
    finally:
        engine._prompts.embed = real_embed


def test_a_backend_that_cannot_capture_falls_back_to_eager_loudly(make_engine, caplog):
    """Graph capture that fails (here for real: there is no CUDA device) switches the engine to eager,
    says so in the log and in status(), and the frames keep coming, equal to an eager engine's."""
    import logging

    from rtdiffusion.executors import GraphExecutor

    engine = make_engine(t_index_list=[32])
    expect = make_engine(t_index_list=[32])
    engine._executor = GraphExecutor(engine._base_nets, "graph")  # as build_executor makes it on a GPU
    engine._frame = None
    with caplog.at_level(logging.WARNING, logger="rtdiffusion.engine"):
        out = engine(FRAME)
    assert engine.backend == "eager"
    assert engine.status()["backend_fallback"].startswith("graph -> eager: could not capture")
    assert any("falling back to eager" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(out, expect(FRAME))
    np.testing.assert_array_equal(engine(FRAME), expect(FRAME))


# ---- one vocabulary: strength / steps, and CPU threads ------------------------------------------------------

def test_strength_and_steps_are_the_friendly_form_of_t_index_list(make_engine):
    """from_pretrained(strength=, steps=) and update(strength=, steps=) set t_index_list through the one
    mapping (rtdiffusion/vocabulary.py); status() reports both forms; the frames equal the expert form's."""
    from rtdiffusion.vocabulary import t_index_for

    engine = StreamEngine.from_pretrained("random:tiny", device="cpu", strength=0.6, steps=3)
    s = engine.status()
    assert s["t_index_list"] == t_index_for(0.6, 3, 50) == [20, 30, 40] and s["steps"] == 3
    assert s["strength"] == pytest.approx(0.6, abs=0.01)
    expert = make_engine(t_index_list=[20, 30, 40])
    for _ in range(3):
        np.testing.assert_array_equal(engine(FRAME), expert(FRAME))
    engine.update(steps=1)  # strength kept
    engine(FRAME)
    assert engine.status()["t_index_list"] == [20]
    engine.update(strength=0.35)  # steps kept
    engine(FRAME)
    assert engine.status()["t_index_list"] == [32] == list(StreamEngine.from_pretrained(
        "random:tiny", device="cpu").settings.t_index_list)  # the defaults agree: strength 0.35, 1 step
    for bad, words in [(dict(strength=1.5), "strength must be a number from 0 (keep the input) to 1"),
                       (dict(strength=math.nan), "strength must be a number"),
                       (dict(steps=0), "steps must be an integer from 1 to 16"),
                       (dict(steps=2.0), "steps must be an integer"),
                       (dict(strength=0.5, t_index_list=[10]), "give either t_index_list or strength / steps")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            engine.update(**bad)
        with pytest.raises(ConfigError, match=re.escape(words)):
            StreamEngine.from_pretrained("random:tiny", device="cpu", **bad)
    engine(FRAME)
    assert engine.status()["t_index_list"] == [32]  # the rejected updates changed nothing


def test_cpu_inference_uses_the_asked_or_a_sane_thread_count():
    from rtdiffusion.config import default_cpu_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_cpu_threads() == max(1, min(8, cores // 2))  # 1 on a 2-core machine
    before = torch.get_num_threads()
    try:
        engine = StreamEngine.from_pretrained("random:tiny", device="cpu", threads=2)
        assert torch.get_num_threads() == 2 and engine.status()["threads"] == 2
        StreamEngine.from_pretrained("random:tiny", device="cpu", threads=1)
        assert torch.get_num_threads() == 1
        for bad in (0, -1, 2.5, "many", True):
            with pytest.raises(ConfigError, match="threads must be 'auto' or an integer from 1 to 1024"):
                StreamEngine.from_pretrained("random:tiny", device="cpu", threads=bad)
    finally:
        torch.set_num_threads(before)


def test_a_zero_size_is_refused_not_taken_for_the_default():
    """width/height None means the model's own size; 0 is a bad value, named as such (issue 12)."""
    for kw in (dict(width=0), dict(height=0), dict(width=0, height=0)):
        with pytest.raises(ConfigError, match=r"(width|height) must be a multiple of 8 between 8 and 4096 pixels; got 0"):
            StreamEngine.from_pretrained("random:tiny", device="cpu", **kw)
    assert StreamEngine.from_pretrained("random:tiny", device="cpu").width == 64  # None: the model's size
