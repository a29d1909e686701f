"""Many streams on one model (issue 17 part 2), on the CPU with the tiny random model.

The oracle is the single StreamEngine: each stream of a group must give what a StreamEngine with the same
settings gives for the same frames (the group's UNet runs once over every stream's rows). The first S-1
outputs of a stream are its empty ring's (all-zero latent rows); on those degenerate rows the CPU kernels
differ with the batch size, so they are not compared, as tests/test_vae_overlap.py does.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from rtdiffusion import ConfigError, FrameError, MultiStreamEngine, StreamEngine
from rtdiffusion.bench import synthetic_frames
from rtdiffusion.config import EngineConfig
from rtdiffusion.multistream_io import StreamErrors
from rtdiffusion.multistream_streams import change_settings
from rtdiffusion.settings import StreamSettings
from rtdiffusion.vocabulary import t_index_for

H = W = 64
CONFIG = EngineConfig("random:tiny", W, H, torch.device("cpu"), torch.float32)


def settings(**kw) -> StreamSettings:
    return change_settings(StreamSettings(), 50, kw)


class Counted:
    """Delegates to a network call of the real networks object, recording each call's batch rows."""

    def __init__(self, fn):
        self.fn, self.rows = fn, []

    def __call__(self, x, *args):
        self.rows.append(x.shape[0])
        return self.fn(x, *args)


def count_calls(group: MultiStreamEngine) -> dict[str, Counted]:
    nets = group.nets
    calls = {name: Counted(getattr(nets, name)) for name in ("encode", "unet", "decode")}
    for name, c in calls.items():
        setattr(nets, name, c)  # on the instance: group_step calls nets.unet(...) through it
    return calls


