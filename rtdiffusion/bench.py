"""`rtdiffusion bench`: the real engine on synthetic host frames, as a user's loop runs it.

Reports, for one model / backend / setting:
- end to end (uint8 host frame in -> uint8 host frame out): median, p90, p99, max frame time, fps, and the
  latency from a frame in to its result out ((S-1)*F + 1 frame times with a stream batch of S steps);
- a per-stage table (upload, preprocess, encode, unet, scheduler, decode, postprocess, readback) from CUDA
  events in an instrumented eager pass with the backend's own networks, named as in frame_step.py;
- GPU allocations per steady-state frame (torch.cuda.memory_stats), host syncs flagged per frame by
  torch.cuda.set_sync_debug_mode (the deliberate readback event wait is not one of them), peak VRAM;
- with prompt_change_every=N: the worst frame while a new prompt arrives every N frames;
- the FLOP count of a frame's networks (FlopCounterMode) and the ratio of the measured time to its floor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .frame_step import main_step

log = logging.getLogger(__name__)

STAGES = ("upload", "preprocess", "encode", "unet", "scheduler", "decode", "postprocess", "readback")


@dataclass
class BenchResult:
    settings: dict[str, Any]
    environment: dict[str, Any]
    frame_ms: dict[str, float]
    fps: float
    latency_ms: float
    stages_ms: dict[str, float] = field(default_factory=dict)
    allocations_per_frame: float = 0.0
    host_syncs_per_frame: float = 0.0
    peak_vram_gb: float = 0.0
    prompt_change: dict[str, float] | None = None
    flops_per_frame: float | None = None
    matmul_tflops: float | None = None
    floor_ms: float | None = None
    device_ms: float | None = None  # GPU time per frame, steps enqueued back to back (no host round trip)
    kernels: list[dict[str, Any]] = field(default_factory=list)  # top kernels of the frame (profiler)
    baseline: dict[str, Any] | None = None  # compare_baseline(): StreamDiffusion's loop, compiled, same run

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def table(self) -> str:
        lines = [f"model {self.settings['model']}  backend {self.settings['backend']}  "
                 f"{self.settings['width']}x{self.settings['height']}  t_index {self.settings['t_index_list']}  "
                 f"cfg {self.settings['cfg']}  {self.environment.get('gpu', 'cpu')}"]
        if self.stages_ms:
            lines.append("stage          ms (median, instrumented eager pass)")
            lines += [f"  {k:<12} {v:8.3f}" for k, v in self.stages_ms.items()]
        f = self.frame_ms
        lines.append(f"end to end     median {f['median']:.3f} ms  p90 {f['p90']:.3f}  p99 {f['p99']:.3f}  "
                     f"max {f['max']:.3f}  -> {self.fps:.1f} fps; latency in->out {self.latency_ms:.2f} ms")
        lines.append(f"allocations/frame {self.allocations_per_frame:.2f}  host syncs/frame "
                     f"{self.host_syncs_per_frame:.2f}  peak VRAM {self.peak_vram_gb:.2f} GB")
        if self.prompt_change:
            p = self.prompt_change
            lines.append(f"prompt change every {int(p['every'])}: worst frame {p['worst_ms']:.3f} ms "
                         f"({p['worst_ms'] / f['median']:.2f}x median), median {p['median_ms']:.3f} ms")
        if self.device_ms:
            lines.append(f"device only    {self.device_ms:.3f} ms/frame (steps back to back, no host round trip)")
        if self.kernels:
            lines.append("top kernels per frame (torch.profiler over graph replays):")
            lines += [f"  {k['ms_per_frame']:7.3f} ms  {k['calls_per_frame']:5.1f}x  {k['name'][:90]}"
                      for k in self.kernels[:10]]
        if self.baseline:
            b = self.baseline
            lines.append(f"baseline       {b['name']}: median {b['frame_ms']['median']:.3f} ms  p99 "
                         f"{b['frame_ms']['p99']:.3f} -> {1e3 / b['frame_ms']['median']:.1f} fps; "
                         f"ours is {b['ratio']:.2f}x faster (median / median)")
        if self.floor_ms:
            lines.append(f"FLOPs/frame {self.flops_per_frame / 1e9:.0f} G; floor at {self.matmul_tflops:.0f} "
                         f"TFLOP/s = {self.floor_ms:.3f} ms; measured/floor = {f['median'] / self.floor_ms:.1f}x")
        return "\n".join(lines)


def environment() -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def synthetic_frames(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """A moving test pattern: gradients, a bouncing disc and noise, so no two frames are equal."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = rng.integers(0, 32, (height, width, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        cx = (0.5 + 0.35 * np.sin(i / 9.0)) * width
        cy = (0.5 + 0.35 * np.cos(i / 13.0)) * height
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < (min(height, width) / 6) ** 2
        r = (xx / width * 255 + i * 3) % 256
        g = (yy / height * 255 + i * 5) % 256
        b = np.where(disc, 255.0, 64.0)
        img = np.stack([r, g, b], axis=-1).astype(np.uint8)
        out.append(img ^ noise)
    return out


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100.0 * (len(s) - 1))))]


