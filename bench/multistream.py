#!/usr/bin/env python3
"""Many streams on one GPU (issue 17 part 2): aggregate frames/s and GPU memory for N = 1, 2, 4, 8 streams.

Written for the device; NOT RUN YET (no GPU was available when it was written): no figure from it exists.

For each N, one MultiStreamEngine (random:sd-turbo by default, 512x512 fp16, one step, no guidance, the
issue's S1 setting) serves N streams, each its own prompt and seed, host uint8 frames in and out. Each tick
is one step_all (one UNet call over the N streams' rows, one host sync for the readback); the tick time is
wall clock on the host, the same measure as `rtdiffusion bench`. Per N it prints and appends to JSON:

    tick ms median / p99, aggregate fps (N frames per tick), per-stream fps, p99 / median,
    CUDA allocations per steady tick (0 expected: the outputs are copied into host memory),
    GPU memory after building (weights + buffers) and peak while ticking, vs N = 1,
    and for reference a single StreamEngine with the same settings, timed in the same process.

Targets (issue 17): 4 S1 streams >= 300 fps together, each >= 75 fps, p99 <= 1.5x median.

    python bench/multistream.py                          # compiled backend, N = 1 2 4 8 (a compile per N)
    python bench/multistream.py --backend graph --streams 1 4 --ticks 300
    python bench/multistream.py --model random:tiny --size 64 --device cpu --backend eager --ticks 3 --warmup 1
                                                         # a smoke run of the script itself, on the CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rtdiffusion import MultiStreamEngine, StreamEngine  # noqa: E402
from rtdiffusion.bench import synthetic_frames  # noqa: E402

PROMPTS = ["neon jellyfish, ink", "a glass city at dusk", "oil painting of a fox", "paper cut forest",
           "chrome statue", "watercolor harbour", "pixel art desert", "charcoal portrait"]


CUDA = torch.cuda.is_available()


def allocations() -> int:
    return torch.cuda.memory_stats().get("allocation.all.allocated", 0) if CUDA else 0


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def gib(n: int) -> float | None:
    return n / 2**30 if CUDA else None


def time_ticks(run, ticks: int, warmup: int) -> tuple[list[float], float]:
    """(tick times in ms, CUDA allocations per steady tick)."""
    for _ in range(warmup):
        run()
    sync()
    a0, times = allocations(), []
    for _ in range(ticks):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, (allocations() - a0) / ticks


def summary(times: list[float]) -> dict:
    t = np.asarray(times)
    med, p99 = float(np.median(t)), float(np.percentile(t, 99))
    return {"median_ms": med, "p99_ms": p99, "p99_over_median": p99 / med}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:sd-turbo")
    p.add_argument("--backend", default="compiled")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--ticks", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "multistream.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda" and not CUDA:
        print("bench/multistream.py: no CUDA device (--device cpu runs the script as a smoke test)", file=sys.stderr)
        return 2
    rows = []
    frames = synthetic_frames(64, args.size, args.size)
    dtype = "float16" if args.device == "cuda" else "float32"
    kw = dict(width=args.size, height=args.size, device=args.device, dtype=dtype, backend=args.backend,
              t_index_list=[32], cfg="none")

    single = StreamEngine.from_pretrained(args.model, prompt=PROMPTS[0], **kw)
    k = iter(range(10**9))
    times, allocs = time_ticks(lambda: single(frames[next(k) % 64]), args.ticks, args.warmup)
    ref = {"kind": "single StreamEngine", **summary(times), "allocs_per_frame": allocs,
           "backend": single.status()["backend"], "fallback": single.backend_fallback}
    ref["fps"] = 1e3 / ref["median_ms"]
    print(ref, flush=True)
    single = None  # free it before the groups
    if CUDA:
        torch.cuda.empty_cache()

    base_mem = None
    for n in args.streams:
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        t_build = time.perf_counter()
        group = MultiStreamEngine.from_pretrained(
            args.model, streams=[{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(n)], **kw)
        group.step_all([frames[i] for i in range(n)])  # captures (and compiles) on the first visit
        build_s = time.perf_counter() - t_build
        sync()
        mem_built = gib(torch.cuda.memory_allocated()) if CUDA else None
        k = iter(range(10**9))

        def tick() -> None:
            t = next(k)
            group.step_all([frames[(t + 7 * i) % 64] for i in range(n)])

        times, allocs = time_ticks(tick, args.ticks, args.warmup)
        s = summary(times)
        st = group.status()
        row = {"kind": "MultiStreamEngine", "streams": n, **s, "aggregate_fps": n * 1e3 / s["median_ms"],
               "per_stream_fps": 1e3 / s["median_ms"], "allocs_per_tick": allocs, "unet_rows": st["unet_rows"],
               "gpu_mem_built_gib": mem_built,
               "gpu_mem_peak_gib": gib(torch.cuda.max_memory_allocated()) if CUDA else None,
               "build_and_first_tick_s": build_s, "backend": st["backend"], "fallback": st["backend_fallback"],
               "captures": st["captures"]}
        base_mem = base_mem or mem_built
        row["gpu_mem_vs_one_stream"] = mem_built / base_mem if CUDA and args.streams[0] == 1 else None
        rows.append(row)
        print(row, flush=True)
        group = None
        if CUDA:
            torch.cuda.empty_cache()

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "gpu": torch.cuda.get_device_name() if CUDA else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "model": args.model, "size": args.size,
            "backend": args.backend, "ticks": args.ticks, "command": " ".join(sys.argv)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps({"meta": meta, "single": ref, "groups": rows}, default=str) + "\n")
    print(f"\n=== multi-stream ({args.model} {args.size}x{args.size} {dtype}, 1 step, backend {args.backend}, "
          f"{meta['gpu']}) ===")
    print(f"single StreamEngine: {ref['median_ms']:.2f} ms, {ref['fps']:.0f} fps, p99/median "
          f"{ref['p99_over_median']:.2f}")
    print("  N  tick ms  p99 ms  p99/med  aggregate fps  per-stream fps  allocs/tick  mem GiB (built, peak)")
    for r in rows:
        print(f"{r['streams']:3d} {r['median_ms']:8.2f} {r['p99_ms']:7.2f} {r['p99_over_median']:8.2f} "
              f"{r['aggregate_fps']:14.0f} {r['per_stream_fps']:15.0f} {r['allocs_per_tick']:12.1f}  "
              f"{r['gpu_mem_built_gib'] or 0:.2f}, {r['gpu_mem_peak_gib'] or 0:.2f}")
    four = [r for r in rows if r["streams"] == 4 and CUDA]
    if four:
        r = four[0]
        ok = r["aggregate_fps"] >= 300 and r["per_stream_fps"] >= 75 and r["p99_over_median"] <= 1.5
        print(f"issue 17 target (4 streams >= 300 fps, each >= 75, p99 <= 1.5x median): "
              f"{'MET' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
