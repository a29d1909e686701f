#!/usr/bin/env python3
"""Device check for the core and engines issues (random:sd-turbo, 512x512, fp16 on one GPU).

1. parity: eager fp16 against eager fp32 (same weights, noise, frames); graph and compiled against eager fp16
2. memory: reserved memory over 500 frames; allocations per frame made by the pipeline's own code (total
   minus those inside the networks' forward passes) for eager, and in total for graph replay
3. speed: `rtdiffusion bench` records for each backend

Prints a short table last and writes $OUT/gpu_check.json.
    python bench/gpu_check.py [--backends eager graph compiled] [--frames 300]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rtdiffusion import StreamEngine  # noqa: E402
from rtdiffusion.bench import environment, run_bench, synthetic_frames  # noqa: E402
from rtdiffusion.config import Backend, EngineConfig, StreamSettings, apply_updates  # noqa: E402
from rtdiffusion.models.loading import load_components  # noqa: E402

log = logging.getLogger("gpu_check")
DEV = torch.device("cuda")


def engine_for(comps, backend: str, dtype, size=512, model="random:sd-turbo", **updates) -> StreamEngine:
    config = EngineConfig(model, size, size, DEV, dtype, Backend(backend))
    return StreamEngine(config, comps, apply_updates(StreamSettings(), 50, **updates))


def half_copy(comps):
    return dataclasses.replace(comps, unet=copy.deepcopy(comps.unet).half(), vae=copy.deepcopy(comps.vae).half(),
                               text_encoder=copy.deepcopy(comps.text_encoder).half())


def compare(a: StreamEngine, b: StreamEngine, frames: list[np.ndarray]) -> dict:
    px_max, px_mean, lat_rel = 0, [], []
    finite = True
    for f in frames:
        oa, ob = a(f), b(f)
        d = np.abs(oa.astype(np.int32) - ob.astype(np.int32))
        px_max, _ = max(px_max, int(d.max())), px_mean.append(float(d.mean()))
        la, lb = a._state.buffers.denoised.float(), b._state.buffers.denoised.float()
        finite &= bool(torch.isfinite(la).all()) and bool(torch.isfinite(lb).all())
        lat_rel.append(float((la - lb).norm() / lb.norm().clamp_min(1e-12)))
    return {"frames": len(frames), "pixel_max_abs": px_max, "pixel_mean_abs": float(np.mean(px_mean)),
            "latent_rel_err_max": max(lat_rel), "latent_rel_err_median": float(np.median(lat_rel)),
            "finite": finite}


class CountingNets:
    """Counts CUDA allocations inside the networks' forward passes."""

    def __init__(self, nets):
        self.nets, self.name, self.inside = nets, nets.name, 0

    def _count(self, fn, *args):
        a0 = torch.cuda.memory_stats()["allocation.all.allocated"]
        out = fn(*args)
        self.inside += torch.cuda.memory_stats()["allocation.all.allocated"] - a0
        return out

    def encode(self, x):
        return self._count(self.nets.encode, x)

    def unet(self, x, t, e, *added):  # added: SDXL's text_embeds, time_ids
        return self._count(self.nets.unet, x, t, e, *added)

    def decode(self, z):
        return self._count(self.nets.decode, z)