def _stats(ms: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ms), "p90": _percentile(ms, 90), "p99": _percentile(ms, 99),
            "max": max(ms), "mean": statistics.fmean(ms)}


def stage_profile(engine, frames: list[np.ndarray], repeats: int = 30) -> dict[str, float]:
    """Median ms per stage, from events between the stages of an eager pass with the engine's networks."""
    st, cuda = engine._state, engine.device.type == "cuda"
    nets = engine._executor.nets
    saved = [t.clone() for t in st.buffers.state_tensors()]
    per: dict[str, list[float]] = {k: [] for k in STAGES}
    with engine._stream_ctx():
        for i in range(repeats):
            stamps: list[tuple[str, Any]] = []

            def mark(name: str) -> None:
                if cuda:
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record()
                    stamps.append((name, ev))
                else:
                    stamps.append((name, time.perf_counter()))

            mark("start")
            frame = torch.from_numpy(frames[i % len(frames)])
            if cuda:
                engine._host.in_host[0].copy_(frame)
                engine._io.frame_u8.copy_(engine._host.in_host, non_blocking=True)
            else:
                engine._io.frame_u8[0].copy_(frame)
            mark("upload")
            main_step(st.buffers, nets, st.guidance, st.ring_shift, mark)
            if cuda:
                engine._host.out_host.copy_(engine._io.out_u8, non_blocking=True)
            else:
                engine._host.out_host.copy_(engine._io.out_u8)
            mark("readback")
            if cuda:
                stamps[-1][1].synchronize()
            for (_, a), (name, b) in zip(stamps, stamps[1:]):
                per[name].append(a.elapsed_time(b) if cuda else (b - a) * 1e3)
    for t, s in zip(st.buffers.state_tensors(), saved):
        t.copy_(s)
    return {k: statistics.median(v[3:] or v) for k, v in per.items() if v}


def count_flops(engine) -> float:
    """FLOPs of one frame step's networks (UNet over the stream batch, VAE encode and decode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from engines.base import TorchNetworks

    st, c = engine._state, engine.components
    nets = TorchNetworks(c.unet, c.vae)
    b = st.buffers
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        nets.encode(b.image)
        nets.unet(b.unet_in, b.t_unet, b.embeds, *b.added)
        nets.decode(b.dec_in)
    return float(counter.get_total_flops())


def matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.float16) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n ** 3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def device_time(engine, n: int = 100) -> float:
    """GPU ms per frame with steps enqueued back to back (what a pipelined caller gets)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    engine.step()
    start.record(engine.stream)
    for _ in range(n):
        engine.step()
    end.record(engine.stream)
    end.synchronize()
    return start.elapsed_time(end) / n


def kernel_profile(engine, n: int = 20) -> list[dict[str, Any]]:
    """The frame's kernels by total GPU time, from torch.profiler over ``n`` steps."""
    from torch.profiler import ProfilerActivity, profile

    engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            engine.step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.count:
            rows.append({"name": e.key, "ms_per_frame": t / 1e3 / n, "calls_per_frame": e.count / n})
    rows.sort(key=lambda r: -r["ms_per_frame"])
    return rows[:25]


