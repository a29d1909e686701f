#!/usr/bin/env python3
"""Device check for issue 8: the graph cache and the zero-copy frame handoff (random:sd-turbo 512x512 fp16).

a. switching: t_index_list alternates [32] / [16, 32] every 50 frames for 400 host frames (engine(frame)).
   With the cache no capture happens after each shape's first visit, and a switch back costs about a
   normal frame; with a cache of one entry (what RTDIFFUSION_GRAPH_CACHE=off gives) every switch recaptures.
b. zero-copy: fresh engines with the same seed fed the same frames by each path must give bit-identical
   outputs (torch.equal): host numpy in/out (the reference), CUDA tensor in -> clone out (copying), frames
   written into engine.input_buffer + step() with the output consumed on another stream through the
   ready / consumer_done events, a registered external input tensor (register_input), and step() read with
   .cpu(). Then the per-frame time of each path, interleaved rounds, and the time zero-copy saves.
c. a short table last, JSON in $OUT/graph_cache.json; exit status 1 when a check fails (a capture after
   the first visits, a graph backend that fell back, outputs that differ).

    python bench/graph_cache.py                                              # one GPU, about 1-2 minutes
    python bench/graph_cache.py --device cpu --model random:tiny --size 64   # reduced: eager, logic only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rtdiffusion import StreamEngine  # noqa: E402
from rtdiffusion.bench import environment, synthetic_frames  # noqa: E402
from rtdiffusion.config import Backend, EngineConfig, StreamSettings, apply_updates, parse_dtype  # noqa: E402
from rtdiffusion.engine import GRAPH_CACHE_ENV  # noqa: E402
from rtdiffusion.models.loading import load_components  # noqa: E402

log = logging.getLogger("graph_cache")
SHAPES = ([32], [16, 32])  # the two step counts the switching section alternates between


# ---------------------------------------------------------------------------------------------- setup
def engine_for(comps, args, t_index: list[int], graph_cache_size: int = 4) -> StreamEngine:
    config = EngineConfig(args.model, args.size, args.size, args.dev, args.dtype, args.backend)
    return StreamEngine(config, comps, apply_updates(StreamSettings(), 50, t_index_list=t_index),
                        graph_cache_size=graph_cache_size)


def sync(args) -> None:
    if args.cuda:
        torch.cuda.synchronize(args.dev)


def captures(engine: StreamEngine) -> int:
    return engine.status()["graph_cache"]["captures"]


@contextlib.contextmanager
def no_env(name: str):
    """Build engines without the caller's RTDIFFUSION_GRAPH_CACHE (it would override graph_cache_size)."""
    saved = os.environ.pop(name, None)
    try:
        yield saved
    finally:
        if saved is not None:
            os.environ[name] = saved


def frame_ms_stats(ms: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ms), "max": max(ms), "mean": statistics.fmean(ms), "n": len(ms)}


