"""`rtdiffusion run`: restyle a video file, an image folder or a test pattern into a video or a folder."""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from .common import add_engine_args, build_engine

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="restyle a video / image folder / test pattern",
                       description="Runs the stream engine over every frame of --input and writes --output. "
                                   "random:* models have random weights: their pictures are noise-like.")
    add_engine_args(p)
    p.add_argument("--input", required=True, metavar="SRC", help="video file, image folder, or 'synthetic'")
    p.add_argument("--output", required=True, metavar="DST", help="video file (.mp4 ...) or a folder")
    p.add_argument("--frames", type=int, default=None, help="at most this many frames (synthetic: 120)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..video_io import FrameSink, open_source

    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames must be >= 1; got {args.frames}")
    engine = build_engine(args)
    frames, count, fps = open_source(args.input, engine.width, engine.height, args.frames)
    sink = FrameSink(args.output, engine.width, engine.height, fps)
    times: list[float] = []
    try:
        for frame in tqdm(frames, total=count, unit="frame", disable=args.no_progress, desc="rtdiffusion"):
            t0 = time.perf_counter()
            out = engine(frame)
            times.append((time.perf_counter() - t0) * 1e3)
            sink.write(out)
    finally:
        sink.close()
    if not times:
        raise ValueError(f"input {args.input!r} gave no frames")
    steady = times[min(len(times) - 1, 3):]  # the first frames include warm-up
    s = sorted(steady)
    p99 = s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]
    med = statistics.median(steady)
    print(f"{len(times)} frames -> {args.output}  backend {engine.backend}  "
          f"{1e3 / med:.1f} fps  median {med:.2f} ms  p99 {p99:.2f} ms")
    return 0
