"""`rtdiffusion bench`: time the real engine on synthetic host frames (see rtdiffusion/bench.py)."""

from __future__ import annotations

import argparse
import json
import logging

from .common import add_engine_args, add_option, build_engine, check_engine_args

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the engine: per-stage table, frame times, allocations",
                       description="Runs the engine on synthetic uint8 frames that start and end in host "
                                   "memory, as a user's loop would, and prints a per-stage table and "
                                   "end-to-end statistics.")
    add_engine_args(p)
    add_option(p, "--frames", default=300, note="timed, after --warmup (default 300)")
    p.add_argument("--warmup", type=int, default=30, help="untimed frames first (default 30)")
    p.add_argument("--prompt-change-every", type=int, default=None, metavar="N",
                   help="also measure the worst frame while the prompt changes every N frames")
    p.add_argument("--no-profile", action="store_true", help="skip the per-stage profile")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--kernels", action="store_true", help="CUDA: also list the frame's top kernels (profiler)")
    p.add_argument("--vae-overlap", action="store_true",
                   help="run TAESD next to the UNet on a parallel branch of the captured frame: faster frames, "
                        "each coming out 2 calls later (BENCHMARKS.md, issue 17)")
    p.add_argument("--compare-baseline", action="store_true",
                   help="also time StreamDiffusion's plain loop (torch.compile reduce-overhead on CUDA) on the "
                        "same model and settings in this process, and print how much faster the engine is")
    p.add_argument("--append-json", default=None, metavar="PATH", help="append the record to PATH (JSON lines)")
    p.add_argument("--json", dest="append_json", help=argparse.SUPPRESS)  # the old name (doctor's --json prints)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import run_bench

    if args.frames < 1 or args.warmup < 0:
        raise ValueError(f"--frames must be >= 1 and --warmup >= 0; got {args.frames}, {args.warmup}")
    if args.prompt_change_every is not None and args.prompt_change_every < 1:
        raise ValueError(f"--prompt-change-every must be >= 1; got {args.prompt_change_every}")
    if args.frame_buffer_size != 1:
        raise ValueError(f"--frame-buffer-size must be 1 for bench (it times one frame per call); "
                         f"got {args.frame_buffer_size}")
    check_engine_args(args)
    # --vae-overlap: a bench-only option for now (the engine flags are shared by every subcommand)
    engine = build_engine(args, **({"vae_overlap": True} if args.vae_overlap else {}))
    result = run_bench(engine, frames=args.frames, warmup=args.warmup,
                       prompt_change_every=args.prompt_change_every, profile=not args.no_profile,
                       flops=not args.no_flops, kernels=args.kernels)
    if args.compare_baseline:
        from ..bench import compare_baseline

        compare_baseline(engine, result, frames=args.frames, warmup=args.warmup)
    if args.append_json:
        with open(args.append_json, "a") as f:
            f.write(json.dumps(json.loads(result.to_json())) + "\n")
    print(result.table())  # the table is the command's output
    return 0