def assert_close(out: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert out.shape == ref.shape and out.dtype == np.uint8, what
    diff = int(np.abs(out.astype(int) - ref.astype(int)).max())
    assert diff <= 1, f"{what}: {diff} grey levels from the single engine"


def assert_latents_close(group: MultiStreamEngine, i: int, single: StreamEngine, what: str) -> None:
    a, b = group._group.slots[i].buffers.denoised, single._state.buffers.denoised
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() / scale < 1e-4, what


FOUR = [dict(t_index_list=[32], prompt="a red fox", seed=1),
        dict(t_index_list=[10, 30], cfg="self", guidance_scale=1.4, delta=0.8, prompt="neon jellyfish", seed=5),
        dict(t_index_list=[15, 30, 45], cfg="full", guidance_scale=1.5, prompt="glass city", seed=9),
        dict(t_index_list=[20, 40], cfg="initialize", guidance_scale=1.3, prompt="ink", seed=3)]


def test_each_stream_equals_a_single_engine_and_the_unet_runs_once_per_tick(tiny_components):
    ss = [settings(**d) for d in FOUR]
    group = MultiStreamEngine(CONFIG, tiny_components, ss)
    singles = [StreamEngine(CONFIG, tiny_components, s) for s in ss]
    calls = count_calls(group)
    frames = synthetic_frames(6, H, W)
    ticks = 5
    for k in range(ticks):
        fr = [frames[(k + i) % 6] for i in range(4)]  # every stream its own input
        outs = group.step_all(fr)
        for i, (single, f, out) in enumerate(zip(singles, fr, outs)):
            ref = single(f)
            if k >= len(FOUR[i]["t_index_list"]) - 1:  # the ring is full
                assert_close(out, ref, f"stream {i}, tick {k}")
                assert_latents_close(group, i, single, f"stream {i}, tick {k}")
    # one UNet call per tick over every stream's rows: 1 + 2 + (3 + 3 uncond) + (2 + 1 uncond) = 12 rows
    assert calls["unet"].rows == [12] * ticks
    assert calls["encode"].rows == [4] * ticks and calls["decode"].rows == [4] * ticks  # TAESD batched too
    st = group.status()
    assert st["unet_rows"] == 12 and st["rows_per_stream"] == [1, 2, 6, 3] and st["ticks"] == ticks
    assert st["streams"] == 4 and st["unet_calls_per_tick"] == 1
    rows = [group.stream(i).status()["rows"] for i in range(4)]
    assert [r["first"] for r in rows] == [0, 1, 3, 9]
    assert [(r["stream"], r["uncond"]) for r in rows] == [(1, 0), (2, 0), (3, 3), (2, 1)]
    assert [group.stream(i).status()["frames"] for i in range(4)] == [ticks] * 4
    assert group.stream(2).status()["prompt"] == [["glass city", 1.0]]
    assert group.stream(1).status()["seed"] == [[5, 1.0]]
    # each stream's UNet inputs are rows of the one arena, not tensors of their own
    arena = group._group.arena
    for i, r in enumerate(rows):
        b = group._group.slots[i].buffers
        assert b.unet_in.data_ptr() == arena.unet_in[r["first"]].data_ptr()
        assert b.embeds.data_ptr() == arena.embeds[r["first"]].data_ptr()
        assert b.t_unet.data_ptr() == arena.t_unet[r["first"]:].data_ptr()


def test_a_setting_lands_at_the_next_tick_and_changes_only_that_stream(tiny_components):
    base = [dict(t_index_list=[10, 30], prompt="a", seed=1), dict(t_index_list=[32], prompt="b", seed=2),
            dict(t_index_list=[25], cfg="self", guidance_scale=1.5, prompt="c", seed=3)]
    ss = [settings(**d) for d in base]
    group = MultiStreamEngine(CONFIG, tiny_components, ss)
    singles = [StreamEngine(CONFIG, tiny_components, s) for s in ss]
    frames = synthetic_frames(8, H, W)
    full_from = [1, 0, 0]  # tick from which each stream's ring is full (it changes for the restarted stream)

    def tick(k: int) -> None:
        fr = [frames[(k + 2 * i) % 8] for i in range(3)]
        for i, (out, single) in enumerate(zip(group.step_all(fr), singles)):
            ref = single(fr[i])
            if k >= full_from[i]:
                assert_close(out, ref, f"stream {i}, tick {k}")

    tick(0), tick(1)
    # from other threads: stream 1 a new prompt and seed (same rows), stream 2 two steps (its rows change)
    workers = [threading.Thread(target=lambda: group.stream(1).update(prompt="neon", seed=11)),
               threading.Thread(target=lambda: group.stream(2).update(steps=2))]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert group.stream(1).settings.prompt.parts == (("b", 1.0),)  # accepted, not applied before the tick
    assert group.status()["rows_per_stream"] == [2, 1, 1]
    singles[1].update(prompt="neon", seed=11)
    singles[2].update(steps=2)
    full_from[2] = 2 + 1  # stream 2 starts empty with 2 steps: full one tick later
    for k in range(2, 5):
        tick(k)
    assert group.stream(1).settings.prompt.parts == (("neon", 1.0),)
    assert group.stream(1).status()["seed"] == [[11, 1.0]]
    assert group.stream(2).status()["steps"] == 2 and group.stream(2).status()["rows"]["unet"] == 2
    st = group.status()
    assert st["rows_per_stream"] == [2, 1, 2] and st["unet_rows"] == 5 and st["layout_changes"] == 1
    # stream 0 (two steps in flight) kept its frames across the layout change: it still equals its single
    # engine, which never restarted; only stream 2 was restarted
    assert [group.stream(i).status()["resets"] for i in range(3)] == [0, 0, 1]
    assert [s.settings for s in group.streams[:1]] == ss[:1]


def test_a_bad_frame_or_setting_fails_only_its_stream(tiny_components):
    ss = [settings(t_index_list=[32], prompt="x", seed=1),
          settings(t_index_list=[10, 30], cfg="self", guidance_scale=1.4, prompt="y", seed=2),
          settings(t_index_list=[32], prompt="z", seed=3)]
    group = MultiStreamEngine(CONFIG, tiny_components, ss)
    singles = [StreamEngine(CONFIG, tiny_components, s) for s in ss]
    frames = synthetic_frames(6, H, W)

    def good(k: int, skip: int | None = None) -> list:
        refs = [None if i == skip else single(frames[(k + i) % 6]) for i, single in enumerate(singles)]
        return refs

    outs, refs = group.step_all([frames[(0 + i) % 6] for i in range(3)]), good(0)
    for i in (0, 2):
        assert_close(outs[i], refs[i], f"stream {i}")
    # a bad frame for stream 1: it is named, it sits the tick out; the others run and are unaffected
    bad = np.zeros((32, 32, 3), np.uint8)
    fr = [frames[1], bad, frames[3]]
    with pytest.raises(StreamErrors, match=r"stream 1: a frame must have shape \[64, 64, 3\].*got \[32, 32, 3\]") as ei:
        group.step_all(fr)
    assert set(ei.value.errors) == {1} and isinstance(ei.value, FrameError)
    refs = [singles[0](frames[1]), None, singles[2](frames[3])]
    for i in (0, 2):
        assert_close(ei.value.outputs[i], refs[i], f"stream {i} beside a bad frame")
    assert isinstance(ei.value.outputs[1], FrameError)
    # the same with return_exceptions, a float frame this time; and None: no frame for stream 2 this tick
    outs = group.step_all([frames[2], np.zeros((H, W, 3), np.float32), None], return_exceptions=True)
    assert_close(outs[0], singles[0](frames[2]), "stream 0")
    assert isinstance(outs[1], FrameError) and "uint8" in str(outs[1]) and outs[2] is None
    # a NaN or unknown setting for stream 1: a ConfigError now, on the caller's thread; nothing changes
    before = group.stream(1).settings
    with pytest.raises(ConfigError, match="guidance_scale must be a number from 0 to 30; got nan"):
        group.stream(1).update(guidance_scale=float("nan"))
    with pytest.raises(ConfigError, match="unknown per-stream setting.*'similar_filter'"):
        group.stream(1).update(similar_filter=True)
    with pytest.raises(ConfigError, match="stream index must be an integer from 0 to 2"):
        group.stream(3)
    # stream 1 lost nothing: after two held ticks it continues exactly where its single engine is
    for k in range(3, 5):
        fr = [frames[(k + i) % 6] for i in range(3)]
        outs = group.step_all(fr)
        for i in range(3):
            assert_close(outs[i], singles[i](fr[i]), f"stream {i} after the errors, tick {k}")
    assert group.stream(1).settings == before
    s1 = group.stream(1).status()
    assert s1["held_ticks"] == 2 and s1["frames"] == 3 and "uint8" in s1["last_error"]
    assert group.stream(0).status()["held_ticks"] == 0 and group.stream(2).status()["held_ticks"] == 1
    with pytest.raises(FrameError, match="list of 3 frames"):
        group.step_all(frames[:2])
    assert group.step_all([None, None, None]) == [None, None, None]  # nobody sent a frame: nothing runs
    assert [group.stream(i).status()["held_ticks"] for i in range(3)] == [1, 3, 2]


def test_each_stream_called_from_its_own_thread(tiny_components):
    ss = [settings(t_index_list=[32], prompt="p", seed=4), settings(t_index_list=[20], prompt="q", seed=6)]
    group = MultiStreamEngine(CONFIG, tiny_components, ss)
    singles = [StreamEngine(CONFIG, tiny_components, s) for s in ss]
    frames = synthetic_frames(4, H, W)
    # alone, stream 0 waits for stream 1; with a timeout its frame is withdrawn and nothing ran
    with pytest.raises(TimeoutError, match="stream 0"):
        group.stream(0)(frames[0], timeout=0.05)
    with pytest.raises(FrameError, match="stream 1: a frame must"):
        group.stream(1)(np.zeros((H, W), np.uint8))  # checked on the caller's thread; nothing queued
    assert group.ticks == 0
    got: dict[int, list] = {0: [], 1: []}
    errors: list = []

    def drive(i: int) -> None:
        try:
            for k in range(3):
                got[i].append(group.stream(i)(frames[(k + i) % 4], timeout=120))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors and group.ticks == 3
    for i in range(2):
        for k in range(3):
            assert_close(got[i][k], singles[i](frames[(k + i) % 4]), f"stream {i}, call {k}")


def test_from_pretrained_checks_and_builds(tiny_components):
    with pytest.raises(ConfigError, match="streams must be from 1 to 64; got 0"):
        MultiStreamEngine.from_pretrained("random:tiny", streams=0, device="cpu")
    with pytest.raises(ConfigError, match="stream 1: .*steps"):
        MultiStreamEngine.from_pretrained("random:tiny", streams=[{}, {"steps": 0}], device="cpu")
    with pytest.raises(ConfigError, match="backend"):
        MultiStreamEngine.from_pretrained("random:tiny", streams=2, device="cpu", backend="graph")
    group = MultiStreamEngine.from_pretrained("random:tiny", streams=[{"prompt": "a"}, {"steps": 2, "seed": 8}],
                                              width=W, height=H, device="cpu", strength=0.5, prompt="b")
    st = group.status()
    assert st["streams"] == 2 and st["backend"] == "eager" and st["rows_per_stream"] == [1, 2]
    assert group.stream(0).status()["prompt"] == [["a", 1.0]] and group.stream(1).status()["prompt"] == [["b", 1.0]]
    assert group.stream(1).status()["strength"] == pytest.approx(0.5, abs=0.02)
    outs = group.step_all([np.zeros((H, W, 3), np.uint8), torch.zeros(H, W, 3, dtype=torch.uint8)])
    assert isinstance(outs[0], np.ndarray) and isinstance(outs[1], torch.Tensor) and outs[1].shape == (H, W, 3)


def test_frame_buffer_streams_equal_single_engines(tiny_components):
    """F = 2 frames per stream per tick: each stream's rows of the [N*F] frame arenas are its own two frames."""
    config = EngineConfig("random:tiny", W, H, torch.device("cpu"), torch.float32, frame_buffer_size=2)
    ss = [settings(t_index_list=[32], prompt="a", seed=1),
          settings(t_index_list=[15, 35], cfg="initialize", guidance_scale=1.2, prompt="b", seed=2)]
    group = MultiStreamEngine(config, tiny_components, ss)
    singles = [StreamEngine(config, tiny_components, s) for s in ss]
    frames = synthetic_frames(8, H, W)
    for k in range(3):
        fr = [np.stack([frames[(2 * k + 3 * i) % 8], frames[(2 * k + 3 * i + 1) % 8]]) for i in range(2)]
        outs = group.step_all(fr)
        for i in range(2):
            ref = singles[i](fr[i])
            assert outs[i].shape == (2, H, W, 3)
            if k >= len(ss[i].t_index_list) - 1:
                assert_close(outs[i], ref, f"stream {i}, tick {k}")
    # rows: stream 0 = 1 step x 2 frames; stream 1 = 2 uncond (initialize: F) + 2 steps x 2 frames
    assert group.status()["rows_per_stream"] == [2, 6]


def test_sdxl_added_conditioning_rows_are_views_of_the_arena():
    """SDXL's text_embeds / time_ids follow the same row layout as unet_in (no model needed to check it)."""
    from rtdiffusion.buffers import StreamLayout
    from rtdiffusion.conditioning import TextTimeConditioning
    from rtdiffusion.multistream_step import GroupIO, GroupLayout, GroupState
    from rtdiffusion.settings import CfgMode

    def layout(slots: int, cfg: CfgMode) -> StreamLayout:
        return StreamLayout(frames=1, slots=slots, cfg=cfg, height=H, width=W, latent_h=8, latent_w=8,
                            text_tokens=5, text_dim=16, dtype=torch.float32, device=torch.device("cpu"))

    cond = TextTimeConditioning(pooled_dim=12)
    gl = GroupLayout((layout(1, CfgMode.NONE), layout(2, CfgMode.FULL), layout(3, CfgMode.INITIALIZE)))
    z = torch.zeros(3, H, W, 3, dtype=torch.uint8)
    g = GroupState(gl, GroupIO(z, z.clone()), cond)
    assert gl.row_starts == (0, 1, 5) and gl.unet_rows == 9
    text_embeds, time_ids = g.arena.added
    assert text_embeds.shape == (9, 12) and time_ids.shape == (9, 6)
    for slot, start in zip(g.slots, gl.row_starts):
        b = slot.buffers
        assert b.added[0].data_ptr() == text_embeds[start].data_ptr()
        assert b.added[1].data_ptr() == time_ids[start].data_ptr() and b.added[1].shape[0] == b.layout.unet_rows
    assert (time_ids == torch.tensor([H, W, 0, 0, H, W], dtype=torch.float32)).all()  # every row written
    g.slots[1].buffers.added[0].fill_(1.0)  # one stream's rows only
    assert text_embeds[1:5].eq(1).all() and text_embeds[:1].eq(0).all() and text_embeds[5:].eq(0).all()


def test_updates_from_another_thread_while_ticks_run(tiny_components):
    """Settings arriving while ticks run land whole at a boundary; after the last update, the next tick has it."""
    group = MultiStreamEngine(CONFIG, tiny_components, [settings(prompt="a"), settings(prompt="b")])
    frames = synthetic_frames(2, H, W)
    done = threading.Event()
    errors: list = []

    def control() -> None:
        try:
            for n in range(40):
                group.stream(1).update(seed=100 + n, strength=0.3 + 0.01 * (n % 10))
                group.stream(0).update_prompt(f"prompt {n}")
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=control)
    t.start()
    ticks = 0
    while not done.is_set() or ticks < 3:
        group.step_all(frames)
        ticks += 1
        s = group.stream(1).settings  # applied settings are always one whole update, never half of one
        n = s.seed.parts[0][0] - 100
        assert (n < 0 and s.t_index_list == (32,)) or list(s.t_index_list) == t_index_for(0.3 + 0.01 * (n % 10), 1, 50)
    t.join(timeout=60)
    assert not errors
    group.step_all(frames)
    assert group.stream(1).status()["seed"] == [[139, 1.0]]
    assert group.stream(0).status()["prompt"] == [["prompt 39", 1.0]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the device machine)")
