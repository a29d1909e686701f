"""`rtdiffusion run` and `rtdiffusion bench` as a user runs them: real subprocesses, real files.

Outputs are read back with PyAV and Pillow. Bad arguments must exit non-zero with a message that names
what was expected, and never with a Python traceback.

Every command is started by one module fixture, a few at a time (each runs torch on one thread), so the
module costs about (sum of the commands) / (cores) rather than their sum; each test checks its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction

import numpy as np
import pytest

av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")

CLI = [sys.executable, "-c", "import sys; from rtdiffusion.cli import main; sys.exit(main(sys.argv[1:]))"]
TINY = ["--model", "random:tiny"]


def rtd(*args: str, cwd, timeout: float = 300, argv0: list[str] | None = None) -> subprocess.CompletedProcess:
    # one torch thread: the 64x64 tiny model gains nothing from more and loses a lot on busy cores;
    # offline: nothing here may reach for the hub
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*(argv0 or CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_video(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def write_video(path, frames: list[np.ndarray], fps: int = 24) -> None:
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def pattern(n: int, h: int, w: int) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    return [np.stack([(xx * 4 + 9 * i) % 256, (yy * 4) % 256, np.full_like(xx, 40 * i % 256)], -1).astype(np.uint8)
            for i in range(n)]


def assert_clean_failure(r: subprocess.CompletedProcess, *expected: str) -> None:
    text = r.stdout + r.stderr
    assert r.returncode != 0, text
    assert "Traceback" not in text, text
    for e in expected:
        assert e in text, f"{e!r} not in:\n{text}"


# ------------------------------------------------------------------------------------------ the commands
BAD_RUN_ARGS = {
    "no-input": (["--output", "o.mp4"], ["the following arguments are required: --input"]),
    "frames-0": (["--input", "synthetic", "--output", "o.mp4", "--frames", "0"], ["--frames must be >= 1; got 0"]),
    "cfg-bogus": (["--input", "synthetic", "--output", "o.mp4", "--cfg", "bogus"],
                  ["--cfg: invalid choice: 'bogus'", "'none', 'self', 'initialize', 'full'"]),
    "t-index-99": (["--input", "synthetic", "--output", "o.mp4", "--t-index", "99"],  # the old spelling works
                   ["--t-index-list entries must be integers from 0 to 49", "[99]"]),
    "missing-input": (["--input", "missing.mp4", "--output", "o.mp4"],
                      ["input 'missing.mp4' does not exist", "expected 'synthetic', a video file or an image folder"]),
    "output-ext": (["--input", "synthetic", "--output", "o.gif", "--frames", "2"],
                   ["output 'o.gif': expected a video file (.mp4", "or a folder"]),
    "width-0": (["--input", "synthetic", "--output", "o.mp4", "--width", "0"],
                ["argument --width: must be a multiple of 8 from 8 to 4096 pixels (leave it out for the model's own"]),
}


class Runs:
    """name -> (CompletedProcess, its working folder), each command running in the background."""

    def __init__(self, root):
        self.root, self._futures = root, {}
        self._pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))

    def start(self, name: str, *args: str, argv0: list[str] | None = None) -> None:
        cwd = self.root / name
        cwd.mkdir(exist_ok=True)
        self._futures[name] = self._pool.submit(rtd, *args, cwd=cwd, argv0=argv0)

    def __getitem__(self, name: str) -> tuple[subprocess.CompletedProcess, object]:
        f: Future = self._futures[name]
        return f.result(), self.root / name


def _needed(item) -> set[str]:
    """The commands a collected test of this module reads (only those selected are started)."""
    name = item.originalname
    if name == "test_run_bad_arguments":
        return {f"bad-{item.callspec.params['name']}"}
    return set(NEEDS.get(name, ()))


NEEDS = {
    "test_bench_smoke": ["bench"], "test_run_synthetic_to_video": ["synthetic-video"],
    "test_run_synthetic_to_folder": ["synthetic-folder"], "test_run_video_file_in": ["video-in"],
    "test_run_image_folder_in_video_out": ["folder-in"], "test_bench_bad_arguments": ["bench-bad"],
    "test_installed_script": ["script", "script-no-command"],
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    here = request.module.__name__
    wanted = set().union(*(_needed(i) for i in request.session.items if i.module.__name__ == here))
    root = tmp_path_factory.mktemp("cli")
    r = Runs(root)

    def start(name, *args, argv0=None):
        if name in wanted:
            r.start(name, *args, argv0=argv0)

    # inputs first, then the commands, the longest first
    (root / "bench").mkdir()
    (root / "bench" / "bench.jsonl").write_text(json.dumps({"earlier": "record"}) + "\n")
    (root / "video-in").mkdir()
    write_video(root / "video-in" / "in.mp4", pattern(6, 80, 96))
    src = root / "folder-in" / "imgs"
    src.mkdir(parents=True)
    for i, f in enumerate(pattern(3, 40, 48)):
        Image.fromarray(f).save(src / f"img_{i}.png")
    (src / "notes.txt").write_text("not an image")

    start("bench", "bench", *TINY, "--frames", "3", "--warmup", "1", "--append-json", "bench.jsonl")
    start("synthetic-video", "run", *TINY, "--input", "synthetic", "--output", "out.mp4", "--frames", "8",
          "--no-progress")
    start("synthetic-folder", "run", *TINY, "--input", "synthetic", "--output", "pngs", "--frames", "8",
          "--no-progress", "--prompt", "a neon city", "--t-index", "20", "40")
    start("video-in", "run", *TINY, "--input", "in.mp4", "--output", "out", "--frames", "4", "--no-progress",
          "--width", "64", "--height", "64")
    start("folder-in", "run", *TINY, "--input", "imgs", "--output", "out.mp4", "--no-progress")
    for name, (args, _) in BAD_RUN_ARGS.items():
        start(f"bad-{name}", "run", *TINY, *args)
    start("bench-bad", "bench", *TINY, "--frames", "0")
    script = shutil.which("rtdiffusion")
    if script:
        start("script", "run", *TINY, "--input", "synthetic", "--output", "o.mp4", "--cfg", "bogus",
              argv0=[script])
        start("script-no-command", argv0=[script])
    yield r
    r._pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------- run
def test_run_synthetic_to_video(runs):
    r, cwd = runs["synthetic-video"]
    assert r.returncode == 0, r.stderr
    frames = read_video(cwd / "out.mp4")
    assert len(frames) == 8
    assert all(f.shape == (64, 64, 3) for f in frames)  # random:tiny's own size
    assert "8 frames -> out.mp4" in r.stdout and "backend eager" in r.stdout and "fps" in r.stdout
    # the video holds the engine's pictures (up to the lossy codec), not some other picture
    from rtdiffusion import StreamEngine
    from rtdiffusion.bench import synthetic_frames

    engine = StreamEngine.from_pretrained("random:tiny", device="cpu")
    luma = np.array([0.299, 0.587, 0.114])
    for got, src in zip(frames, synthetic_frames(8, 64, 64)):
        want = engine(src).astype(float)
        got = got.astype(float)
        # 4:2:0 chroma smears the colours of a noise-like picture; brightness and the mean colour survive
        assert np.abs(got.mean((0, 1)) - want.mean((0, 1))).max() < 2.0
        assert np.abs(got @ luma - want @ luma).mean() < 4.0
        assert np.corrcoef((got @ luma).ravel(), (want @ luma).ravel())[0, 1] > 0.8  # other seed: ~0.1


def test_run_synthetic_to_folder(runs):
    r, cwd = runs["synthetic-folder"]
    assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(cwd / "pngs"))
    assert names == [f"frame_{i:05d}.png" for i in range(8)]
    for n in names:
        with Image.open(cwd / "pngs" / n) as im:
            assert im.size == (64, 64) and im.mode == "RGB"


def test_run_video_file_in(runs):
    """A 96x80 video of 6 frames, resized to the engine's 64x64; --frames 4 takes the first 4."""
    r, cwd = runs["video-in"]
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(cwd / "out")) == [f"frame_{i:05d}.png" for i in range(4)]
    assert "4 frames -> out" in r.stdout


