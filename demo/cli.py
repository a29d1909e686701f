"""`rtdiffusion demo`: serve the live VJ web app.

    rtdiffusion demo --model stabilityai/sd-turbo --width 512 --height 512
    rtdiffusion demo --model random:tiny --width 64 --height 64 --port 0     # any free port, logged

Imports stay light here: FastAPI, uvicorn and the engine load only when the command runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="serve the live VJ web app (camera in, live output, prompt/seed controls)",
        description="Serve a local web app: the control page at /, the projector page at /output.")
    p.add_argument("--model", required=True, help="model id or folder (random:tiny for a quick test)")
    p.add_argument("--width", type=int, default=512, help="engine width in pixels (default 512)")
    p.add_argument("--height", type=int, default=512, help="engine height in pixels (default 512)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float16, bfloat16 or float32")
    p.add_argument("--backend", default="auto", help="auto, eager, graph, compiled or trt")
    p.add_argument("--prompt", default="", help="prompt A at start")
    p.add_argument("--negative-prompt", default="", help="negative prompt at start")
    p.add_argument("--seed", type=int, default=2, help="seed at start")
    p.add_argument("--strength", type=float, default=0.35,
                   help="0 keeps the input, 1 restyles fully (maps to t_index_list; default 0.35)")
    p.add_argument("--steps", type=int, default=1, help="denoising steps per frame at start (default 1)")
    p.add_argument("--max-steps", type=int, default=4, help="the most steps the page offers (default 4)")
    p.add_argument("--cfg", default="none", choices=["none", "self", "initialize", "full"],
                   help="residual CFG mode at start")
    p.add_argument("--guidance", type=float, default=1.2, help="guidance scale at start")
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
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535; got {args.port}")
    if not 0.0 <= args.strength <= 1.0:
        raise ValueError(f"--strength must be from 0 to 1; got {args.strength}")
    if not 1 <= args.max_steps <= 16:
        raise ValueError(f"--max-steps must be from 1 to 16; got {args.max_steps}")
    if not 1 <= args.steps <= args.max_steps:
        raise ValueError(f"--steps must be from 1 to --max-steps ({args.max_steps}); got {args.steps}")
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
    import uvicorn

    from rtdiffusion import StreamEngine

    from .protocol import Format
    from .server import Controls, DemoOptions, DemoServer, t_index_for

    options = DemoOptions(min_frame_ms=args.min_frame_ms,
                          output_format=Format.JPEG if args.output_format == "jpeg" else Format.RGB,
                          jpeg_quality=args.jpeg_quality, max_steps=args.max_steps, presets_path=args.presets,
                          bound_host=args.host, allowed_hosts=tuple(args.allow_host), token=args.token,
                          recordings_dir=args.record_dir)
    sock = _bind(args.host, args.port)  # first: a busy port fails before the model loads
    host, port = sock.getsockname()[:2]
    try:
        log.info("loading %s at %dx%d", args.model, args.width, args.height)
        engine = StreamEngine.from_pretrained(args.model, width=args.width, height=args.height, t_index_list=[32],
                                              cfg=args.cfg, device=args.device, dtype=args.dtype, seed=args.seed,
                                              backend=args.backend)
        server = DemoServer(engine, options, Controls(prompt_a=args.prompt, negative_prompt=args.negative_prompt,
                                                      seed=args.seed, strength=args.strength, steps=args.steps,
                                                      cfg=args.cfg, guidance_scale=args.guidance))
        server.controls.t_index_list = t_index_for(args.strength, args.steps, server.num_inference_steps)
        server.apply_initial_controls()
    except BaseException:
        sock.close()
        raise

    if _is_ip(host) and not ipaddress.ip_address(host).is_loopback:
        log.warning("serving on %s: anyone who can reach this address can see the output and drive the engine",
                    host)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving http://%s:%d/  (projector page: http://%s:%d/output)", shown, port, shown, port)
    config = uvicorn.Config(server.app, log_level="warning", lifespan="on",
                            ws_max_size=max(4 * server.max_frame_bytes, 1 << 20), ws_ping_interval=20.0)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
