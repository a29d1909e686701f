"""Benchmark: cost per frame of the temporal KV cache (engines/kv_cache.py), UNet + ring write.

Device run (the lead engineer's; sd-turbo UNet architecture with random weights, fp16, 512x512 = latent
64x64, batch 1, each configuration captured once as a CUDA graph of ``unet + cache.write_ring()``, then
replayed with ``cache.after_frame()`` between replays, exactly as the frame engine runs it)::

    PYTHONPATH=. python bench/kv_cache.py --device cuda            # writes $OUT/kv_cache.json

CPU smoke run (tiny UNet, eager, no graphs; checks that the script works, numbers mean nothing)::

    PYTHONPATH=. python bench/kv_cache.py --device cpu --tiny --iters 5 --warmup 1

Rows: ``plain`` (diffusers' own processors), ``off`` with ``Span.ACTIVE`` (the processor's plain path),
``off`` with ``Span.FULL`` (all bank slots masked: what masking-only on/off costs), and ``on`` with 1, 2
and 4 cached frames (``Span.ACTIVE``). Per row: median / p99 of CUDA-event time per frame over
``--iters`` frames after ``--warmup`` frames, and the CUDA caching allocator's allocation count over the
steady-state frames (must be 0). A graph-vs-eager check of each cached configuration runs first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from the repo root without PYTHONPATH
    sys.path.insert(0, str(ROOT))

from engines.kv_cache import Span, TemporalKVCache, install  # noqa: E402

log = logging.getLogger("bench.kv_cache")
CONFIGS = ROOT / "rtdiffusion" / "models" / "configs"


@dataclass
class Row:
    name: str
    span_policy: str
    enabled: bool
    maxframes: int
    span: int
    median_ms: float
    p99_ms: float
    mean_ms: float
    allocs_per_frame: float | None  # None: not measured (CPU)
    cache_mib: float
    parity_max_abs: float | None  # graph replay vs eager, same cache state; None where not run


def build_unet(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    cfg = json.loads((CONFIGS / ("tiny_unet_sd2style.json" if tiny else "sd_turbo_unet.json")).read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg).to(device=device, dtype=dtype).eval()
    unet.requires_grad_(False)
    return unet


class Frame:
    """Static inputs and one frame's body: UNet into a fixed output buffer, then the ring write."""

    def __init__(self, unet, batch: int, latent: int, embed_dim: int, device: torch.device, dtype: torch.dtype):
        g = torch.Generator(device="cpu").manual_seed(1)
        self.unet = unet
        self.sample = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)  # [B, 4, h, w]
        self.timestep = torch.full((batch,), 999.0, device=device)  # [B] float32
        self.embeds = torch.randn(batch, 77, embed_dim, generator=g).to(device, dtype)  # [B, 77, D]
        self.eps = torch.empty_like(self.sample)  # [B, 4, h, w]
        self.cache: TemporalKVCache | None = None

    def body(self) -> None:
        out = self.unet(self.sample, self.timestep, encoder_hidden_states=self.embeds, return_dict=False)[0]
        self.eps.copy_(out)
        if self.cache is not None:
            self.cache.write_ring()

    def after(self) -> None:
        if self.cache is not None:
            self.cache.after_frame()

    def perturb(self, n: int) -> None:
        """Change the input in place between frames so the bank holds different frames."""
        self.sample.mul_(0.9).add_(0.1 * ((n % 7) - 3))


def capture(frame: Frame) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            frame.body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        frame.body()
    torch.cuda.synchronize()
    return graph


def graph_vs_eager(frame: Frame, graph: torch.cuda.CUDAGraph, frames: int = 4) -> float:
    """Same cache state through graph replays and through eager calls: max abs difference of eps."""
    base = frame.sample.clone()
    outs = []
    for replay in (True, False):
        frame.sample.copy_(base)
        frame.cache.reset()
        for n in range(frames):
            graph.replay() if replay else frame.body()
            frame.after()
            frame.perturb(n)
        outs.append(frame.eps.clone())
    frame.sample.copy_(base)
    frame.cache.reset()
    torch.cuda.synchronize()
    return float((outs[0].float() - outs[1].float()).abs().max())


