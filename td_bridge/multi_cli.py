"""`rtdiffusion td --streams N` (N >= 2): the multi-stream bridge's part of the td command.

cli.py registers ``--streams`` and hands over here when it is not 1; everything is checked (flags named)
before anything opens or loads.
"""

from __future__ import annotations

import argparse
import logging

from rtdiffusion.cli.common import check_engine_args

from .multi_bridge import MultiBridge
from .multi_config import MultiConfig, ring_names

log = logging.getLogger(__name__)

# flags of the single bridge a multi-stream group does not have yet (docs/multistream.md, "Not in a group yet")
SINGLE_ONLY = (("similar_filter", "--similar-filter"), ("controlnet", "--controlnet"),
               ("ip_adapter", "--ip-adapter"), ("style_image", "--style-image"), ("control_ring", "--control-ring"),
               ("style_ring", "--style-ring"), ("max_vram_gb", "--max-vram-gb"))


def config_from_args(args: argparse.Namespace) -> MultiConfig:
    from .cli import config_from_args as single_config

    n = args.streams
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"--streams must be an integer from 1 to 64 (1: the single-stream bridge, 2 or more: one "
                         f"engine serving that many streams); got {n!r}")
    for attr, flag in SINGLE_ONLY:
        if getattr(args, attr, None) not in (None, False, [], ()):
            raise ValueError(f"{flag} is not available with --streams {n} yet (a multi-stream group has no "
                             "similar-frame filter, ControlNets, IP-Adapter or weight streaming); use --streams 1")
    if args.frame_buffer_size != 1:
        raise ValueError(f"--frame-buffer-size must be 1 for td (the rings carry one frame per step); "
                         f"got {args.frame_buffer_size}")
    base = single_config(argparse.Namespace(**{**vars(args), "input_name": None, "output_name": None}))
    return MultiConfig(base, n, ring_names(args.input_name, "rtd_in", n, "--input-name"),
                       ring_names(args.output_name, "rtd_out", n, "--output-name"))


def run_multi(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_engine_args(args)  # every engine flag, named as a flag, before anything opens or loads
    from .cli import serve_until_stopped

    return serve_until_stopped(MultiBridge(config))