def memory_check(engine: StreamEngine, frames: list[np.ndarray], n: int, count_networks: bool) -> dict:
    counting = None
    if count_networks:
        counting = CountingNets(engine._executor.nets)
        engine._executor.nets = counting
    for i in range(20):
        engine(frames[i % len(frames)])
    torch.cuda.synchronize()
    reserved0 = torch.cuda.memory_reserved()
    a0 = torch.cuda.memory_stats()["allocation.all.allocated"]
    if counting:
        counting.inside = 0
    for i in range(n):
        engine(frames[i % len(frames)])
    torch.cuda.synchronize()
    total = torch.cuda.memory_stats()["allocation.all.allocated"] - a0
    out = {"frames": n, "reserved_before_mb": reserved0 / 2**20,
           "reserved_after_mb": torch.cuda.memory_reserved() / 2**20,
           "allocations_per_frame_total": total / n}
    if counting:
        out["allocations_per_frame_in_networks"] = counting.inside / n
        out["allocations_per_frame_pipeline_own"] = (total - counting.inside) / n
        engine._executor.nets = counting.nets
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["eager", "graph", "compiled"])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--parity-frames", type=int, default=100)
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--channels-last", action="store_true", help="UNet and VAE weights in channels_last")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out_dir = os.environ.get("OUT", ".")
    report: dict = {"environment": environment(), "parity": {}, "memory": {}, "bench": {}}

    def save() -> None:  # after every section: a run cut short still leaves its numbers
        with open(os.path.join(out_dir, f"gpu_check{args.tag}.json"), "w") as f:
            json.dump(report, f, indent=2)
    t0 = time.time()
    comps32 = load_components("random:sd-turbo", DEV, torch.float32, seed=0)
    comps16 = half_copy(comps32)
    if args.channels_last:
        comps16.unet.to(memory_format=torch.channels_last)
        comps16.vae.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    report["variant"] = {"channels_last": args.channels_last, "cudnn_benchmark": args.cudnn_benchmark}
    frames = synthetic_frames(64, 512, 512)
    upd = dict(t_index_list=[32])
    print(f"[{time.time() - t0:6.1f}s] models built", flush=True)

    if not args.skip_parity:
        e32 = engine_for(comps32, "eager", torch.float32, **upd)
        e16 = engine_for(comps16, "eager", torch.float16, **upd)
        report["parity"]["eager_fp16_vs_eager_fp32"] = compare(e16, e32, frames[:20])
        del e32
        torch.cuda.empty_cache()
        print(f"[{time.time() - t0:6.1f}s] fp16/fp32 parity {report['parity']['eager_fp16_vs_eager_fp32']}", flush=True)
        report["memory"]["eager"] = memory_check(e16, frames, 500, count_networks=True)
        print(f"[{time.time() - t0:6.1f}s] eager memory {report['memory']['eager']}", flush=True)
        for backend in [b for b in args.backends if b != "eager"]:
            try:
                eb = engine_for(comps16, backend, torch.float16, **upd)
                ref = engine_for(comps16, "eager", torch.float16, **upd)
                report["parity"][f"{backend}_vs_eager_fp16"] = compare(eb, ref, frames[: args.parity_frames])
                report["parity"][f"{backend}_vs_eager_fp16"]["fallback"] = eb.backend_fallback
                report["memory"][backend] = memory_check(eb, frames, 500, count_networks=False)
            except Exception as exc:  # report and go on: the table says what failed
                report["parity"][f"{backend}_vs_eager_fp16"] = {"error": f"{type(exc).__name__}: {exc}"}
            save()
            print(f"[{time.time() - t0:6.1f}s] {backend}: {report['parity'].get(f'{backend}_vs_eager_fp16')} "
                  f"{report['memory'].get(backend)}", flush=True)
            torch.cuda.empty_cache()

    for backend in args.backends:
        try:
            t1 = time.time()
            e = engine_for(comps16, backend, torch.float16, **upd)
            build_s = time.time() - t1
            r = run_bench(e, frames=args.frames, warmup=30, prompt_change_every=10)
            rec = json.loads(r.to_json())
            rec["build_s"] = build_s
            report["bench"][backend] = rec
            save()
            print(f"[{time.time() - t0:6.1f}s] {backend} bench\n{r.table()}", flush=True)
            del e
            torch.cuda.empty_cache()
        except Exception as exc:
            report["bench"][backend] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{backend} bench failed: {exc}", flush=True)

    save()
    print("\n=== summary (random:sd-turbo 512x512 fp16, 1 step, cfg none, TAESD) ===")
    for k, v in report["parity"].items():
        print(f"parity {k:28s} " + (v.get("error") or
              f"px max {v['pixel_max_abs']} mean {v['pixel_mean_abs']:.3f} latent rel {v['latent_rel_err_max']:.2e} finite {v['finite']}"))
    for k, v in report["memory"].items():
        print(f"memory {k:10s} reserved {v['reserved_before_mb']:.0f}->{v['reserved_after_mb']:.0f} MB, "
              f"allocs/frame total {v['allocations_per_frame_total']:.2f}"
              + (f", pipeline-own {v['allocations_per_frame_pipeline_own']:.2f}" if "allocations_per_frame_pipeline_own" in v else ""))
    for k, v in report["bench"].items():
        if "error" in v:
            print(f"bench {k:10s} ERROR {v['error']}")
            continue
        f = v["frame_ms"]
        print(f"bench {k:10s} median {f['median']:.2f} ms p99 {f['p99']:.2f} -> {v['fps']:.0f} fps; "
              f"allocs/frame {v['allocations_per_frame']:.2f}; syncs/frame {v['host_syncs_per_frame']:.2f}; "
              f"prompt-change worst {v['prompt_change']['worst_ms']:.2f} ms; build {v['build_s']:.0f}s; "
              f"stages {json.dumps({s: round(x, 2) for s, x in v['stages_ms'].items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