def time_cuda(frame: Frame, graph: torch.cuda.CUDAGraph, warmup: int, iters: int) -> tuple[list[float], float]:
    for _ in range(warmup):
        graph.replay()
        frame.after()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for i in range(iters):
        starts[i].record()
        graph.replay()
        frame.after()
        ends[i].record()
    torch.cuda.synchronize()
    allocs = torch.cuda.memory_stats()["allocation.all.allocated"] - before
    return [s.elapsed_time(e) for s, e in zip(starts, ends)], allocs / iters


def time_cpu(frame: Frame, warmup: int, iters: int) -> list[float]:
    with torch.no_grad():
        for _ in range(warmup):
            frame.body()
            frame.after()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            frame.body()
            frame.after()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny test UNet at latent 16x16 (CPU smoke run)")
    ap.add_argument("--batch", type=int, default=1, help="UNet batch rows (stream batch)")
    ap.add_argument("--max-frames", type=int, default=4, help="allocated bank slots")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/kv_cache.json when $OUT is set)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but torch sees no CUDA device; use --device cpu --tiny")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    latent = 16 if args.tiny else 64
    unet = build_unet(args.tiny, device, dtype)
    embed_dim = int(unet.config.cross_attention_dim)
    frame = Frame(unet, args.batch, latent, embed_dim, device, dtype)
    M = args.max_frames

    # (name, span policy or None for plain, enabled, maxframes)
    configs = [("plain", None, False, 1), ("off", Span.ACTIVE, False, 1), ("off (masked)", Span.FULL, False, 1)]
    configs += [(f"on {m}", Span.ACTIVE, True, m) for m in (1, 2, 4) if m <= M]
    original = dict(unet.attn_processors)
    rows: list[Row] = []
    with torch.inference_mode():
        for name, policy, enabled, m in configs:
            unet.set_attn_processor(dict(original))
            frame.cache = None
            cache_mib = 0.0
            if policy is not None:
                frame.cache = install(unet, args.batch, (latent, latent), M, dtype, device, span=policy)
                frame.cache.set_settings(enabled, m, 1)
                cache_mib = frame.cache.nbytes / 2**20
            parity = None
            if device.type == "cuda":
                graph = capture(frame)
                if frame.cache is not None:
                    frame.cache.reset()
                    if enabled:
                        parity = graph_vs_eager(frame, graph)
                times, allocs = time_cuda(frame, graph, args.warmup, args.iters)
                del graph
            else:
                times, allocs = time_cpu(frame, args.warmup, args.iters), None
            span = frame.cache.span if frame.cache is not None else 0
            rows.append(Row(name, policy.value if policy else "-", enabled, m, span, statistics.median(times),
                            p99(times), statistics.fmean(times), allocs, cache_mib, parity))
            log.info("%s", rows[-1])
            if frame.cache is not None:
                frame.cache.uninstall()
                frame.cache = None
            if device.type == "cuda":
                torch.cuda.empty_cache()

    result = {
        "bench": "kv_cache",
        "model": "tiny_unet_sd2style (random)" if args.tiny else "sd-turbo UNet architecture (random weights)",
        "latent": [latent, latent], "batch": args.batch, "max_frames": M, "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "backend": "cuda graph (unet + write_ring), after_frame between replays" if device.type == "cuda" else "eager",
        "torch": torch.__version__, "iters": args.iters, "warmup": args.warmup,
        "rows": [asdict(r) for r in rows],
    }
    out = args.out or (os.path.join(os.environ["OUT"], "kv_cache.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        log.info("wrote %s", out)

    base = rows[0].median_ms
    print(f"\nkv_cache: {result['model']}, latent {latent}x{latent}, batch {args.batch}, {result['dtype']}, "
          f"{result['device']}, {result['backend']}")
    print(f"{'config':<14} {'span':>4} {'median ms':>10} {'p99 ms':>8} {'vs plain':>9} {'allocs/frame':>12} "
          f"{'cache MiB':>9} {'graph=eager':>11}")
    for r in rows:
        allocs = "n/a" if r.allocs_per_frame is None else f"{r.allocs_per_frame:g}"
        parity = "-" if r.parity_max_abs is None else f"{r.parity_max_abs:.2g}"
        print(f"{r.name:<14} {r.span:>4} {r.median_ms:>10.3f} {r.p99_ms:>8.3f} {r.median_ms / base:>8.2f}x "
              f"{allocs:>12} {r.cache_mib:>9.1f} {parity:>11}")
    bad = [r.name for r in rows if r.allocs_per_frame not in (None, 0, 0.0)]
    if bad:
        log.error("allocations in steady-state frames: %s", ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
