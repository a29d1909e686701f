"""`rtdiffusion run` as real processes: a stop by SIGTERM or Ctrl-C keeps a playable output with every frame
written so far; --side-by-side pairs each output with the input it came from; the summary's fps is the
progress bar's. Waits are on what the process reports (its progress bar), never on a guessed time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")

CLI = [sys.executable, "-c", "import sys; from rtdiffusion.cli import main; sys.exit(main(sys.argv[1:]))"]
TINY = ["--model", "random:tiny", "--device", "cpu", "--threads", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


class Output:
    """Collects a pipe in a thread (the progress bar rewrites its line with \\r, so no readline)."""

    def __init__(self, pipe) -> None:
        self.text, self._pipe, self._cond = "", pipe, threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while chunk := os.read(self._pipe.fileno(), 65536):
            with self._cond:
                self.text += chunk.decode(errors="replace")
                self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 300.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.text), timeout), self.text[-2000:]


def frames_done(text: str) -> int:
    counts = re.findall(r"\| *(\d+)/\d+ \[", text)
    return int(counts[-1]) if counts else 0


def test_a_signal_keeps_every_frame_written_so_far(tmp_path):
    """SIGTERM and SIGINT (Ctrl-C), each to its own real run (both at once: half the wall time)."""
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        cwd = tmp_path / sig.name
        cwd.mkdir()
        procs[sig] = subprocess.Popen([*CLI, "run", *TINY, "--input", "synthetic", "--frames", "100000", "--output",
                                       "out.mp4"], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        errs = {sig: Output(p.stderr) for sig, p in procs.items()}
        for sig, p in procs.items():
            errs[sig].wait_for(lambda t: frames_done(t) >= 3)  # it is writing frames now
            p.send_signal(sig)
        for sig, p in procs.items():
            assert p.wait(timeout=120) == 128 + sig, errs[sig].text[-2000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for sig, err in errs.items():
        err.wait_for(lambda t: "stopped by" in t, timeout=10)
        m = re.search(rf"stopped by {sig.name}: wrote (\d+) frames to out.mp4", err.text)
        assert m, err.text[-2000:]
        written = int(m.group(1))
        assert written >= 3
        with av.open(str(tmp_path / sig.name / "out.mp4")) as container:  # a complete, playable file
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
        assert len(decoded) == written, sig.name
        assert all(f.shape == (64, 64, 3) for f in decoded)


def test_side_by_side_pairs_each_output_with_its_input_and_fps_is_the_bars(tmp_path):
    """Two steps: each output left the engine one call after its input went in, so the input beside output i
    is input i-1 (black beside the first). PNGs keep the pixels exact."""
    from rtdiffusion.bench import synthetic_frames

    r = subprocess.run([*CLI, "run", *TINY, "--input", "synthetic", "--frames", "4", "--steps", "2",
                        "--side-by-side", "--output", "pngs"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**ENV, "RTDIFFUSION_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    # the build's stages, one line each as they start and finish (stderr is not a terminal here)
    stages = re.findall(r"^build \[(\d)/3\] ([a-z ]+): (started|took)", r.stderr, re.M)
    assert stages == [(str(i), name, state) for i, name in enumerate(("load weights", "text encoders", "first frame"), 1)
                      for state in ("started", "took")], r.stderr
    assert re.search(r"^build done in [\d.]+ s \(3 stages\)$", r.stderr, re.M)
    assert len(os.listdir(tmp_path / "cache" / ".build-times")) == 1  # recorded: the next build's estimate
    src = synthetic_frames(4, 64, 64)
    pngs = sorted(os.listdir(tmp_path / "pngs"))
    assert len(pngs) == 4
    for i, name in enumerate(pngs):
        img = np.asarray(Image.open(tmp_path / "pngs" / name))
        assert img.shape == (64, 128, 3)
        want = np.zeros_like(src[0]) if i == 0 else src[i - 1]
        assert np.array_equal(img[:, :64], want), i
        assert not np.array_equal(img[:, 64:], img[:, :64])  # the right half is the engine's output
    # the summary's fps is the bar's final rate (frames over the same wall-clock interval)
    summary = float(re.search(r"  ([\d.]+) fps \(wall clock, as the progress bar", r.stdout).group(1))
    bar = r.stderr.replace("\r", "\n").strip().splitlines()
    final = [line for line in bar if "4/4 [" in line][-1]
    m = re.search(r"([\d.]+)frame/s\]", final) or re.search(r"([\d.]+)s/frame\]", final)
    rate = float(m.group(1)) if "frame/s" in m.group(0) else 1.0 / float(m.group(1))
    assert summary == pytest.approx(rate, abs=0.06, rel=0.01), (r.stdout, final)


def test_paths_are_checked_before_the_model_loads(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video")
    cases = [(["--input", "missing.mp4", "--output", "o.mp4"], "input 'missing.mp4' does not exist"),
             (["--input", "notes.mp4", "--output", "o.mp4"], "input 'notes.mp4' is not a readable video file"),
             (["--input", "synthetic", "--output", "nowhere/o.mp4"], "output folder"),
             (["--input", "synthetic", "--output", "o.gif"], "output 'o.gif': expected a video file")]
    procs = [(argv, message, subprocess.Popen([*CLI, "run", *TINY, *argv], cwd=tmp_path, env=ENV, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE))
             for argv, message in cases]  # all at once: each is mostly Python start-up
    for argv, message, proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and message in err, (argv, err)
        assert "Traceback" not in err
        assert "building random:tiny" not in err and "engine ready" not in err, argv  # nothing loaded
    assert not (tmp_path / "o.mp4").exists()
