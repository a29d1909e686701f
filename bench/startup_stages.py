#!/usr/bin/env python3
"""Issue 17, part 3: seconds per stage of a start, in one fresh process, on any device (the CPU included).

    RTD_T0_NS=$(date +%s%N) python bench/startup_stages.py --model random:tiny
    RTD_T0_NS=$(date +%s%N) python bench/startup_stages.py --model random:sd-turbo --backend eager --frames 0
    ... --backend compiled --artifacts aoti --engine-dir DIR   (run twice: the second run is a cached restart)

Stages, each the seconds it took (``total`` is since the command when RTD_T0_NS is the shell's clock just
before it, else since the interpreter began running this file):

    python       interpreter start up to this file's first line (only with RTD_T0_NS)
    torch        import torch
    rtdiffusion  import rtdiffusion and StreamEngine (the engine's own modules)
    libraries    import what building a model needs (diffusers' UNet and VAE classes, transformers' CLIP)
    weights      models/loading.load_components: the networks built (random:) or read, on the device
    engine       the rest of from_pretrained: buffers, text encoders, backend (package lookups and loads)
    first_frame  the first engine(frame) call (--frames 0: not run)

Prints one JSON line: the stages, the total, the torch / diffusers / transformers versions, the CPU or GPU.
"""

from __future__ import annotations

import os
import sys
import time

T0 = time.time()
SHELL_T0 = int(os.environ["RTD_T0_NS"]) / 1e9 if os.environ.get("RTD_T0_NS") else None


def main() -> int:
    import argparse
    import json
    import platform

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--artifacts", default="auto", help="compile_artifacts: auto, jit or aoti")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engine-dir", default=None)
    ap.add_argument("--frames", type=int, default=1, help="0: stop when the engine is ready")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    stages: dict[str, float] = {}
    if SHELL_T0 is not None:
        stages["python"] = round(T0 - SHELL_T0, 3)
    last = [time.time()]

    def mark(name: str) -> None:
        now = time.time()
        stages[name] = round(now - last[0], 3)
        last[0] = now

    import torch

    mark("torch")
    import rtdiffusion.pretrained as pretrained
    from rtdiffusion import StreamEngine

    mark("rtdiffusion")
    from diffusers import AutoencoderTiny, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    mark("libraries")
    load = pretrained.load_components

    def timed_load(*a, **kw):
        comps = load(*a, **kw)
        mark("weights")
        return comps

    pretrained.load_components = timed_load
    dtype = "float16" if args.device == "cuda" else "float32"
    engine = StreamEngine.from_pretrained(args.model, device=args.device, dtype=dtype, backend=args.backend,
                                          compile_artifacts=args.artifacts, engine_dir=args.engine_dir)
    if args.device == "cuda":
        torch.cuda.synchronize()
    mark("engine")
    if args.frames > 0:
        import numpy as np

        frame = np.random.default_rng(0).integers(0, 256, (engine.height, engine.width, 3), dtype=np.uint8)
        engine(frame)
        if args.device == "cuda":
            torch.cuda.synchronize()
        mark("first_frame")
    import diffusers
    import transformers

    total = time.time() - (SHELL_T0 if SHELL_T0 is not None else T0)
    rec = {"model": args.model, "backend": engine.backend, "device": args.device, "stages_s": stages,
           "total_s": round(total, 3), "since": "command" if SHELL_T0 is not None else "script",
           "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu": _cpu_name(), "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(rec), flush=True)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