def compare_baseline(engine, result: BenchResult, *, frames: int = 300, warmup: int = 30,
                     compile: bool | None = None) -> dict[str, Any]:
    """Time StreamDiffusion's plain loop (rtdiffusion/baseline.py) on the same model, settings and frames,
    in this process, right after ``engine``; store it and the speed ratio in ``result.baseline``.

    compile: torch.compile(mode="reduce-overhead") on the UNet and both TAESD halves (default: on CUDA)."""
    from .baseline import build_baseline, time_baseline
    from .models.loading import load_components

    c = engine.config
    compile = (engine.device.type == "cuda") if compile is None else compile
    comps = load_components(c.model, engine.device, c.dtype, c.vae,
                            seed=int(engine.components.identity.get("seed", 0)))
    stream = build_baseline(engine, comps)
    if compile:
        stream.compile()
    t0 = time.perf_counter()
    src = synthetic_frames(min(frames + warmup, 64), engine.height, engine.width)
    stream(torch.from_numpy(src[0]).to(engine.device))  # first call: compiles (not timed)
    first_s = time.perf_counter() - t0
    stats = _stats(time_baseline(stream, src, frames, warmup))
    name = "StreamDiffusion loop" + (", torch.compile reduce-overhead" if compile else ", eager")
    result.baseline = {"name": name, "frame_ms": stats, "fps": 1e3 / stats["median"], "first_call_s": first_s,
                       "ratio": stats["median"] / result.frame_ms["median"]}
    del stream, comps
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    return result.baseline


def run_bench(engine, *, frames: int = 300, warmup: int = 30, prompt_change_every: int | None = None,
              profile: bool = True, flops: bool = True, kernels: bool = False) -> BenchResult:
    cuda = engine.device.type == "cuda"
    src = synthetic_frames(min(frames + warmup, 64), engine.height, engine.width)
    for i in range(warmup):
        engine(src[i % len(src)])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocs0 = torch.cuda.memory_stats()["allocation.all.allocated"]
    syncs = 0
    times: list[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(frames):
                t0 = time.perf_counter()
                engine(src[i % len(src)])
                times.append((time.perf_counter() - t0) * 1e3)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    allocs = (torch.cuda.memory_stats()["allocation.all.allocated"] - allocs0) / frames if cuda else 0.0
    peak = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
    stats = _stats(times)
    s = engine.settings
    latency_frames = engine.status()["latency_frames"]
    result = BenchResult(
        settings={"model": engine.config.model, "backend": engine.backend, "width": engine.width,
                  "height": engine.height, "t_index_list": list(s.t_index_list), "cfg": s.cfg.value,
                  "guidance_scale": s.guidance_scale, "frames": frames, "warmup": warmup,
                  "dtype": str(engine.config.dtype).replace("torch.", ""), "vae": engine.config.vae.value,
                  "frame_buffer_size": engine.config.frame_buffer_size,
                  "vae_overlap": getattr(engine.config, "vae_overlap", False),
                  "backend_fallback": engine.backend_fallback},
        environment=environment(), frame_ms=stats, fps=1e3 / stats["median"],
        latency_ms=(latency_frames + 1) * stats["median"], allocations_per_frame=allocs,
        host_syncs_per_frame=syncs / frames, peak_vram_gb=peak)
    if prompt_change_every:
        ptimes = []
        for i in range(max(frames // 2, 5 * prompt_change_every)):
            if i % prompt_change_every == 0:
                engine.update_prompt(f"benchmark prompt number {i}")
            t0 = time.perf_counter()
            engine(src[i % len(src)])
            ptimes.append((time.perf_counter() - t0) * 1e3)
        result.prompt_change = {"every": prompt_change_every, "worst_ms": max(ptimes),
                                "median_ms": statistics.median(ptimes), "p99_ms": _percentile(ptimes, 99)}
    if cuda:
        result.device_ms = device_time(engine)
    if kernels and cuda:
        result.kernels = kernel_profile(engine)
    if profile:
        result.stages_ms = stage_profile(engine, src)
    if flops:
        result.flops_per_frame = count_flops(engine)
        if cuda:
            result.matmul_tflops = matmul_tflops(engine.device)
            result.floor_ms = result.flops_per_frame / (result.matmul_tflops * 1e12) * 1e3
    return result
