"""`rtdiffusion demo --streams N`: the flag's checks and the multi-stream server's construction.

Imports stay light here (cli.py imports this module at parse time): the engine and the web stack load only
when :func:`build_group_server` runs. ``--streams 1`` (the default) is the single-engine app, unchanged.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from rtdiffusion.cli.common import add_option

log = logging.getLogger(__name__)

MAX_DEMO_STREAMS = 16
SINGLE_ENGINE_FLAGS = (("similar_filter", "--similar-filter"), ("controlnet", "--controlnet"),
                       ("ip_adapter", "--ip-adapter"), ("style_image", "--style-image"),
                       ("max_vram_gb", "--max-vram-gb"))


def add_streams_arg(p: argparse.ArgumentParser) -> None:
    add_option(p, "--streams", note=f"1 to {MAX_DEMO_STREAMS}: each control page drives its own stream "
               "(/?stream=i), each projector page shows one (/output?stream=i)")


def check_group_args(args: argparse.Namespace) -> None:
    """--streams and the flags a multi-stream group does not offer, before anything loads."""
    n = args.streams
    if not 1 <= n <= MAX_DEMO_STREAMS:
        raise ValueError(f"--streams must be from 1 to {MAX_DEMO_STREAMS}; got {n}")
    if n == 1:
        return
    used = [flag for dest, flag in SINGLE_ENGINE_FLAGS if getattr(args, dest, None) not in (None, [], ())]
    if used:
        raise ValueError(f"{', '.join(used)} cannot be used with --streams {n}: a multi-stream group serves prompt, "
                         "seed, strength, steps, guidance, delta and cfg per stream (the similar-frame filter, "
                         "ControlNets, IP-Adapters and --max-vram-gb are single-engine only for now)")
    if args.backend == "trt":
        raise ValueError(f"--backend trt cannot be used with --streams {n} yet (its UNet engine covers one stream's "
                         "rows); use --backend compiled, graph or auto")


def build_group_server(args: argparse.Namespace, options: Any):
    """Load the model once as a MultiStreamEngine of ``--streams`` streams and make the GroupServer for it;
    every stream starts with the controls given on the command line."""
    from rtdiffusion import MultiStreamEngine
    from rtdiffusion.cli.common import engine_kwargs
    from rtdiffusion.vocabulary import DEFAULT_STRENGTH, cli_spelling

    from .controls import Controls
    from .group_server import GroupServer

    kw = {k: v for k, v in engine_kwargs(args).items() if k != "max_vram_gb"}  # None: refused above otherwise
    log.info("loading %s once for %d streams", args.model, args.streams)
    with cli_spelling():
        group = MultiStreamEngine.from_pretrained(args.model, streams=args.streams, **kw)
    s = group.stream(0).status()  # strength / steps / t_index_list as the group resolved the flags
    strength = args.strength if args.strength is not None else s["strength"] if args.t_index_list else DEFAULT_STRENGTH
    controls = [Controls(prompt_a=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                         strength=strength, steps=s["steps"], t_index_list=s["t_index_list"], cfg=args.cfg,
                         guidance_scale=args.guidance, delta=args.delta) for _ in range(args.streams)]
    server = GroupServer(group, options, controls)
    server.apply_initial_controls()
    return server
