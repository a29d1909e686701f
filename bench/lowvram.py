"""Benchmark: low-VRAM weight streaming (engines/weight_streaming.py), UNet call time under VRAM budgets.

Device run (the lead engineer's; random seeded fp16 weights, 512x512 = latent 64x64, batch 1)::

    PYTHONPATH=. python bench/lowvram.py --device cuda            # writes $OUT/lowvram.json

CPU smoke run (tiny UNet; checks that every code path runs, numbers mean nothing)::

    PYTHONPATH=. python bench/lowvram.py --device cpu --tiny --iters 3 --warmup 1

For each architecture (sd-turbo UNet = ``random:sd-turbo``'s, SDXL UNet) and each target segment count
(1 = the budget fits, fully resident; 3; 9) the script finds the smallest budget whose plan has that many
segments (``budget_for_segments`` with ``--reserve-gib`` kept for everything else) and times, per UNet call
(CUDA events, eager, back to back, after warm-up; median / p99 / mean over ``--iters``):

- ``resident``: the whole UNet on the device (the baseline);
- ``prefetch``: two device buffers, copy of segment k+1 on the copy stream while segment k computes;
- ``sync``: one buffer, copy then compute;
- ``graph``: the prefetch plan captured as one CUDA graph (3 segments only; checks multi-stream capture).

Also: the host->device ceiling (pinned 1 GiB copy), the copy-only time of one call's segments, and the
achieved bandwidth ``bytes_per_call / call time``. Every streamed run is checked against the resident
output for the same inputs (max abs difference; expected 0). The device budget is simulated: the plan
decides the buffers, the card itself has more memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engines.weight_streaming import (  # noqa: E402
    GiB,
    StreamMode,
    WeightStreamer,
    budget_for_segments,
    plan_streaming,
)

log = logging.getLogger("bench.lowvram")
CONFIGS = ROOT / "rtdiffusion" / "models" / "configs"
ARCHS = {"sd-turbo": "sd_turbo_unet", "sdxl": "sdxl_unet", "tiny": "tiny_unet_sd2style"}


@dataclass
class Row:
    arch: str
    target_segments: int
    segments: int
    budget_gib: float
    mode: str  # resident | prefetch | sync | graph
    median_ms: float
    p99_ms: float
    mean_ms: float
    bytes_per_call: int
    buffer_mib: float
    copy_only_ms: float | None  # all of one call's segments copied back to back, no compute
    achieved_gbps: float | None  # bytes_per_call / mean call time
    max_abs_diff: float | None  # vs resident output, same inputs
    note: str = ""


def sync(device: torch.device) -> None:
    """The benchmark's one host sync point (outside timed regions)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_unet(arch: str, device: torch.device, dtype: torch.dtype, seed: int):
    """UNet of ``arch`` with seeded random weights, built on meta and materialised in ``dtype`` on ``device``."""
    from diffusers import UNet2DConditionModel

    cfg = json.loads((CONFIGS / f"{ARCHS[arch]}.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    unet = unet.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():  # scaled so activations stay finite through 3 levels
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return unet, cfg


def make_inputs(cfg: dict, device: torch.device, dtype: torch.dtype, latent: int, batch: int, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    sample = torch.randn(batch, cfg.get("in_channels", 4), latent, latent, generator=g, device=device,
                         dtype=dtype)  # [B, 4, h, w]
    t = torch.full((batch,), 999.0, device=device)  # [B]
    embeds = torch.randn(batch, 77, cfg["cross_attention_dim"], generator=g, device=device,
                         dtype=dtype)  # [B, 77, D]
    kwargs = {"encoder_hidden_states": embeds}
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text [B, 1280] + time ids [B, 6]
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g, device=device, dtype=dtype),
            "time_ids": torch.tensor([[512, 512, 0, 0, 512, 512]] * batch, device=device, dtype=dtype),
        }
    return sample, t, kwargs


def time_calls(fn, device: torch.device, iters: int, warmup: int) -> list[float]:
    """Per-call milliseconds: CUDA events on the current stream (wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    ev[0].record()
    for i in range(iters):
        fn()
        ev[i + 1].record()
    sync(device)
    return [ev[i].elapsed_time(ev[i + 1]) for i in range(iters)]


def stats(ms: list[float]) -> tuple[float, float, float]:
    s = sorted(ms)
    return statistics.median(s), s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)], statistics.fmean(s)


def h2d_ceiling(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """GB/s of one pinned host -> device copy of ``nbytes`` (median of ``reps``)."""
    if device.type != "cuda":
        src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        ms = time_calls(lambda: dst.copy_(src), device, reps, 1)
    else:
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        ms = time_calls(lambda: dst.copy_(src, non_blocking=True), device, reps, 2)
    return nbytes / (statistics.median(ms) * 1e-3) / 1e9


def copy_only_ms(streamer: WeightStreamer, device: torch.device, reps: int = 5) -> float:
    def run():
        for k in range(len(streamer._dst)):
            streamer._dst[k].copy_(streamer._host[k], non_blocking=device.type == "cuda")

    return statistics.median(time_calls(run, device, reps, 1))


def bench_arch(arch: str, args, device: torch.device, dtype: torch.dtype) -> list[Row]:
    latent = 8 if arch == "tiny" else args.size // 8
    unet, cfg = build_unet(arch, device, dtype, args.seed)
    sample, t, kwargs = make_inputs(cfg, device, dtype, latent, args.batch, args.seed)
    reserve = int(args.reserve_gib * GiB)

    def call():
        return unet(sample, t, return_dict=False, **kwargs)[0]

    rows: list[Row] = []
    with torch.no_grad():
        ms = time_calls(call, device, args.iters, args.warmup)
        ref = call().float()
        sync(device)
        total = sum(p.numel() * p.element_size() for p in unet.parameters())
        med, p99, mean = stats(ms)
        resident_mean = mean
        rows.append(Row(arch, 1, 0, round((total + reserve) / GiB, 3), "resident", med, p99, mean, 0, 0.0,
                        None, None, 0.0))
        log.info("%s resident: %.2f ms", arch, med)

        for target in args.segments:
            if target == 1:
                continue
            budget = budget_for_segments(unet, target, reserve, dtype)
            plan = plan_streaming(unet, budget, reserve, dtype)
            modes = [StreamMode.PREFETCH, StreamMode.SYNC] + (["graph"] if target == 3 else [])
            for mode in modes:
                note = ""
                streamer = WeightStreamer.install(unet, plan, device,
                                                  mode=StreamMode.PREFETCH if mode == "graph" else mode)
                assert streamer is not None
                fn = call
                if mode == "graph":
                    if device.type != "cuda":
                        streamer.remove()
                        unet.to(device)
                        continue
                    try:
                        fn = capture(call, streamer, device)
                    except Exception as e:  # report and keep benchmarking the other rows
                        log.warning("graph capture failed: %r", e)
                        note = f"capture failed: {type(e).__name__}: {e}"[:300]
                        fn = None
                if fn is not None:
                    ms = time_calls(fn, device, args.iters, args.warmup)
                    out = fn().float()
                    sync(device)
                    diff = float((out - ref).abs().max())
                    med, p99, mean = stats(ms)
                else:
                    med = p99 = mean = float("nan")
                    diff = None
                copy_ms = copy_only_ms(streamer, device)
                if streamer.fallback_reason:
                    note = streamer.fallback_reason
                rows.append(Row(arch, target, len(plan.segments), round(budget / GiB, 3),
                                getattr(mode, "value", mode), med, p99, mean,
                                plan.bytes_per_call, round(plan.buffer_bytes / 2**20, 1), copy_ms,
                                plan.bytes_per_call / (mean * 1e-3) / 1e9 if fn is not None else None, diff, note))
                log.info("%s %d seg %s: %.2f ms (resident %.2f, copy-only %.2f), diff %s", arch, len(plan.segments),
                         rows[-1].mode, med, resident_mean, copy_ms, diff)
                streamer.remove()
                unet.to(device)  # back to resident for the next plan (install takes weights from anywhere)
                sync(device)
    del unet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def capture(call, streamer: WeightStreamer, device: torch.device):
    """Warm up on a side stream, join the copy stream, capture one call; returns a replay function."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
        streamer.join()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()

    def replay():
        graph.replay()
        return out

    return replay


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny UNet only (CPU smoke run)")
    ap.add_argument("--archs", default="sd-turbo,sdxl", help="comma list of: sd-turbo, sdxl")
    ap.add_argument("--segments", default="1,3,9", help="target segment counts (1 = fully resident)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reserve-gib", type=float, default=2.0, help="budget kept for VAE, text encoders, activations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/lowvram.json, else ./lowvram.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.segments = [int(x) for x in args.segments.split(",")]
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    archs = ["tiny"] if args.tiny else [a.strip() for a in args.archs.split(",")]
    for a in archs:
        if a not in ARCHS:
            ap.error(f"--archs: unknown {a!r}; expected some of {', '.join(k for k in ARCHS if k != 'tiny')}")
    if args.tiny:
        args.reserve_gib = 0.0

    t0 = time.perf_counter()
    ceiling = h2d_ceiling(device, GiB if device.type == "cuda" else 64 * 2**20)
    log.info("host->device ceiling: %.1f GB/s", ceiling)
    rows: list[Row] = []
    for a in archs:
        rows += bench_arch(a, args, device, dtype)
    result = {
        "command": " ".join(["python", "bench/lowvram.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "size": args.size, "batch": args.batch, "iters": args.iters, "reserve_gib": args.reserve_gib,
        "h2d_ceiling_gbps": ceiling,
        "seconds": time.perf_counter() - t0,
        "rows": [asdict(r) for r in rows],
    }
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "lowvram.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    size = "tiny 64x64" if args.tiny else f"{args.size}x{args.size}"
    print(f"\nh2d ceiling {ceiling:.1f} GB/s; {result['device']}; {size} batch {args.batch}; "
          f"{result['seconds']:.0f} s; json: {out}")
    print(f"{'arch':9} {'seg':>3} {'budget GiB':>10} {'mode':9} {'median ms':>9} {'p99 ms':>8} {'MiB/call':>9} "
          f"{'copy ms':>8} {'GB/s':>6} {'% ceil':>6} {'diff':>7}  note")
    for r in rows:
        gbps = f"{r.achieved_gbps:6.1f}" if r.achieved_gbps is not None else f"{'-':>6}"
        pct = f"{100 * r.achieved_gbps / ceiling:6.0f}" if r.achieved_gbps is not None else f"{'-':>6}"
        copy = f"{r.copy_only_ms:8.2f}" if r.copy_only_ms is not None else f"{'-':>8}"
        diff = f"{r.max_abs_diff:7.1e}" if r.max_abs_diff is not None else f"{'-':>7}"
        print(f"{r.arch:9} {r.segments:>3} {r.budget_gib:>10.3f} {r.mode:9} {r.median_ms:9.2f} {r.p99_ms:8.2f} "
              f"{r.bytes_per_call / 2**20:9.0f} {copy} {gbps} {pct} {diff}  {r.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
