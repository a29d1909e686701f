#!/usr/bin/env python3
"""The issue-7 scenarios on one GPU, through the same code as `rtdiffusion bench`.

    S1  random:sd-turbo 512x512, 1 step (t_index [32]), cfg none, TAESD     target >= 200 fps, p99 <= 1.5x median
    S2  random:sd15 512x512, LCM 4 steps [0,16,32,45] in one batch, cfg self  target >= 80 fps
    S3  S1 at 1024x1024                                                       report
    S4  S1 with a new prompt every 10 frames                                  worst frame <= 2x median

    python bench/scenarios.py [--only S1 S2] [--backends compiled graph] [--frames 300]
Prints each record's table and a summary last; writes $OUT/scenarios.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rtdiffusion import StreamEngine  # noqa: E402
from rtdiffusion.bench import run_bench  # noqa: E402

SCENARIOS = {
    "S1": dict(model="random:sd-turbo", width=512, height=512, t_index_list=[32], cfg="none"),
    "S2": dict(model="random:sd15", width=512, height=512, t_index_list=[0, 16, 32, 45], cfg="self",
               guidance_scale=1.2),
    "S3": dict(model="random:sd-turbo", width=1024, height=1024, t_index_list=[32], cfg="none"),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", default=list(SCENARIOS))
    ap.add_argument("--backends", nargs="+", default=["compiled"])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--presets", nargs="+", default=["default"], help="compile presets to compare (compiled)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = os.path.join(os.environ.get("OUT", "."), "scenarios.json")
    records = []
    for name in args.only:
        spec = dict(SCENARIOS[name])
        model = spec.pop("model")
        runs = [(b, p) for b in args.backends for p in (args.presets if b == "compiled" else ["default"])]
        for backend, preset in runs:
            t0 = time.time()
            try:
                engine = StreamEngine.from_pretrained(model, device="cuda", dtype="float16", backend=backend,
                                                      compile_preset=preset, **spec)
                build_s = time.time() - t0
                r = run_bench(engine, frames=args.frames, warmup=30,
                              prompt_change_every=10 if name == "S1" else None, kernels=name in ("S1", "S2"))
            except Exception as exc:  # one failed scenario must not hide the others
                records.append({"scenario": name, "backend": backend, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{name} {backend} FAILED: {exc}", flush=True)
                continue
            rec = json.loads(r.to_json())
            rec.update(scenario=name, build_s=round(build_s, 1), preset=preset)
            records.append(rec)
            print(f"--- {name} ({backend}), engine built in {build_s:.0f} s\n{r.table()}\n", flush=True)
            with open(out, "w") as f:
                json.dump(records, f, indent=2)
            del engine
            torch.cuda.empty_cache()
    print("=== summary ===")
    for r in records:
        if "error" in r:
            print(f"{r['scenario']} {r['backend']:9s} ERROR {r['error']}")
            continue
        f = r["frame_ms"]
        line = (f"{r['scenario']} {r['settings']['backend']:9s} {r.get('preset', ''):7s} median {f['median']:.2f} ms ({r['fps']:.0f} fps) "
                f"p99 {f['p99']:.2f} ({f['p99'] / f['median']:.2f}x) device-only {r['device_ms']:.2f} ms "
                f"allocs/frame {r['allocations_per_frame']:.1f} syncs/frame {r['host_syncs_per_frame']:.2f} "
                f"floor {r['floor_ms']:.2f} ms ({f['median'] / r['floor_ms']:.1f}x)")
        if r.get("prompt_change"):
            p = r["prompt_change"]
            line += f"; S4 worst {p['worst_ms']:.2f} ms ({p['worst_ms'] / p['median_ms']:.2f}x)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