# ---------------------------------------------------------------------------------------------- a. switching
def switching(comps, args, frames: list[np.ndarray], graph_cache_size: int) -> dict[str, Any]:
    """Alternate SHAPES every args.every frames; wall time per engine(frame), captures after each frame."""
    e = engine_for(comps, args, SHAPES[0], graph_cache_size)
    every, n = args.every, args.frames
    times, caps = [], []
    for i in range(n):
        if i and i % every == 0:
            e.update(t_index_list=SHAPES[(i // every) % 2])
        t0 = time.perf_counter()
        e(frames[i % len(frames)])
        times.append((time.perf_counter() - t0) * 1e3)
        caps.append(captures(e))
    switches = list(range(every, n, every))
    later_switches = [i for i in switches if i >= 2 * every]  # both shapes visited before these
    steady = [times[i] for i in range(2, n) if i % every]  # not a switch frame, not the first frames
    g = e.status()["graph_cache"]
    out = {
        "graph_cache_size": graph_cache_size, "capacity": g["capacity"], "backend": e.backend,
        "backend_fallback": e.backend_fallback, "frames": n, "every": every,
        "cache_keys_at_end": g["keys"], "cache_size_at_end": g["size"],
        "captures_after_first_visits": caps[every] if n > every else caps[-1],
        "captures_at_end": caps[-1],
        "first_visit_ms": times[every] if n > every else None,  # the second shape's first frame (capture)
        "steady_ms": frame_ms_stats(steady),
        "switch_ms_after_first_visits": [round(times[i], 3) for i in later_switches],
        "worst_switch_ms_after_first_visits": max((times[i] for i in later_switches), default=None),
        "worst_frame_ms_after_first_visits": max(times[2 * every:], default=None),
        "frame_ms": [round(t, 3) for t in times],
        "captures_per_frame": caps,
    }
    w = out["worst_switch_ms_after_first_visits"]
    out["worst_switch_over_median"] = w / out["steady_ms"]["median"] if w else None
    del e
    return out


# ---------------------------------------------------------------------------------------------- b. zero-copy
class Consumer:
    """Reads the engine's output tensor on its own stream: waits on ``ready``, then records ``done``.

    On the CPU there are no streams or events: it reads in place (the same logic path, synchronous)."""

    def __init__(self, args):
        self.cuda = args.cuda
        self.stream = torch.cuda.Stream(args.dev) if self.cuda else None
        self.done = torch.cuda.Event() if self.cuda else None
        self.armed = False  # done recorded at least once

    def consume(self, result, fn: Callable[[torch.Tensor], Any]) -> Any:
        if not self.cuda:
            return fn(result.output)
        self.stream.wait_event(result.ready)
        with torch.cuda.stream(self.stream):
            value = fn(result.output)
            self.done.record(self.stream)
        self.armed = True
        return value

    @property
    def consumer_done(self):
        return self.done if self.armed else None


def run_path(path: str, e: StreamEngine, args, host: list[np.ndarray], dev: list[torch.Tensor], n: int,
             collect: bool, state: dict, fix_race: bool = False) -> list[torch.Tensor]:
    """Feed n frames through ``path``; with collect, return every output (copied where the path allows).

    state holds per-engine objects kept across calls (the caller's own frame tensor, the consumer).
    fix_race: before step(), make the engine's stream wait for the caller's current stream (diagnostic).
    """
    outs: list[torch.Tensor] = []
    sink = state.setdefault("sink", torch.zeros(3, dtype=torch.uint8, device=args.dev))
    if path == "numpy":  # reference: host frame in, host frame out (pinned staging, one host sync)
        for i in range(n):
            o = e(host[i % len(host)])  # already a host copy: nothing more to read
            if collect:
                outs.append(torch.from_numpy(o))
    elif path == "copy_cuda":  # the caller's device frame is copied in, the output cloned out
        mine = state.setdefault("mine", torch.empty_like(e.input_buffer))
        for i in range(n):
            mine.copy_(dev[i % len(dev)])  # the producer writes its own tensor
            o = e(mine)  # a clone on the caller's stream
            if collect:
                outs.append(o)
            else:
                sink.copy_(o[0, 0])
    elif path in ("zc_input_buffer", "zc_registered"):  # write in place, consume on another stream
        if path == "zc_registered" and "ext" not in state:
            state["ext"] = torch.zeros_like(e.input_buffer)
            e.register_input(state["ext"])
        target = state["ext"] if path == "zc_registered" else e.input_buffer
        consumer = state.setdefault("consumer", Consumer(args))
        for i in range(n):
            target.copy_(dev[i % len(dev)])  # the producer writes the engine's input, on the current stream
            if fix_race and args.cuda:
                e.stream.wait_stream(torch.cuda.current_stream(args.dev))
            r = e.step(consumer_done=consumer.consumer_done)
            if collect:
                outs.append(consumer.consume(r, lambda t: t.clone()))
            else:
                consumer.consume(r, lambda t: sink.copy_(t[0, 0]))
    elif path == "step_cpu":  # step() read with .cpu() on the caller's stream, no events used
        for i in range(n):
            e.input_buffer.copy_(dev[i % len(dev)])
            if fix_race and args.cuda:
                e.stream.wait_stream(torch.cuda.current_stream(args.dev))
            r = e.step()
            if collect:
                o = r.output.cpu()  # a host copy on a GPU; on the CPU .cpu() is the output itself
                outs.append(o.clone() if o.data_ptr() == r.output.data_ptr() else o)
            else:
                sink.copy_(r.output[0, 0])
    else:
        raise ValueError(f"unknown path {path!r}")
    return outs


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, Any]:
    equal = [torch.equal(a, b.cpu()) for a, b in zip(ref, got)]
    diffs = [int((a.int() - b.cpu().int()).abs().max()) for a, b in zip(ref, got)]
    bad = [i for i, ok in enumerate(equal) if not ok]
    return {"identical": len(ref) == len(got) and not bad, "frames": len(got), "frames_differing": len(bad),
            "first_differing_frame": bad[0] if bad else None, "max_abs_diff": max(diffs, default=0)}


ZC_PATHS = ("copy_cuda", "zc_input_buffer", "zc_registered", "step_cpu")
TIMED_PATHS = ("numpy", "copy_cuda", "zc_input_buffer", "zc_registered")


def zero_copy(comps, args, host: list[np.ndarray], dev: list[torch.Tensor]) -> tuple[dict, dict]:
    """Parity of every path against host numpy on fresh engines, then interleaved per-frame timing."""
    t_index = args.zc_t_index
    n = args.parity_frames
    engines: dict[str, StreamEngine] = {}
    states: dict[str, dict] = {}
    ref_engine = engine_for(comps, args, t_index)
    ref = run_path("numpy", ref_engine, args, host, dev, n, True, {})
    engines["numpy"], states["numpy"] = ref_engine, {}
    parity: dict[str, Any] = {"t_index_list": t_index, "frames": n, "reference": "numpy (host in, host out)"}
    for path in ZC_PATHS:
        e = engine_for(comps, args, t_index)
        st: dict = {}
        got = run_path(path, e, args, host, dev, n, True, st)
        sync(args)
        parity[path] = compare(ref, got)
        parity[path]["captures"] = captures(e)
        if not parity[path]["identical"] and path in ("zc_input_buffer", "zc_registered", "step_cpu") and args.cuda:
            # diagnostic: does ordering the caller's input write before the step make it identical?
            e2 = engine_for(comps, args, t_index)
            got2 = run_path(path, e2, args, host, dev, n, True, {}, fix_race=True)
            sync(args)
            parity[path]["with_engine_stream_waiting_on_caller_stream"] = compare(ref, got2)
            del e2
        if path in TIMED_PATHS:
            engines[path], states[path] = e, st
        else:
            del e
        print(f"[zero-copy] {path:16s} {parity[path]}", flush=True)

    # timing: rounds interleave the paths so drift (clocks, other tenants) hits them all alike
    per: dict[str, list[float]] = {p: [] for p in TIMED_PATHS}
    for p in TIMED_PATHS:  # warm-up
        run_path(p, engines[p], args, host, dev, 3, False, states[p])
    for _ in range(args.rounds):
        for p in TIMED_PATHS:
            sync(args)
            t0 = time.perf_counter()
            run_path(p, engines[p], args, host, dev, args.timed_frames, False, states[p])
            sync(args)  # the round ends when the GPU is done: total / frames is the per-frame cost
            per[p].append((time.perf_counter() - t0) * 1e3 / args.timed_frames)
    timing = {p: {"median_ms": statistics.median(v), "rounds_ms": [round(x, 4) for x in v]} for p, v in per.items()}
    base = timing["copy_cuda"]["median_ms"]
    for p in ("zc_input_buffer", "zc_registered"):
        timing[p]["saved_vs_copy_cuda_ms"] = base - timing[p]["median_ms"]
        timing[p]["saved_vs_copy_cuda_pct"] = 100 * (base - timing[p]["median_ms"]) / base
        timing[p]["saved_vs_numpy_ms"] = timing["numpy"]["median_ms"] - timing[p]["median_ms"]
    timing["frames_per_round"], timing["rounds"], timing["t_index_list"] = args.timed_frames, args.rounds, t_index
    engines.clear()
    return parity, timing


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (reduced: eager, logic only)")
    ap.add_argument("--model", default="random:sd-turbo")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", default=None, help="default float16 on cuda, float32 on cpu")
    ap.add_argument("--frames", type=int, default=None, help="switching frames (default 400; cpu 24)")
    ap.add_argument("--every", type=int, default=None, help="switch every N frames (default 50; cpu 4)")
    ap.add_argument("--parity-frames", type=int, default=None, help="default 30; cpu 4")
    ap.add_argument("--timed-frames", type=int, default=None, help="frames per timing round (default 100; cpu 3)")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5; cpu 2)")
    ap.add_argument("--zc-t-index", type=int, nargs="+", default=[32])
    ap.add_argument("--skip-switching", action="store_true")
    ap.add_argument("--skip-zero-copy", action="store_true")
    args = ap.parse_args(argv)
    args.dev = torch.device(args.device)
    args.cuda = args.dev.type == "cuda"
    if args.cuda and not torch.cuda.is_available():
        ap.error("--device cuda asked for but torch sees no CUDA device; use --device cpu for the reduced run")
    small = not args.cuda
    args.dtype = parse_dtype(args.dtype or ("float16" if args.cuda else "float32"), args.dev)
    args.backend = Backend.GRAPH if args.cuda else Backend.EAGER
    for name, full, reduced in (("frames", 400, 24), ("every", 50, 4), ("parity_frames", 30, 4),
                                ("timed_frames", 100, 3), ("rounds", 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, reduced if small else full)
    if args.every < 1 or args.frames <= 2 * args.every:
        ap.error(f"--frames must exceed 2 x --every so both shapes are revisited; got {args.frames} / {args.every}")
    return args


def summary(report: dict) -> list[str]:
    lines = [f"=== graph cache / zero-copy: {report['model']} {report['size']}x{report['size']} {report['dtype']}, "
             f"backend {report['backend']}{'' if report['graphs_exercised'] else ' (no CUDA graphs exercised)'} ==="]
    for name, s in report.get("switching", {}).items():
        st = s["steady_ms"]
        w = s["worst_switch_ms_after_first_visits"]
        lines.append(f"switch {name:9s} cap {s['capacity']}: captures after first visits "
                     f"{s['captures_after_first_visits']}, at end {s['captures_at_end']}; steady median "
                     f"{st['median']:.2f} ms; first visit {s['first_visit_ms']:.1f} ms; worst later switch {w:.2f} ms "
                     f"({s['worst_switch_over_median']:.2f}x median); worst frame "
                     f"{s['worst_frame_ms_after_first_visits']:.2f} ms")
    for path in ZC_PATHS:
        p = report.get("zero_copy_parity", {}).get(path)
        if p:
            extra = p.get("with_engine_stream_waiting_on_caller_stream")
            lines.append(f"parity {path:16s} identical {p['identical']} ({p['frames_differing']}/{p['frames']} differ, "
                         f"max |d| {p['max_abs_diff']})" + (f"; with engine.stream.wait_stream(caller): identical "
                                                            f"{extra['identical']}" if extra else ""))
    t = report.get("zero_copy_timing")
    if t:
        for path in TIMED_PATHS:
            x = t[path]
            lines.append(f"time   {path:16s} {x['median_ms']:.4f} ms/frame" + (
                f"  saved vs copy_cuda {x['saved_vs_copy_cuda_ms'] * 1e3:.1f} us ({x['saved_vs_copy_cuda_pct']:.2f}%),"
                f" vs numpy {x['saved_vs_numpy_ms']:.3f} ms" if "saved_vs_copy_cuda_ms" in x else ""))
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    lines.append("checks: " + ("all passed" if not report["failures"] else "FAILED: " + "; ".join(report["failures"])))
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    report: dict[str, Any] = {"environment": environment(), "model": args.model, "size": args.size,
                              "dtype": str(args.dtype).replace("torch.", ""), "backend": args.backend.value,
                              "graphs_exercised": args.cuda, "command": " ".join(sys.argv), "failures": []}

    def save() -> None:  # after every section: a run cut short still leaves its numbers
        with open(os.path.join(out_dir, "graph_cache.json"), "w") as f:
            json.dump(report, f, indent=1)

    t0 = time.time()
    torch.manual_seed(0)
    comps = load_components(args.model, args.dev, args.dtype)
    host = synthetic_frames(32, args.size, args.size)
    dev = [torch.from_numpy(f).to(args.dev) for f in host]
    print(f"[{time.time() - t0:6.1f}s] components built ({args.model}, {args.dev}, {args.dtype})", flush=True)
    failures = report["failures"]

    with no_env(GRAPH_CACHE_ENV) as env_value:
        report["env_" + GRAPH_CACHE_ENV] = env_value
        if not args.skip_switching:
            report["switching"] = {}
            for name, size in (("cached", 4), ("cache_off", 1)):  # cache_off: what RTDIFFUSION_GRAPH_CACHE=off gives
                s = switching(comps, args, host, size)
                report["switching"][name] = s
                save()
                print(f"[{time.time() - t0:6.1f}s] switching {name}: captures {s['captures_after_first_visits']} "
                      f"-> {s['captures_at_end']}, steady {s['steady_ms']['median']:.2f} ms, worst later switch "
                      f"{s['worst_switch_ms_after_first_visits']:.2f} ms", flush=True)
                if args.cuda:
                    torch.cuda.empty_cache()
            c = report["switching"]["cached"]
            if c["captures_at_end"] != c["captures_after_first_visits"]:
                failures.append(f"cached engine captured after the first visits "
                                f"({c['captures_after_first_visits']} -> {c['captures_at_end']})")
            if args.cuda:
                if c["backend"] != "graph" or c["backend_fallback"]:
                    failures.append(f"graph backend not in use: {c['backend']} ({c['backend_fallback']})")
                if c["captures_after_first_visits"] != len(SHAPES):
                    failures.append(f"expected {len(SHAPES)} captures after the first visits, "
                                    f"got {c['captures_after_first_visits']}")
                ratio = c["worst_switch_over_median"]
                if ratio and ratio > 2:  # timing is noisy: a warning in the report, not a failed check
                    report.setdefault("warnings", []).append(
                        f"a switch back to a cached shape took {ratio:.1f}x the median frame")
                off = report["switching"]["cache_off"]
                want = 1 + len(range(args.every, args.frames, args.every))
                if off["captures_at_end"] != want:  # not a failure of the cache; says the comparison is off
                    log.warning("cache_off engine made %d captures, expected %d", off["captures_at_end"], want)
        if not args.skip_zero_copy:
            parity, timing = zero_copy(comps, args, host, dev)
            report["zero_copy_parity"], report["zero_copy_timing"] = parity, timing
            for path in ZC_PATHS:
                if not parity[path]["identical"]:
                    failures.append(f"{path} output differs from the copying path "
                                    f"({parity[path]['frames_differing']}/{parity[path]['frames']} frames)")
            save()
            print(f"[{time.time() - t0:6.1f}s] zero-copy done", flush=True)

    report["wall_s"] = time.time() - t0
    save()
    if not args.cuda:
        print("note: CPU run with the eager backend: no CUDA graphs, streams or events were exercised; "
              "this checks the script's logic and the engine's API paths only", flush=True)
    print("\n" + "\n".join(summary(report)), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
