"""`rtdiffusion bench --compare-baseline --vae-overlap` as a user runs it (a real subprocess, tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CLI = [sys.executable, "-c", "import sys; from rtdiffusion.cli import main; sys.exit(main(sys.argv[1:]))"]


def test_bench_compares_with_the_baseline_and_runs_the_overlapped_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([*CLI, "bench", "--model", "random:tiny", "--frames", "3", "--warmup", "1", "--no-profile",
                        "--no-flops", "--compare-baseline", "--vae-overlap", "--json", "b.jsonl"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "baseline       StreamDiffusion loop, eager: median" in r.stdout and "x faster" in r.stdout
    rec = json.loads((tmp_path / "b.jsonl").read_text())
    assert rec["settings"]["vae_overlap"] is True
    assert rec["baseline"]["ratio"] > 0 and rec["baseline"]["frame_ms"]["median"] > 0
    # the overlapped step hands a frame out 2 calls later: latency counts 3 frame times (0 + 2 + this one)
    assert abs(rec["latency_ms"] - 3 * rec["frame_ms"]["median"]) < 1e-6
