#!/usr/bin/env python3
"""Issue 17, part 3: where the seconds of a start go, from the command to the first frame out.

    RTD_T0_NS=$(date +%s%N) python bench/startup.py --run cold      # builds the AOTInductor packages
    RTD_T0_NS=$(date +%s%N) python bench/startup.py --run restart   # finds them in the engine cache
    ... --profile            also write a cProfile of the whole start ($OUT/startup_profile_<run>.txt)
    ... --cudnn-benchmark off   run without cuDNN's per-shape algorithm search (the engine turns it on)

RTD_T0_NS is the shell's clock just before the command, so "python_started" includes the interpreter's start.
Prints one JSON line (also appended to $OUT/startup.jsonl): seconds since the command at each mark, the
per-network package seconds (fingerprint, cache lookup, load) from the engine's status, and the frame time.
"""

from __future__ import annotations

import os
import sys
import time

T0 = int(os.environ.get("RTD_T0_NS") or time.time_ns()) / 1e9
MARKS: dict[str, float] = {"python_started": round(time.time() - T0, 3)}


def mark(name: str) -> None:
    MARKS[name] = round(time.time() - T0, 3)


def main() -> int:
    import argparse
    import json
    import logging

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a name for this record (cold, restart, ...)")
    ap.add_argument("--model", default="random:sd-turbo")
    ap.add_argument("--artifacts", default="aoti", choices=["aoti", "jit"])
    ap.add_argument("--cudnn-benchmark", default="on", choices=["on", "off"])
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--parity", action="store_true", help="also the max difference from eager over the frames")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    mark("import_torch")
    import rtdiffusion.backends as backends
    from rtdiffusion import StreamEngine
    from rtdiffusion.bench import synthetic_frames

    mark("import_rtdiffusion")
    import diffusers  # noqa: F401  (what load_components imports first; timed on its own)

    mark("import_diffusers")
    if args.device == "cuda":
        torch.zeros(1, device="cuda")
        mark("cuda_init")
    if args.cudnn_benchmark == "off":
        prepare = backends.prepare_cuda_modules

        def prepare_without_search(comps):
            prepare(comps)
            torch.backends.cudnn.benchmark = False

        backends.prepare_cuda_modules = prepare_without_search
    dtype = "float16" if args.device == "cuda" else "float32"
    engine = StreamEngine.from_pretrained(args.model, device=args.device, dtype=dtype, backend="compiled",
                                          compile_artifacts=args.artifacts)
    mark("engine_ready")
    size = engine.height
    frames = synthetic_frames(min(args.frames, 64), size, engine.width)
    first = engine(frames[0])
    mark("first_frame")
    outs = [first]
    times = []
    for i in range(args.frames):
        t = time.perf_counter()
        outs.append(engine(frames[i % len(frames)]))
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    nets = engine.status()["networks"]
    rec = {"run": args.run, "artifacts": args.artifacts, "cudnn_benchmark": args.cudnn_benchmark,
           "marks_s": MARKS, "frame_ms_median": times[len(times) // 2], "frame_ms_p99": times[round(0.99 * (len(times) - 1))],
           "networks": nets, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d")}
    if args.parity:
        import numpy as np

        ref = StreamEngine.from_pretrained(args.model, device=args.device, dtype=dtype, backend="eager")
        want = [ref(frames[0])] + [ref(frames[i % len(frames)]) for i in range(args.frames)]
        rec["max_diff_vs_eager"] = max(int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())
                                       for a, b in zip(outs, want))
    line = json.dumps(rec)
    print(line, flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "startup.jsonl"), "a") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    if "--profile" in sys.argv:
        sys.argv.remove("--profile")
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        rc = prof.runcall(main)
        run = sys.argv[sys.argv.index("--run") + 1]
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        st.sort_stats("cumulative").print_stats(60)
        st.sort_stats("tottime").print_stats(30)
        with open(os.path.join(os.environ.get("OUT", "."), f"startup_profile_{run}.txt"), "w") as f:
            f.write(buf.getvalue())
        sys.exit(rc)
    sys.exit(main())