def test_run_image_folder_in_video_out(runs):
    r, cwd = runs["folder-in"]
    assert r.returncode == 0, r.stderr
    frames = read_video(cwd / "out.mp4")
    assert len(frames) == 3 and all(f.shape == (64, 64, 3) for f in frames)


@pytest.mark.parametrize("name", list(BAD_RUN_ARGS))
def test_run_bad_arguments(runs, name):
    r, cwd = runs[f"bad-{name}"]
    assert_clean_failure(r, *BAD_RUN_ARGS[name][1])
    assert not (cwd / "o.mp4").exists() and not (cwd / "o.gif").exists()
    assert "building random:tiny" not in r.stderr and "engine ready" not in r.stderr  # refused before loading


def test_installed_script(runs):
    if not shutil.which("rtdiffusion"):
        pytest.skip("the rtdiffusion script is not on PATH")
    r, _ = runs["script"]
    assert_clean_failure(r, "invalid choice: 'bogus'")
    r, _ = runs["script-no-command"]
    assert r.returncode == 2 and "run" in r.stdout and "bench" in r.stdout  # no command: the help


# ----------------------------------------------------------------------------------------------- bench
def test_bench_smoke(runs):
    """The CI smoke test of the benchmark: table on stdout, one JSON record appended per run."""
    from rtdiffusion.bench import STAGES

    r, cwd = runs["bench"]
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "model random:tiny  backend eager  64x64" in out
    assert "stage          ms" in out
    for stage in STAGES:
        assert f"  {stage}" in out, stage
    assert "end to end     median" in out and "fps; latency in->out" in out
    lines = (cwd / "bench.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"earlier": "record"}
    rec = json.loads(lines[1])
    assert rec["settings"]["model"] == "random:tiny" and rec["settings"]["frames"] == 3
    assert rec["settings"]["warmup"] == 1 and rec["settings"]["backend"] == "eager"
    assert set(rec["frame_ms"]) >= {"median", "p90", "p99", "max", "mean"}
    assert rec["frame_ms"]["median"] > 0 and rec["fps"] == pytest.approx(1e3 / rec["frame_ms"]["median"])
    assert list(rec["stages_ms"]) == list(STAGES) and all(v >= 0 for v in rec["stages_ms"].values())
    assert rec["flops_per_frame"] > 0
    assert rec["environment"]["torch"] and rec["environment"]["python"]


def test_bench_bad_arguments(runs):
    r, _ = runs["bench-bad"]
    assert_clean_failure(r, "--frames must be >= 1 and --warmup >= 0; got 0, 30")