def test_group_step_captured_on_cuda_equals_eager_without_allocations():
    """On a GPU the whole tick is one CUDA graph per group layout: the same pixels as the eager group step,
    no CUDA allocation per steady tick, a recapture on a layout change with the others' frames kept."""
    from rtdiffusion.config import Backend, VaeKind
    from rtdiffusion.models.loading import load_components

    comps = load_components("random:tiny", torch.device("cuda"), torch.float16, VaeKind.TINY, seed=0)
    ss = [settings(**d) for d in FOUR[:3]]

    def group(backend):
        config = EngineConfig("random:tiny", W, H, torch.device("cuda"), torch.float16, backend=backend)
        return MultiStreamEngine(config, comps, list(ss))

    graph, eager = group(Backend.GRAPH), group(Backend.EAGER)
    assert graph.backend_fallback is None and graph.status()["captures"] == 1
    frames = synthetic_frames(8, H, W)
    fr = lambda k: [frames[(k + i) % 8] for i in range(3)]  # noqa: E731
    for k in range(3):
        for i, (a, b) in enumerate(zip(graph.step_all(fr(k)), eager.step_all(fr(k)))):
            assert_close(a, b, f"stream {i}, tick {k}")
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for k in range(3, 6):
        graph.step_all(fr(k))
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    for k in range(3, 6):
        eager.step_all(fr(k))
    for g in (graph, eager):
        g.stream(0).update(steps=2)
    for k in range(6, 9):
        for i, (a, b) in enumerate(zip(graph.step_all(fr(k)), eager.step_all(fr(k)))):
            assert_close(a, b, f"stream {i}, tick {k} after the layout change")
    assert graph.status()["captures"] == 2 and graph.status()["layout_changes"] == 1
    cuda_frames = [torch.from_numpy(f).cuda() for f in fr(9)]
    outs = graph.step_all(cuda_frames)
    assert all(o.is_cuda and o.shape == (H, W, 3) for o in outs)
