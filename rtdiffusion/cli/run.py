"""`rtdiffusion run`: restyle a video file, an image folder or a test pattern into a video or a folder.

Order: every flag and both paths are checked first (a typo fails before the model loads), then the engine
loads, then frames run. SIGINT (Ctrl-C) and SIGTERM both stop after the frame in progress and close the
output, so the video holds every frame written so far and plays; a second signal stops at once (the
output is still closed). Exit status 0 when the input ran out, 128 + the signal number when stopped.
"""

from __future__ import annotations

import argparse
import collections
import logging
import signal
import statistics
import threading
import time

import numpy as np

from .common import add_engine_args, add_option, build_engine, check_engine_args
from .progress_view import show_with

log = logging.getLogger(__name__)

FIRST_FRAME = {"compiled": "compiling (first frame)", "graph": "capturing the CUDA graph (first frame)",
               "trt": "capturing the CUDA graph (first frame)"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="restyle a video / image folder / test pattern",
                       description="Runs the stream engine over every frame of --input and writes --output. "
                                   "random:* models have random weights: their pictures are noise-like, so "
                                   "--side-by-side is the way to see that something happened.")
    add_engine_args(p)
    p.add_argument("--input", required=True, metavar="SRC", help="video file, image folder, or 'synthetic'")
    p.add_argument("--output", required=True, metavar="DST", help="video file (.mp4 ...) or a folder")
    add_option(p, "--frames", default=None, note="at most this many (default: all; synthetic: 120)")
    p.add_argument("--control-video", default=None, metavar="SRC",
                   help="a second source (video file, image folder or 'synthetic') whose frames are the control "
                        "images of the ControlNets with the 'external' preprocessor, frame by frame beside --input; "
                        "the run ends with the shorter of the two")
    p.add_argument("--side-by-side", action="store_true",
                   help="write the input and the output next to each other (twice the width)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


class Stop:
    """SIGINT / SIGTERM while frames run: remember the signal, let the loop finish its frame and close the
    output. Before the loop (loading) and on a second signal: raise KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_loop = False  # an output is open: a signal is only recorded
        self.closing = False  # the output is being closed: even a second signal waits for that
        self._saved: dict[int, object] = {}

    def __enter__(self) -> "Stop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if self.closing:
            return
        if not self.in_loop or not first:
            raise Interrupted(signum)
        log.info("%s: stopping after this frame (again: at once)", signal.Signals(signum).name)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class ExternalControl:
    """--control-video: its frames go to every 'external' ControlNet, one per input frame, before each call."""

    def __init__(self, engine, frames, indices: list[int], source: str) -> None:
        self.engine, self.frames, self.indices, self.source, self.count = engine, frames, indices, source, 0

    @classmethod
    def open(cls, args: argparse.Namespace, engine) -> "ExternalControl | None":
        if not args.control_video:
            return None
        from ..video_io import open_source

        indices = [i for i, spec in enumerate(args.controlnet or []) if spec.get("preprocessor") == "external"]
        frames, _, _ = open_source(args.control_video, engine.width, engine.height, args.frames)
        return cls(engine, frames, indices, args.control_video)

    def next_frame(self) -> bool:
        """Hand the next control frame to the engine; False when the control video has ended."""
        frame = next(self.frames, None)
        if frame is None:
            log.warning("--control-video %s ended after %d frames; stopping there", self.source, self.count)
            return False
        for i in self.indices:
            self.engine.set_control_image(frame, index=i)  # [H, W, 3] uint8, copied between frames
        self.count += 1
        return True


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..video_io import FrameSink, check_sink, check_source, open_source

    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames must be >= 1; got {args.frames}")
    if args.frame_buffer_size != 1:
        raise ValueError(f"--frame-buffer-size must be 1 for run (it sends one frame per call); "
                         f"got {args.frame_buffer_size}")
    check_engine_args(args)
    check_source(args.input)
    if args.control_video:
        try:
            check_source(args.control_video)
        except (ValueError, OSError) as exc:
            raise type(exc)(f"--control-video: {exc}") from None
    check_sink(args.output)
    with Stop() as stop:
        engine = build_engine(args)
        latency = engine.status()["latency_frames"]  # the output of call i is the input of call i - latency
        inputs: collections.deque[np.ndarray] = collections.deque()
        times: list[float] = []
        sink = bar = None
        stop.in_loop = True  # from here on a signal ends the loop and the output is closed
        try:
            frames, count, fps = open_source(args.input, engine.width, engine.height, args.frames)
            control = ExternalControl.open(args, engine)
            sink = FrameSink(args.output, engine.width * (2 if args.side_by_side else 1), engine.height, fps)
            # smoothing=0: the bar's rate is frames / elapsed, the summary's fps below
            bar = tqdm(total=count, unit="frame", disable=args.no_progress, smoothing=0,
                       desc=FIRST_FRAME.get(engine.backend, "rtdiffusion"))
            show_with(engine.build_progress, bar)  # the first frame's stages: through the bar
            if engine.backend in FIRST_FRAME:
                log.info("%s: the first frame %s", engine.backend,
                         "compiles the networks, which may take minutes (a restart that finds AOTInductor packages "
                         "in the engine cache only loads them)" if engine.backend == "compiled"
                         else "captures the CUDA graph")
            start = getattr(bar, "start_t", None) or time.time()  # the bar's own clock (time.time)
            for frame in frames:
                if stop.signum is not None:
                    break
                if control is not None and not control.next_frame():
                    break
                t0 = time.perf_counter()
                out = engine(frame)
                times.append((time.perf_counter() - t0) * 1e3)
                if args.side_by_side:
                    inputs.append(frame)
                    left = inputs.popleft() if len(inputs) > latency else np.zeros_like(frame)
                    out = np.concatenate([left, out], axis=1)  # [H, 2W, 3]
                sink.write(out)
                if len(times) == 1:
                    bar.set_description("rtdiffusion")
                bar.update(1)
            end = time.time()
            bar._time = lambda: end  # freeze the bar's clock: its final rate and the summary's are one figure
            wall = end - start
        finally:
            stop.closing = True
            if bar is not None:
                bar.close()
            if sink is not None:
                sink.close()
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        log.warning("stopped by %s: wrote %d frames to %s", name, sink.count if sink else 0, args.output)
        return 128 + stop.signum
    if not times:
        raise ValueError(f"input {args.input!r} gave no frames")
    steady = times[min(len(times) - 1, 3):]  # the first frames include warm-up
    s = sorted(steady)
    p99 = s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]
    med = statistics.median(steady)
    print(f"{len(times)} frames -> {args.output}  backend {engine.backend}  {len(times) / wall:.1f} fps "
          f"(wall clock, as the progress bar: reading, writing and the first frame included)  "
          f"engine median {med:.2f} ms ({1e3 / med:.1f} fps)  p99 {p99:.2f} ms")
    return 0
