#!/usr/bin/env python3
"""Issue 17, part 1: our engine against StreamDiffusion's plain loop compiled, side by side in one process.

    python bench/baseline.py [--only S1 S2] [--variants plain overlap] [--preset default] [--frames 300]

For each scenario (bench/scenarios.py's S1, S2):
  ours      the engine, backend compiled (torch.compile), host uint8 frames in and out (run_bench)
  variants  plain (main_step) and/or overlap (vae_overlap: TAESD on a parallel branch, 2 calls more latency)
  parity    each variant against the eager engine on the same weights and frames (max grey-level difference;
            overlap compared 2 calls later); fresh streams for both
  baseline  rtdiffusion/baseline.py: StreamDiffusion's loop with torch.compile(mode="reduce-overhead") on the
            UNet and both TAESD halves, input already on the GPU, output copied to the host
  lever b   the upper bound of precomputing per-slot time embeddings and per-prompt cross-attention K/V: the
            time of exactly that work (time embedding, every resnet's time projection, every to_k / to_v of
            the prompt) replayed alone as a CUDA graph at the scenario's batch
Writes $OUT/baseline.json after every record; prints a short table last. --device cpu --only tiny runs the
same code eagerly on the tiny model (a smoke test of this script; no compile).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rtdiffusion import StreamEngine  # noqa: E402
from rtdiffusion.baseline import build_baseline, time_baseline  # noqa: E402
from rtdiffusion.bench import _stats, environment, run_bench, synthetic_frames  # noqa: E402
from rtdiffusion.config import Backend, EngineConfig, StreamSettings, VaeKind, apply_updates  # noqa: E402
from rtdiffusion.models.loading import load_components  # noqa: E402

SCENARIOS = {
    "S1": dict(model="random:sd-turbo", t_index_list=[32], cfg="none"),
    "S2": dict(model="random:sd15", t_index_list=[0, 16, 32, 45], cfg="self", guidance_scale=1.2),
    "tiny": dict(model="random:tiny", t_index_list=[10, 30], cfg="self", guidance_scale=1.2),
}


def parity(engine, eager, frames, delay: int) -> int:
    """Max grey-level difference of ``engine`` from ``eager`` on fresh streams (``delay``: extra calls)."""
    for e in (engine, eager):
        with e._frame_lock:
            e._state.buffers.reset_stream()
    ours = [np.asarray(engine(f)).copy() for f in frames]
    ref = [np.asarray(eager(f)).copy() for f in frames]
    S = len(engine.settings.t_index_list)
    return max(int(np.abs(ours[n + delay].astype(int) - ref[n].astype(int)).max())
               for n in range(S - 1, len(frames) - delay))


def precompute_bound(engine, reps: int = 200) -> dict:
    """ms per frame of the work lever (b) would remove, replayed alone as one CUDA graph."""
    unet, b = engine.components.unet, engine._state.buffers
    resnets = [m for m in unet.modules() if hasattr(m, "time_emb_proj") and m.time_emb_proj is not None]
    cross = [m for n, m in unet.named_modules() if n.endswith("attn2")]

    def work():
        t_emb = unet.time_proj(b.t_unet).to(b.embeds.dtype)  # [B, 320]
        emb = unet.time_embedding(t_emb)  # [B, 1280]
        act = torch.nn.functional.silu(emb)
        outs = [r.time_emb_proj(act) for r in resnets]
        outs += [a.to_k(b.embeds) for a in cross] + [a.to_v(b.embeds) for a in cross]
        return outs

    if engine.device.type != "cuda":
        return {"resnets": len(resnets), "cross_attentions": len(cross), "ms": None}
    from engines.graph import CapturedStep

    with torch.no_grad():
        step = CapturedStep(work, engine.device, name="precompute bound")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            step.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    step.release()
    return {"resnets": len(resnets), "cross_attentions": len(cross), "ms": statistics.median(times)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="+", default=["S1", "S2"], choices=list(SCENARIOS))
    ap.add_argument("--variants", nargs="+", default=["plain", "overlap"], choices=["plain", "overlap"])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--parity-frames", type=int, default=40)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--tag", default="", help="output file $OUT/baseline<_tag>.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    backend = "compiled" if cuda else "eager"
    out = os.path.join(os.environ.get("OUT", "."), f"baseline{'_' + args.tag if args.tag else ''}.json")
    records: list[dict] = []

    def save(rec: dict) -> None:
        records.append(rec)
        with open(out, "w") as f:
            json.dump({"environment": environment(), "records": records}, f, indent=1)

    for name in args.only:
        spec = dict(SCENARIOS[name])
        model = spec.pop("model")
        size = 64 if name == "tiny" else 512
        comps = load_components(model, torch.device(args.device), dtype, VaeKind.TINY, seed=0)
        src = synthetic_frames(args.parity_frames, size, size, seed=1)
        def engine_on(comps_, backend_, overlap):
            cfg = EngineConfig(model, size, size, torch.device(args.device), dtype, backend=Backend(backend_),
                               compile_preset=args.preset, vae_overlap=overlap)
            return StreamEngine(cfg, comps_, apply_updates(StreamSettings(), 50, **spec))

        eager = engine_on(comps, "eager", False)
        for variant in args.variants:
            t0 = time.time()
            try:
                engine = engine_on(comps, backend, variant == "overlap")
                build_s = time.time() - t0
                r = run_bench(engine, frames=args.frames, warmup=args.warmup, profile=False, flops=False)
                diff = parity(engine, eager, src, 2 if variant == "overlap" else 0)
                rec = json.loads(r.to_json())
                rec.update(scenario=name, variant=variant, preset=args.preset, build_s=round(build_s, 1),
                           max_diff_vs_eager=diff)
                if variant == args.variants[0]:
                    rec["precompute_bound"] = precompute_bound(engine)
                save(rec)
                print(f"{name} {variant}: {r.frame_ms['median']:.3f} ms p99 {r.frame_ms['p99']:.3f} device "
                      f"{r.device_ms or 0:.3f} allocs {r.allocations_per_frame:.2f} syncs "
                      f"{r.host_syncs_per_frame:.2f} diff {diff} (built {build_s:.0f} s)", flush=True)
                del engine
            except Exception as exc:  # one failure must not hide the other records
                save({"scenario": name, "variant": variant, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{name} {variant} FAILED: {type(exc).__name__}: {exc}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
        if not args.no_baseline:
            try:
                base_comps = load_components(model, torch.device(args.device), dtype, VaeKind.TINY, seed=0)
                stream = build_baseline(eager, base_comps)
                t0 = time.time()
                if cuda:
                    stream.compile()
                stream(torch.from_numpy(src[0]).to(args.device))
                first_s = time.time() - t0
                stats = _stats(time_baseline(stream, synthetic_frames(64, size, size), args.frames, args.warmup))
                for e in (eager,):
                    with e._frame_lock:
                        e._state.buffers.reset_stream()
                stream2 = build_baseline(eager, base_comps)  # fresh stream state, same compiled modules
                stream2._unet, stream2._encoder, stream2._decoder = stream._unet, stream._encoder, stream._decoder
                stream2.compiled = stream.compiled
                bdiff = max(int(np.abs(stream2(torch.from_numpy(f).to(args.device)).astype(int)
                                       - np.asarray(eager(f)).astype(int)).max()) for f in src)
                save({"scenario": name, "variant": "baseline", "frame_ms": stats, "fps": 1e3 / stats["median"],
                      "first_call_s": round(first_s, 1), "max_diff_vs_eager": bdiff,
                      "compiled": stream.compiled})
                print(f"{name} baseline: {stats['median']:.3f} ms p99 {stats['p99']:.3f} diff {bdiff} "
                      f"(compile {first_s:.0f} s)", flush=True)
                del stream, stream2, base_comps
            except Exception as exc:
                save({"scenario": name, "variant": "baseline", "error": f"{type(exc).__name__}: {exc}"})
                print(f"{name} baseline FAILED: {type(exc).__name__}: {exc}", flush=True)
        del eager, comps
        if cuda:
            torch.cuda.empty_cache()

    print("=== issue 17 part 1: ms per frame (median, host frames), fps, p99/median, vs baseline ===")
    base = {r["scenario"]: r for r in records if r.get("variant") == "baseline" and "error" not in r}
    for r in records:
        if "error" in r:
            print(f"{r['scenario']:4s} {r['variant']:8s} ERROR {r['error'][:150]}")
            continue
        f = r["frame_ms"]
        b = base.get(r["scenario"])
        ratio = f"{b['frame_ms']['median'] / f['median']:.2f}x" if b and r["variant"] != "baseline" else "-"
        extra = (f" device {r['device_ms']:.2f} allocs {r['allocations_per_frame']:.1f} syncs "
                 f"{r['host_syncs_per_frame']:.2f} latency {r['latency_ms']:.1f} ms" if "device_ms" in r and
                 r["device_ms"] else "")
        fb = (r.get("settings") or {}).get("backend_fallback")
        extra += f" FALLBACK {fb[:80]}" if fb else ""
        pb = r.get("precompute_bound")
        extra += f" | lever b bound {pb['ms']:.3f} ms" if pb and pb.get("ms") else ""
        print(f"{r['scenario']:4s} {r['variant']:8s} {f['median']:7.3f} ms {1e3 / f['median']:6.1f} fps "
              f"p99/med {f['p99'] / f['median']:.2f} diff {r.get('max_diff_vs_eager')} vs baseline {ratio}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
