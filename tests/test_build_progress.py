"""Build progress (rtdiffusion/progress.py): the stages of a cold build in order, fractions that never go back
and end at 1, estimates from the times recorded by the last build with the same key (a fresh engine_dir per
test), priors before that, and the terminal's view of it. Real engines (random:tiny on the CPU); no test
depends on how long anything takes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from rtdiffusion import StreamEngine
from rtdiffusion.cli.progress_view import TerminalProgress, describe
from rtdiffusion.progress import (FIRST_FRAME, LOAD, NETWORKS, PRIOR_S, TEXT, BuildProgress, EstimateSource,
                                  StageState, plan_stages)

TINY = dict(width=64, height=64, device="cpu", dtype="float32")


def build(engine_dir, **kw):
    events = []
    progress = BuildProgress([events.append])
    engine = StreamEngine.from_pretrained("random:tiny", **TINY, engine_dir=str(engine_dir), progress=progress, **kw)
    assert events[-1].state is StageState.FINISH  # the build is not over before the first frame
    engine(np.zeros((64, 64, 3), np.uint8))
    engine(np.zeros((64, 64, 3), np.uint8))  # a second frame reports nothing
    return engine, events


def check_order(events, names):
    assert [e.stage for e in events if e.state is StageState.START] == names
    assert [e.index for e in events if e.state is StageState.START] == list(range(1, len(names) + 1))
    assert {e.count for e in events} == {len(names)}
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert events[-1].state is StageState.DONE and events[-1].estimate_s == 0.0
    left = [e.estimate_s for e in events]
    assert all(x >= 0 for x in left)


def test_stages_in_order_then_the_second_build_estimates_from_the_first(tmp_path):
    _, first = build(tmp_path)
    check_order(first, [LOAD, TEXT, FIRST_FRAME])
    assert {e.source for e in first} == {EstimateSource.PRIOR}
    assert first[0].estimate_s == round(sum(PRIOR_S[(n, "cpu")] for n in (LOAD, TEXT, FIRST_FRAME)), 1)
    records = list((tmp_path / ".build-times").iterdir())
    assert len(records) == 1
    recorded = json.loads(records[0].read_text())["stages"]
    assert set(recorded) == {LOAD, TEXT, FIRST_FRAME}
    took = {e.stage: e.stage_s for e in first if e.state is StageState.FINISH}
    assert recorded == pytest.approx(took, abs=1e-3)  # each stage's own seconds, as the events said

    _, second = build(tmp_path)
    check_order(second, [LOAD, TEXT, FIRST_FRAME])
    assert {e.source for e in second} == {EstimateSource.RECORDED}
    assert second[0].estimate_s == pytest.approx(sum(recorded.values()), abs=0.06)
    # a stage's weight in the fraction is its recorded time
    total = sum(max(v, 0.01) for v in recorded.values())
    load_done = [e for e in second if e.stage == LOAD and e.state is StageState.FINISH][0]
    assert load_done.fraction == pytest.approx(max(recorded[LOAD], 0.01) / total, abs=1e-3)


def test_another_key_gets_the_priors_and_a_bad_record_is_ignored(tmp_path, caplog):
    build(tmp_path)
    _, other = build(tmp_path, frame_buffer_size=1, vae_overlap=True)  # another key: nothing recorded for it
    assert {e.source for e in other} == {EstimateSource.PRIOR}
    for record in (tmp_path / ".build-times").iterdir():
        record.write_text("{not json")
    _, after = build(tmp_path)
    assert {e.source for e in after} == {EstimateSource.PRIOR} and "ignoring the recorded build times" in caplog.text
    texts = [r.read_text() for r in (tmp_path / ".build-times").iterdir()]
    assert len(texts) == 2 and sum(t.startswith("{\n") for t in texts) == 1  # this key's record was rewritten


def test_network_stages_nest_in_the_stage_that_calls_them_and_unrun_ones_are_skipped(tmp_path):
    """The compiled backend on the CPU: the first frame builds each network (planned after it)."""
    plan = plan_stages("compiled", "cpu")
    assert [n for n, _ in plan] == [LOAD, TEXT, FIRST_FRAME, *NETWORKS]
    events = []
    p = BuildProgress([events.append])
    p.plan(plan, device_type="cpu", key={"k": 1}, root=tmp_path)
    for name in (LOAD, TEXT):
        with p.stage(name):
            pass
    with p.stage(FIRST_FRAME):
        with p.stage("unet"):  # out of plan order among the networks is fine
            pass
        with p.stage("vae_encoder"):
            pass
        with p.stage("unet"):  # reported once
            pass
    p.finish()
    got = [(e.stage, e.state.value) for e in events]
    assert got == [(LOAD, "start"), (LOAD, "finish"), (TEXT, "start"), (TEXT, "finish"), (FIRST_FRAME, "start"),
                   ("unet", "start"), ("unet", "finish"), ("vae_encoder", "start"), ("vae_encoder", "finish"),
                   (FIRST_FRAME, "finish"), ("vae_decoder", "skip"), ("done", "done")]
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    recorded = json.loads(next((tmp_path / ".build-times").iterdir()).read_text())["stages"]
    assert recorded["vae_decoder"] == 0.0 and set(recorded) == {n for n, _ in plan}
    with p.stage("vae_decoder"):  # after the build: nothing more is reported
        pass
    assert len(events) == len(got)


def test_a_failing_listener_does_not_stop_the_build(tmp_path, caplog):
    seen = []

    def broken(event):
        raise RuntimeError("display gone")

    progress = BuildProgress([broken, seen.append])
    engine = StreamEngine.from_pretrained("random:tiny", **TINY, engine_dir=str(tmp_path), progress=progress)
    assert engine(np.zeros((64, 64, 3), np.uint8)).shape == (64, 64, 3)
    assert seen[-1].state is StageState.DONE and "display gone" in caplog.text


def test_terminal_lines_and_bar():
    p = BuildProgress()
    p.plan(plan_stages("eager", "cpu"), device_type="cpu")
    lines, bar = io.StringIO(), io.StringIO()
    p.subscribe(TerminalProgress(lines, tty=False))
    p.subscribe(TerminalProgress(bar, tty=True))
    for name in (LOAD, TEXT):
        with p.stage(name):
            pass
    p.last_stage(FIRST_FRAME, lambda: None)
    text = lines.getvalue().splitlines()
    assert text[0].startswith("build [1/3] load weights: started; 0% done") and "(prior estimate)" in text[0]
    assert text[1].startswith("build [1/3] load weights: took ")
    assert text[-1].startswith("build done in ") and len(text) == 7
    shown = bar.getvalue()
    assert shown.count("\n") == 1 and shown.endswith("(3 stages)\n") and "[####################] 100%" in shown
    assert describe(p.last) == text[-1]
