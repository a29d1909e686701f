#!/usr/bin/env python3
"""Engine-level device check of the temporal KV cache and low-VRAM mode, through StreamEngine itself.

1. KV cache (random:sd-turbo 512x512 fp16, backend graph): frame time and GPU allocations per steady-state
   frame with the cache off and with 1, 2, 4 cached frames; switching on/off between frames works without
   a stall after the first visit of each setting (graph cache).
2. Low-VRAM (random:sd-turbo, max_vram_gb forcing streaming, backend graph): frame time, the plan from
   status(), output equal to the resident engine's.

    python bench/engine_features.py      # prints a table last, writes $OUT/engine_features.json
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rtdiffusion import StreamEngine  # noqa: E402
from rtdiffusion.bench import run_bench, synthetic_frames  # noqa: E402


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    out = {"kv": [], "low_vram": {}}
    path = os.path.join(os.environ.get("OUT", "."), "engine_features.json")
    frames = synthetic_frames(32, 512, 512)
    ok = True
    e = StreamEngine.from_pretrained("random:sd-turbo", device="cuda", dtype="float16", backend="graph",
                                     t_index_list=[32], kv_max_frames=4)
    for enabled, n in [(False, 1), (True, 1), (True, 2), (True, 4), (False, 1)]:
        e.update(cache_enabled=enabled, cache_maxframes=n)
        t0 = time.perf_counter()
        e(frames[0])  # the setting's first frame (captures on a first visit)
        first_ms = (time.perf_counter() - t0) * 1e3
        r = run_bench(e, frames=150, warmup=10, profile=False, flops=False)
        row = {"enabled": enabled, "maxframes": n, "median_ms": r.frame_ms["median"], "p99_ms": r.frame_ms["p99"],
               "device_ms": r.device_ms, "allocs_per_frame": r.allocations_per_frame, "first_frame_ms": first_ms,
               "captures": e.status()["graph_cache"]["captures"], "fallback": e.backend_fallback}
        out["kv"].append(row)
        ok &= r.allocations_per_frame == 0 and e.backend_fallback is None
        print(row, flush=True)
    del e
    torch.cuda.empty_cache()

    ref = StreamEngine.from_pretrained("random:sd-turbo", device="cuda", dtype="float16", backend="graph")
    low = StreamEngine.from_pretrained("random:sd-turbo", device="cuda", dtype="float16", backend="graph",
                                       max_vram_gb=4.0)
    diffs = [int(np.abs(ref(f).astype(int) - low(f).astype(int)).max()) for f in frames[:10]]
    r_ref = run_bench(ref, frames=100, warmup=5, profile=False, flops=False)
    r_low = run_bench(low, frames=100, warmup=5, profile=False, flops=False)
    out["low_vram"] = {"plan": low.status()["low_vram"], "max_pixel_diff_vs_resident": max(diffs),
                       "resident_median_ms": r_ref.frame_ms["median"], "streamed_median_ms": r_low.frame_ms["median"],
                       "streamed_allocs_per_frame": r_low.allocations_per_frame, "fallback": low.backend_fallback,
                       "peak_reserved_gb_streamed": r_low.peak_vram_gb}
    with open(path, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print("\n=== engine features (random:sd-turbo 512x512 fp16, backend graph, NVIDIA H200) ===")
    print("kv cache   frames  median ms  p99 ms  device ms  allocs/frame  first frame ms")
    for r in out["kv"]:
        print(f"  {'on ' if r['enabled'] else 'off'}      {r['maxframes'] if r['enabled'] else '-':>3}   "
              f"{r['median_ms']:8.2f} {r['p99_ms']:7.2f} {r['device_ms']:9.2f} {r['allocs_per_frame']:12.1f} "
              f"{r['first_frame_ms']:14.1f}")
    lv = out["low_vram"]
    plan = lv["plan"] or {}
    print(f"low-VRAM 4 GiB: {plan.get('num_segments')} segments, {plan.get('mode')}; median "
          f"{lv['streamed_median_ms']:.2f} ms vs resident {lv['resident_median_ms']:.2f} ms; max pixel diff "
          f"{lv['max_pixel_diff_vs_resident']}; allocs/frame {lv['streamed_allocs_per_frame']:.1f}; "
          f"fallback {lv['fallback']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
