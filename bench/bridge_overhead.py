"""What the TouchDesigner bridge adds to each frame: ring in, upload, readback, ring out.

    PYTHONPATH=. python bench/bridge_overhead.py                       # stand-in step, 512x512, CUDA
    PYTHONPATH=. python bench/bridge_overhead.py --engine random:sd-turbo
    PYTHONPATH=. python bench/bridge_overhead.py --device cpu --size 64  # a smoke run without a GPU

Runs the bridge's own transfer (td_bridge.transfer.CudaTransfer: pinned staging, side streams, events;
HostTransfer on the CPU) between real shared-memory rings, in this process, and measures:

  stages      ring in (seqlock copy shm -> pinned, host), upload (H2D + format gather, GPU events),
              readback (format gather + D2H, GPU events), ring out (pinned -> shm, host)
  latency     write into the input ring -> result published in the output ring, one frame at a time,
              against the engine step alone (step + wait on its ready event)
  throughput  frames/s of step() alone vs the whole bridge loop, pipelined (no per-frame waits)

The stand-in step inverts the picture (255 - x) on the engine's stream, so it also checks that every
pixel format and row order comes back exactly. Prints a table last; writes $OUT/bridge_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from td_bridge.ring import PixelFormat, RingLayout, RingReader, RingWriter, RowOrder, to_rgb
from td_bridge.transfer import make_transfer


@dataclass(frozen=True)
class Result:  # the shape of rtdiffusion.engine.FrameResult
    output: torch.Tensor
    ready: object
    index: int
    skipped: bool


class StandInEngine:
    """StreamEngine's device-level API with a trivial step (invert), to isolate the bridge's own cost."""

    def __init__(self, height: int, width: int, device: str) -> None:
        self.device = torch.device(device)
        self.width, self.height = width, height
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.input_buffer = torch.zeros(height, width, 3, dtype=torch.uint8, device=self.device)  # [H, W, 3]
        self._out = torch.zeros_like(self.input_buffer)  # [H, W, 3]
        self._events = [torch.cuda.Event() for _ in range(8)] if cuda else None
        self._i = 0

    def step(self, consumer_done=None) -> Result:
        i = self._i
        self._i += 1
        if self.stream is None:
            torch.bitwise_not(self.input_buffer, out=self._out)
            return Result(self._out, None, i, False)
        with torch.cuda.stream(self.stream):
            if consumer_done is not None:
                self.stream.wait_event(consumer_done)
            torch.bitwise_not(self.input_buffer, out=self._out)
            ev = self._events[i % len(self._events)]
            ev.record(self.stream)
        return Result(self._out, ev, i, False)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        self.input_buffer.copy_(torch.from_numpy(frame))
        return self.step().output.numpy().copy()


def make_engine(args):
    if args.engine == "standin":
        return StandInEngine(args.size, args.size, args.device)
    from rtdiffusion import StreamEngine

    return StreamEngine.from_pretrained(args.engine, width=args.size, height=args.size, device=args.device,
                                        dtype="float16" if args.device.startswith("cuda") else "float32")


def rings(layout: RingLayout):
    tag = uuid.uuid4().hex[:8]
    return RingReader.create(f"rtdb_in_{tag}", layout), RingWriter.create(f"rtdb_out_{tag}", layout)


def sync(engine) -> None:
    if engine.stream is not None:
        torch.cuda.synchronize(engine.device)  # bench only, between phases; never in the bridge


def check_formats(device: str, size: int) -> list[str]:
    """Stand-in only: every format and row order must come back as exactly 255 - input."""
    engine = StandInEngine(size, size, device)
    failures = []
    rng = np.random.default_rng(0)
    for fmt in PixelFormat:
        for rows in RowOrder:
            lay = RingLayout(size, size, fmt, rows, 3)
            bridge_in, bridge_out = rings(lay)
            client_in, client_out = RingWriter.attach(bridge_in.name), RingReader.attach(bridge_out.name)
            tr = make_transfer(engine, bridge_in, bridge_out, lambda n, s: None)
            try:
                for k in range(4):
                    pic = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                    client_in.write(pic, rows=RowOrder.TOP_DOWN)
                    assert tr.read() is not None
                    tr.submit()
                    while not tr.poll(block=True):
                        pass
                    raw, rgb = client_out.empty_frame(), np.empty_like(pic)
                    assert client_out.read(raw) is not None
                    if not np.array_equal(to_rgb(raw, lay, rgb), 255 - pic):
                        failures.append(f"{fmt.value} {rows.name} frame {k}")
                        break
            finally:
                tr.close()
                for r in (client_in, client_out, bridge_in, bridge_out):
                    r.close()
    return failures


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def measure(engine, args) -> dict:
    size, n = args.size, args.frames
    lay = RingLayout(size, size, PixelFormat.parse(args.pixel_format),
                     RowOrder.BOTTOM_UP if args.flip_rows else RowOrder.TOP_DOWN, 3)
    frame = np.random.default_rng(1).integers(0, 256, lay.shape, dtype=np.uint8)  # [H, W, C] in ring layout

    # engine step alone, waited on each frame
    for _ in range(args.warmup):
        engine.step()
    sync(engine)
    step_ms = []
    for _ in range(n):
        t0 = time.perf_counter()
        res = engine.step()
        if res.ready is not None:
            res.ready.synchronize()
        step_ms.append((time.perf_counter() - t0) * 1e3)
    # engine step alone, pipelined
    sync(engine)
    t0 = time.perf_counter()
    for _ in range(n):
        engine.step()
    sync(engine)
    step_fps = n / (time.perf_counter() - t0)

    bridge_in, bridge_out = rings(lay)
    client_in, client_out = RingWriter.attach(bridge_in.name), RingReader.attach(bridge_out.name)
    cuda = engine.stream is not None
    tr = make_transfer(engine, bridge_in, bridge_out, lambda i, s: None, **({"profile": True} if cuda else {}))
    out = client_out.empty_frame()
    try:
        def put():  # TouchDesigner's side: a straight copy into the slot
            dst = client_in.begin()
            np.copyto(dst, frame)
            client_in.commit()

        for _ in range(args.warmup):
            put()
            tr.read()
            tr.submit()
            tr.poll(block=True)
        client_out.read(out)
        if cuda:
            for v in tr.samples.values():
                v.clear()
        # one frame at a time: write -> published
        lat_ms, host_ms = [], []
        for _ in range(n):
            put()
            t0 = time.perf_counter()
            assert tr.read() is not None
            tr.submit()
            t1 = time.perf_counter()
            while not tr.poll(block=True):
                pass
            lat_ms.append((time.perf_counter() - t0) * 1e3)
            host_ms.append((t1 - t0) * 1e3)
            client_out.read(out)
        # pipelined: a fresh frame every iteration, results published as their events complete
        sync(engine)
        t0 = time.perf_counter()
        published0 = bridge_out.published
        for _ in range(n):
            put()
            tr.read()
            tr.submit()
            tr.poll()
        tr.close()
        bridge_fps = (bridge_out.published - published0) / (time.perf_counter() - t0)
        stages = {k: [x * 1e3 for x in v] for k, v in tr.samples.items()} if cuda else {}
    finally:
        for r in (client_in, client_out, bridge_in, bridge_out):
            r.close()

    step_med = statistics.median(step_ms)
    lat_med = statistics.median(lat_ms)
    return {
        "device": torch.cuda.get_device_name(engine.device) if cuda else "cpu",
        "engine": args.engine, "size": size, "pixel_format": lay.pixel_format.value,
        "row_order": lay.row_order.name.lower(), "frames": n, "transfer": tr.name,
        "torch": torch.__version__,
        "stages_ms": {k: {"median": statistics.median(v), "p95": pct(v, 0.95)} for k, v in stages.items() if v},
        "step_ms": {"median": step_med, "p95": pct(step_ms, 0.95)},
        "bridge_latency_ms": {"median": lat_med, "p95": pct(lat_ms, 0.95)},
        "bridge_host_ms": {"median": statistics.median(host_ms), "p95": pct(host_ms, 0.95)},
        "added_latency_ms": lat_med - step_med,
        "step_fps": step_fps, "bridge_fps": bridge_fps,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default="standin", help="'standin' (invert) or a model id such as random:sd-turbo")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--pixel-format", default="rgba8")
    p.add_argument("--flip-rows", action="store_true", default=True)
    p.add_argument("--no-flip-rows", dest="flip_rows", action="store_false")
    args = p.parse_args()

    engine = make_engine(args)
    failures = check_formats(args.device, 64) if args.engine == "standin" else []
    r = measure(engine, args)
    r["format_check_failures"] = failures
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bridge_overhead.json")
    runs = {}
    if os.path.exists(path):  # one file for the stand-in run and the model run: keyed by engine
        with open(path) as f:
            runs = json.load(f)
    runs[args.engine] = r
    with open(path, "w") as f:
        json.dump(runs, f, indent=2)

    print(f"\nbridge overhead: {r['device']}, {r['engine']}, {r['size']}x{r['size']} {r['pixel_format']} "
          f"{r['row_order']}, {r['transfer']} transfer, {r['frames']} frames, torch {r['torch']}")
    print(f"{'stage':44s} {'median ms':>10s} {'p95 ms':>10s}")
    names = {"ring_in": "ring in   (shm -> pinned, host)", "upload": "upload    (H2D + format, GPU)",
             "readback": "readback  (format + D2H, GPU)", "ring_out": "ring out  (pinned -> shm, host)"}
    for k, label in names.items():
        if k in r["stages_ms"]:
            s = r["stages_ms"][k]
            print(f"{label:44s} {s['median']:10.3f} {s['p95']:10.3f}")
    for label, k in (("engine step alone (waited)", "step_ms"), ("bridge: ring write -> published", "bridge_latency_ms"),
                     ("bridge host time (read + submit)", "bridge_host_ms")):
        print(f"{label:44s} {r[k]['median']:10.3f} {r[k]['p95']:10.3f}")
    print(f"{'added latency per frame (median)':44s} {r['added_latency_ms']:10.3f}")
    print(f"{'throughput fps: step alone / bridge':44s} {r['step_fps']:10.1f} {r['bridge_fps']:10.1f}")
    print(f"format/row-order check: {'ok' if not failures else 'FAILED ' + ', '.join(failures)}"
          if args.engine == "standin" else "format check: skipped (real model)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
