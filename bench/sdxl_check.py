#!/usr/bin/env python3
"""Issue-13 device check: SDXL-Turbo (random:sdxl-turbo, fp16, TAESDXL) on one GPU, in one process.

    X1  512x512, 1 step (t_index [32]), cfg none       target >= 80 fps, p99 <= 1.5x median
    X2  512x512, 2 steps [20, 35] in one stream batch   target >= 50 fps
    X3  X1 at 1024x1024                                 report
    parity: graph and compiled against eager fp16 over 50 frames (target: within 1 grey level)
    memory: allocations per steady frame (eager: the pipeline's own, outside the networks; graph/compiled: all)

Every bench row is `rtdiffusion.bench.run_bench` (the code behind `rtdiffusion bench`): 300 frames after 30
of warm-up, host uint8 in and out, per-stage table, FLOPs per frame and the FLOP floor.
    python bench/sdxl_check.py [--plan X1:compiled X1:graph X2:compiled ...] [--frames 300]
X1 rows also compare the backend with eager over --parity-frames frames (same components, same frames).
Prints each table as it goes and a summary last; writes $OUT/sdxl_check.json after every section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.gpu_check import compare, memory_check  # noqa: E402
from rtdiffusion import StreamEngine  # noqa: E402
from rtdiffusion.bench import environment, run_bench, synthetic_frames  # noqa: E402
from rtdiffusion.config import Backend, EngineConfig, PromptSpec, StreamSettings, apply_updates  # noqa: E402
from rtdiffusion.models.loading import load_components  # noqa: E402

SCENARIOS = {"X1": dict(size=512, t_index_list=[32]), "X2": dict(size=512, t_index_list=[20, 35]),
             "X3": dict(size=1024, t_index_list=[32])}


def engine_for(comps, model, backend, device, dtype, size, **updates) -> StreamEngine:
    config = EngineConfig(model, size, size, device, dtype, Backend(backend))
    # the prompt is part of the starting settings: no update is pending when memory_check wraps the networks
    settings = dataclasses.replace(StreamSettings(), prompt=PromptSpec.parse("a glass jellyfish", "linear", ""))
    return StreamEngine(config, comps, apply_updates(settings, 50, **updates))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:sdxl-turbo")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--plan", nargs="+", default=["X1:compiled", "X1:graph", "X2:compiled", "X3:graph", "X3:compiled",
                                                  "X2:graph"], help="scenario:backend rows, in order")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--parity-frames", type=int, default=50)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32

    out = os.path.join(os.environ.get("OUT", "."), "sdxl_check.json")
    report: dict = {"environment": environment(), "model": args.model, "parity": {}, "memory": {}, "bench": []}
    t0 = time.time()

    def save() -> None:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)

    comps = load_components(args.model, dev, dtype, seed=0)
    print(f"[{time.time() - t0:6.1f}s] {args.model} built", flush=True)
    eager = None
    for item in args.plan:
        name, backend = item.split(":")
        sc = SCENARIOS[name]
        size = sc["size"] if cuda else comps.default_size
        t1 = time.time()
        try:
            e = engine_for(comps, args.model, backend, dev, dtype, size, t_index_list=sc["t_index_list"])
            if name == "X1" and backend != "eager":  # parity with eager on the same components and frames
                frames = synthetic_frames(args.parity_frames, size, size)
                if eager is None:
                    eager = engine_for(comps, args.model, "eager", dev, dtype, size, t_index_list=sc["t_index_list"])
                    if cuda:
                        report["memory"]["eager"] = memory_check(eager, frames, 100, count_networks=True)
                # X1 is one step with cfg none: a frame's output depends on that frame alone, not on the history
                report["parity"][f"{backend}_vs_eager"] = {**compare(e, eager, frames), "fallback": e.backend_fallback}
                if cuda:
                    report["memory"][backend] = memory_check(e, frames, 100, count_networks=False)
                print(f"[{time.time() - t0:6.1f}s] parity {backend}: {report['parity'][f'{backend}_vs_eager']} "
                      f"memory {report['memory'].get(backend)}", flush=True)
            r = run_bench(e, frames=args.frames, warmup=30, prompt_change_every=10 if name == "X1" else None)
            rec = {**json.loads(r.to_json()), "scenario": name, "build_and_bench_s": round(time.time() - t1, 1)}
            print(f"--- {name} ({backend}) [{time.time() - t0:6.1f}s]\n{r.table()}\n", flush=True)
            del e
        except Exception as exc:  # the table says what failed; the other rows still run
            rec = {"scenario": name, "backend": backend, "error": f"{type(exc).__name__}: {exc}"}
            print(f"{name} {backend} FAILED: {exc}", flush=True)
        report["bench"].append(rec)
        save()
        if cuda:
            torch.cuda.empty_cache()
    print(f"=== summary ({args.model}, {time.time() - t0:.0f} s) ===")
    for k, v in report["parity"].items():
        print(f"parity {k:20s} " + (v.get("error") or f"px max {v['pixel_max_abs']} mean {v['pixel_mean_abs']:.3f} "
                                    f"latent rel {v['latent_rel_err_max']:.2e} finite {v['finite']} fallback {v['fallback']}"))
    for k, v in report["memory"].items():
        print(f"memory {k:10s} allocs/frame total {v['allocations_per_frame_total']:.2f}"
              + (f", pipeline-own {v['allocations_per_frame_pipeline_own']:.2f}" if "allocations_per_frame_pipeline_own" in v else ""))
    for r in report["bench"]:
        if "error" in r:
            print(f"{r['scenario']} {r['backend']} ERROR {r['error']}")
            continue
        f = r["frame_ms"]
        print(f"{r['scenario']} {r['settings']['backend']:9s} {r['settings']['width']}px S={len(r['settings']['t_index_list'])} "
              f"median {f['median']:.2f} ms ({r['fps']:.1f} fps) p99 {f['p99']:.2f} ({f['p99'] / f['median']:.2f}x) "
              f"device {r.get('device_ms') or 0:.2f} ms allocs/frame {r['allocations_per_frame']:.2f} "
              f"syncs/frame {r['host_syncs_per_frame']:.2f} GFLOP {r['flops_per_frame'] / 1e9:.0f} "
              f"floor {r.get('floor_ms') or 0:.2f} ms; {r['build_and_bench_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
