"""`rtdiffusion demo`: serve the live VJ web app.

    rtdiffusion demo --model stabilityai/sd-turbo                            # the model's own size
    rtdiffusion demo --model random:tiny --width 64 --height 64 --port 0     # any free port, logged
    rtdiffusion demo --model stabilityai/sd-turbo --controlnet random:controlnet-sd21:canny:0.8   # a ControlNet panel
    rtdiffusion demo --model random:sd15 --ip-adapter random:ip-adapter-sd15 --style-image look.png  # a style drop zone

Imports stay light here: FastAPI, uvicorn and the engine load only when the command runs. The engine
flags are the ones every subcommand shares (rtdiffusion/cli/common.py), the ControlNet / IP-Adapter ones
(--controlnet MODEL[:PREPROCESSOR[:SCALE]], --ip-adapter, --ip-adapter-scale, --style-image) included.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket

from rtdiffusion.cli.common import add_engine_args, add_option, build_engine, check_engine_args
from rtdiffusion.vocabulary import DEFAULT_STEPS, DEFAULT_STRENGTH

from .group_cli import add_streams_arg, check_group_args

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="serve the live VJ web app (camera in, live output, prompt/seed controls)",
        description="Serve a local web app: the control page at /, the projector page at /output.")
    add_engine_args(p, prompt={"note": "prompt A at start"}, seed={"note": "at start"},
                    strength={"note": "at start"}, steps={"note": "at start, up to --max-steps"})
    add_option(p, "--max-steps", note="the page offers (default 4)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 lets the network in)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--min-frame-ms", type=float, default=0.0,
                   help="make each frame take at least this long (a slow-engine setting for tests; default 0)")
    p.add_argument("--output-format", default="jpeg", choices=["jpeg", "rgb"],
                   help="frames to the browser: jpeg (small) or rgb (raw, no encode cost; loopback)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="1..100 (default 90)")
    p.add_argument("--presets", default=None, help="JSON file for the nine presets (loaded and saved)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer to this Host name (repeatable; default: only localhost, 127.0.0.1, [::1] "
                        "and the --host address); any extra name makes a token required")
    p.add_argument("--token", default=None,
                   help="every request must carry this token (made and logged at start when --allow-host is "
                        "given without one); open the page as /?token=TOKEN")
    p.add_argument("--record-dir", default=None,
                   help="folder for recordings made with the page's Record button (default: a new temp folder)")
    add_streams_arg(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535; got {args.port}")
    if not 1 <= args.max_steps <= 16:
        raise ValueError(f"--max-steps must be from 1 to 16; got {args.max_steps}")
    if args.frame_buffer_size != 1:
        raise ValueError(f"--frame-buffer-size must be 1 for demo (the page sends one frame at a time); "
                         f"got {args.frame_buffer_size}")
    check_engine_args(args)  # every engine flag, named as a flag, before the port is bound or the model loads
    check_group_args(args)
    steps = len(args.t_index_list) if args.t_index_list else args.steps or DEFAULT_STEPS
    if steps > args.max_steps:
        given = f"{steps} (the length of --t-index-list)" if args.t_index_list else str(steps)
        raise ValueError(f"--steps must be from 1 to --max-steps ({args.max_steps}); got {given}")
    if not 0.0 <= args.min_frame_ms <= 60_000:
        raise ValueError(f"--min-frame-ms must be from 0 to 60000; got {args.min_frame_ms}")


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name such as "localhost"
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port, "
                         f"or --port 0 for any free one") from None
    sock.listen(64)
    return sock


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from .protocol import Format
    from .server import Controls, DemoOptions, DemoServer

    options = DemoOptions(min_frame_ms=args.min_frame_ms,
                          output_format=Format.JPEG if args.output_format == "jpeg" else Format.RGB,
                          jpeg_quality=args.jpeg_quality, max_steps=args.max_steps, presets_path=args.presets,
                          bound_host=args.host, allowed_hosts=tuple(args.allow_host), token=args.token,
                          recordings_dir=args.record_dir)
    sock = _bind(args.host, args.port)  # first: a busy port fails before the model loads
    host, port = sock.getsockname()[:2]
    if args.streams > 1:  # one MultiStreamEngine, one stream per performer (group_cli.py)
        from .group_cli import build_group_server

        try:
            server = build_group_server(args, options)
        except BaseException:
            sock.close()
            raise
        return _serve(server, sock, host, port)
    try:
        log.info("loading %s", args.model)
        engine = _build_showing_progress(args, sock, host, port)
        s = engine.status()  # strength / steps / t_index_list as the engine resolved the flags
        server = DemoServer(engine, options, Controls(
            prompt_a=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
            strength=args.strength if args.strength is not None else
            s["strength"] if args.t_index_list else DEFAULT_STRENGTH, steps=s["steps"],
            t_index_list=s["t_index_list"], cfg=args.cfg, guidance_scale=args.guidance,
            delta=args.delta, similar_filter=args.similar_filter is not None,
            similar_threshold=s["similar_filter"]["threshold"]))
        server.apply_initial_controls()
        server.conditioning.note_style_files([path for path, _ in getattr(args, "style_image", None) or []])
    except BaseException:
        sock.close()
        raise
    return _serve(server, sock, host, port)


def _serve(server, sock, host: str, port: int) -> int:
    """Serve ``server``'s app on the bound socket until Ctrl-C."""
    import uvicorn

    from .conditioning import MAX_STYLE_BYTES

    if _is_ip(host) and not ipaddress.ip_address(host).is_loopback:
        log.warning("serving on %s: anyone who can reach this address can see the output and drive the engine",
                    host)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving http://%s:%d/  (projector page: http://%s:%d/output)", shown, port, shown, port)
    config = uvicorn.Config(server.app, log_level="warning", lifespan="on",
                            ws_max_size=max(4 * server.max_frame_bytes, MAX_STYLE_BYTES + (1 << 20)),
                            ws_ping_interval=20.0)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def _build_showing_progress(args: argparse.Namespace, sock, host: str, port: int):
    """The engine, built while the socket serves the build page (building.py): the stages, the progress and
    the estimate, until the web app takes the socket over."""
    from rtdiffusion.progress import BuildProgress

    from .building import BuildingPage
    from .server import STATIC_DIR

    page = BuildingPage(sock, STATIC_DIR)
    progress = BuildProgress([page])
    page.start()
    shown = f"[{host}]" if ":" in host else host
    log.info("building the engine; the build's progress: http://%s:%d/", shown, port)
    try:
        return build_engine(args, progress=progress)
    finally:
        page.stop()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
