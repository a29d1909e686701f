"""`rtdiffusion td`: the TouchDesigner / OSC bridge process.

    rtdiffusion td --model stabilityai/sd-turbo --width 512 --height 512 --flip-rows

Runs until OSC /stop, Ctrl-C or SIGTERM, then unlinks the rings it created. Exit codes: 0 after a stop,
2 for a bad flag (the message says what was expected).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from rtdiffusion.cli.common import add_engine_args, add_option, check_engine_args, engine_kwargs, style_images

from .bridge import Bridge, BridgeConfig, State
from .ring import PixelFormat, RowOrder

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "td", help="TouchDesigner / OSC bridge: shared-memory frame rings and OSC control",
        description="Run the engine behind a shared-memory input ring, an output ring and an OSC port. "
                    "See docs/touchdesigner.md.")
    p.add_argument("--osc-in-port", type=int, default=8247, help="UDP port for control (0: pick a free one "
                   "and announce it as /stream-info/osc-in-port)")
    p.add_argument("--osc-out-port", type=int, default=8248, help="UDP port status messages are sent to")
    p.add_argument("--osc-host", default="127.0.0.1", help="host status messages are sent to")
    p.add_argument("--osc-listen", default="127.0.0.1", help="address to receive control on "
                   "(0.0.0.0 for other machines)")
    p.add_argument("--input-name", default=None, help="shared-memory name of the input ring (default rtd_in_<pid>)")
    p.add_argument("--output-name", default=None, help="shared-memory name of the output ring (default rtd_out_<pid>)")
    p.add_argument("--control-ring", default=None, metavar="NAME",
                   help="shared-memory name of the control ring, whose newest frame is the control image of every "
                        "--controlnet MODEL:external (default rtd_ctl_<pid>; made only when there is one)")
    p.add_argument("--style-ring", default=None, metavar="NAME",
                   help="shared-memory name of the style ring, whose frame is the IP-Adapter's style image, encoded "
                        "when a different picture arrives or on /ipadapter_update (default rtd_sty_<pid>; made "
                        "only with --ip-adapter)")
    p.add_argument("--pixel-format", default="rgba8", choices=[f.value for f in PixelFormat],
                   help="pixel layout of both rings")
    p.add_argument("--flip-rows", action="store_true",
                   help="rings hold rows bottom-up, as TouchDesigner's TOP.numpyArray() returns them "
                        "(the flip then happens on the device, not in TouchDesigner's Python)")
    p.add_argument("--slots", type=int, default=3, help="frames per ring (1-16)")
    p.add_argument("--checksum", action="store_true", help="crc32 every frame (recommended on ARM hosts)")
    add_option(p, "--streams", note="1-64; with N >= 2 each stream has its own ring pair (the ring names with "
               "'-<i>', or comma-separated lists) and OSC namespace /stream/<i>/...; see docs/touchdesigner.md")
    add_engine_args(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BridgeConfig:
    opts = engine_kwargs(args)
    del opts["width"], opts["height"]  # BridgeConfig's own fields
    return BridgeConfig(
        model=args.model, width=args.width, height=args.height, osc_host=args.osc_host, osc_listen=args.osc_listen,
        osc_in_port=args.osc_in_port, osc_out_port=args.osc_out_port, input_name=args.input_name,
        output_name=args.output_name, pixel_format=PixelFormat.parse(args.pixel_format),
        row_order=RowOrder.BOTTOM_UP if args.flip_rows else RowOrder.TOP_DOWN, slots=args.slots,
        checksum=args.checksum, engine_options=opts, control_name=args.control_ring, style_name=args.style_ring,
        style_image=style_images(args))


def run(args: argparse.Namespace) -> int:
    if getattr(args, "streams", 1) != 1:  # several streams from one engine: multi_cli.py
        from .multi_cli import run_multi
        return run_multi(args)
    config = config_from_args(args)
    if args.frame_buffer_size != 1:
        raise ValueError(f"--frame-buffer-size must be 1 for td (the rings carry one frame per step); "
                         f"got {args.frame_buffer_size}")
    check_engine_args(args)  # every engine flag, named as a flag, before anything opens or loads
    if args.control_ring and not config.external_controlnets:
        raise ValueError("--control-ring carries the control image of ControlNets with the 'external' "
                         "preprocessor; add one, e.g. --controlnet MODEL:external")
    if args.style_ring and not args.ip_adapter:
        raise ValueError("--style-ring carries the IP-Adapter's style image; it needs --ip-adapter MODEL")
    return serve_until_stopped(Bridge(config))


def serve_until_stopped(bridge) -> int:
    """Serve ``bridge`` (a Bridge or a MultiBridge) until OSC /stop, Ctrl-C or SIGTERM; 0 after a stop."""

    def on_term(signum, frame):
        log.info("signal %d: stopping", signum)
        bridge.stop.set()
        if bridge.state in (State.LOADING, State.BUILDING):
            raise KeyboardInterrupt  # loading cannot poll the stop flag; unwind it (close() still runs)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        return bridge.serve()
    except KeyboardInterrupt:
        log.info("stopped")
        return 0
