"""The flags the subcommands share, defined once: one name, one meaning, one help text.

``run``, ``bench``, ``td``, ``demo`` and ``build`` add their options from :data:`OPTIONS` (through
:func:`add_engine_args` or :func:`add_option`), so ``--strength`` means the same in all of them, and so do
``--steps``, ``--t-index-list`` (experts), ``--guidance`` (a number), ``--cfg`` (a mode), ``--frames`` (how
many frames to process), ``--frame-buffer-size`` (frames per UNet call), ``--width``/``--height`` (default:
the model's own size) and ``--threads``. tests/test_cli_vocabulary.py holds every subcommand to this.

Old spellings stay as hidden aliases: ``--t-index`` (= ``--t-index-list``), ``--frame-buffer``
(= ``--frame-buffer-size``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..vocabulary import DEFAULT_STEPS, DEFAULT_STRENGTH, MAX_STEPS, cli_spelling

log = logging.getLogger(__name__)


def pixels(text: str) -> int:
    """--width / --height: a multiple of 8 from 8 to 4096 (leave the flag out for the model's own size)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels; got {text!r}") from None
    if not 8 <= v <= 4096 or v % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 from 8 to 4096 pixels (leave it out for the "
                                         f"model's own size); got {v}")
    return v


def threads(text: str) -> int | None:
    """--threads: 'auto' (None) or a count from 1 to 1024."""
    if text == "auto":
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number; got {text!r}") from None
    if not 1 <= v <= 1024:
        raise argparse.ArgumentTypeError(f"must be 'auto' or from 1 to 1024; got {v}")
    return v


PREPROCESSORS = ("canny", "tile", "depth", "external")  # rtdiffusion.control.preprocess.PreprocessorKind's values
MAX_CONTROL_SCALE = 5.0
MAX_CONTROLNETS = 8
CONTROLNET_FORM = "MODEL[:PREPROCESSOR[:SCALE]]"


def _scale(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a number; got {text!r}") from None
    if not v == v or not 0.0 <= v <= MAX_CONTROL_SCALE:  # NaN fails both
        raise argparse.ArgumentTypeError(f"{what} must be a number from 0 to {MAX_CONTROL_SCALE:g}; got {text!r}")
    return v


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def controlnet_spec(text: str) -> dict[str, Any]:
    """--controlnet MODEL[:PREPROCESSOR[:SCALE]] -> {"model", "preprocessor"?, "scale"?} for from_pretrained.
    Split from the right, so model names with colons (random:controlnet-sd21, C:\\models\\cn) keep them."""
    model, scale, preprocessor = text, None, None
    head, sep, tail = model.rpartition(":")
    if sep and head and _is_number(tail):
        scale, model = _scale(tail, f"the scale in {text!r}"), head
        head, sep, tail = model.rpartition(":")
    if sep and head and tail.lower() in PREPROCESSORS:
        preprocessor, model = tail.lower(), head
    elif scale is not None:
        raise argparse.ArgumentTypeError(
            f"{tail!r} in {text!r} is not a preprocessor; expected {CONTROLNET_FORM} with PREPROCESSOR one of "
            f"{', '.join(PREPROCESSORS)}")
    if not model.strip() or model.startswith(":"):
        raise argparse.ArgumentTypeError(f"expected {CONTROLNET_FORM}; got {text!r} (no model)")
    spec: dict[str, Any] = {"model": model}
    if preprocessor is not None:
        spec["preprocessor"] = preprocessor
    if scale is not None:
        spec["scale"] = scale
    return spec


def style_image(text: str) -> tuple[str, float]:
    """--style-image PATH[:WEIGHT] -> (path, weight); the weight defaults to 1."""
    head, sep, tail = text.rpartition(":")
    if sep and head and _is_number(tail):
        w = float(tail)
        if not w == w or not 0.0 < w <= 1000.0:
            raise argparse.ArgumentTypeError(f"the weight in {text!r} must be a number above 0 (at most 1000); "
                                             f"got {tail!r}")
        return head, w
    if not text:
        raise argparse.ArgumentTypeError("expected PATH[:WEIGHT]; got an empty path")
    return text, 1.0


def ip_scale(text: str) -> float:
    return _scale(text, "the IP-Adapter scale")


CFG_MODES = ["none", "self", "initialize", "full"]
BACKENDS = ["auto", "eager", "graph", "compiled", "trt"]

# flag -> argparse keywords. "help" is the shared meaning; a subcommand may append to it (note=) and may
# change the default or the choices, never the name, the type or the meaning.
OPTIONS: dict[str, dict[str, Any]] = {
    "--model": dict(help="hub id (stabilityai/sd-turbo, stabilityai/sdxl-turbo, ...), local diffusers folder, one "
                         ".safetensors checkpoint, or random:sd-turbo | random:sd15 | random:sdxl-turbo | "
                         "random:sdxl | random:tiny | random:tiny-sdxl (random weights: noise-like pictures, for "
                         "speed tests and demos only); the default size is the model's own (SDXL-Turbo 512, "
                         "SDXL base 1024)"),
    "--width": dict(type=pixels, default=None, metavar="PX",
                    help="frame width in pixels, a multiple of 8 (default: the model's own size)"),
    "--height": dict(type=pixels, default=None, metavar="PX",
                     help="frame height in pixels, a multiple of 8 (default: the model's own size)"),
    "--strength": dict(type=float, default=None, metavar="S",
                       help=f"0 keeps the input, 1 restyles it fully (default {DEFAULT_STRENGTH}); with --steps, "
                            "the friendly form of --t-index-list"),
    "--steps": dict(type=int, default=None, metavar="N",
                    help=f"denoising steps per frame, 1-{MAX_STEPS} (default {DEFAULT_STEPS}); N steps: better "
                         "pictures, N x the UNet work, N-1 frames of latency"),
    "--t-index-list": dict(type=int, nargs="+", default=None, metavar="I",
                           help="experts, instead of --strength/--steps: the denoising steps as indices into the "
                                "scheduler's 50 timesteps, noisiest first (e.g. 20 35)"),
    "--cfg": dict(default="none", choices=CFG_MODES,
                  help="residual classifier-free guidance mode: none (fastest), self, initialize, full "
                       "(twice the UNet work) (default none)"),
    "--guidance": dict(type=float, default=1.2, metavar="SCALE",
                       help="guidance scale, a number; <= 1 disables guidance (default 1.2)"),
    "--delta": dict(type=float, default=1.0, help="residual CFG delta (default 1.0)"),
    "--prompt": dict(default="", help="the prompt (default empty)"),
    "--negative-prompt": dict(default="", help="the negative prompt (used by --cfg initialize / full)"),
    "--seed": dict(type=int, default=2, help="noise seed (default 2)"),
    "--device": dict(default="auto", help="auto | cpu | cuda | cuda:N (default auto: CUDA when torch sees it)"),
    "--dtype": dict(default="auto", help="auto | float16 | bfloat16 | float32 (default auto: float16 on a GPU, "
                                         "float32 on the CPU)"),
    "--backend": dict(default="auto", choices=BACKENDS,
                      help="how the networks run: eager, graph (CUDA graphs), compiled (Inductor), trt (TensorRT); "
                           "auto picks the fastest usable one"),
    "--threads": dict(type=threads, default=None, metavar="N",
                      help="torch threads for CPU inference, or auto (default auto: half the cores, at most 8, "
                           "so other programs on the machine do not slow the engine down); ignored on CUDA"),
    "--compile-preset": dict(default="default", choices=["default", "fast", "max"],
                             help="backend compiled: Inductor settings (fast/max: frozen weights, longer compile)"),
    "--compile-artifacts": dict(default="auto", choices=["auto", "jit", "aoti"],
                                help="backend compiled: torch.compile (jit) or AOTInductor packages kept in the "
                                     "engine cache, loaded on restart without compiling (aoti); auto: jit on CUDA, "
                                     "aoti on the CPU"),
    "--vae": dict(default="tiny", choices=["tiny", "kl"], help="tiny (TAESD, default) or kl (the model's full VAE)"),
    "--vae-id": dict(default=None, metavar="ID_OR_FOLDER",
                     help="another VAE of the --vae kind, by hub id or local folder (e.g. --vae kl --vae-id "
                          "madebyollin/sdxl-vae-fp16-fix runs SDXL's KL VAE in float16; default: the model's own)"),
    "--frame-buffer-size": dict(type=int, default=1, metavar="F",
                                help="frames per UNet call, 1-16: more throughput, F-1 frames more latency "
                                     "(default 1)"),
    "--max-vram-gb": dict(type=float, default=None,
                          help="stream UNet weights from host memory to fit this budget (low-VRAM mode)"),
    "--similar-filter": dict(type=float, default=None, metavar="THRESHOLD",
                             help="skip frames more similar than THRESHOLD (0..1) to the last processed one"),
    "--frames": dict(type=int, metavar="N", help="how many frames to process"),
    "--max-steps": dict(type=int, default=4, metavar="N", help="the most --steps"),
    "--controlnet": dict(type=controlnet_spec, action="append", default=None, metavar=CONTROLNET_FORM,
                         help="add a ControlNet (repeatable, up to 8): hub id, folder, .safetensors or "
                              "random:controlnet-sd15 | sd21 | sdxl | tiny | tiny-sdxl (random weights); "
                              "PREPROCESSOR canny (default) | tile | depth | external (the control image comes "
                              "from outside: --control-video in run, the control ring in td); SCALE the "
                              "conditioning scale, 0-5 (default 1), e.g. random:controlnet-tiny:canny:0.8"),
    "--ip-adapter": dict(default=None, metavar="MODEL",
                         help="IP-Adapter weights: an h94 .bin / .safetensors file, or random:ip-adapter-sd15 | plus-sd15 | "
                              "full-face-sd15 | sd15-vit-g | sdxl (ViT-bigG encoder) | sdxl-vit-h | plus-sdxl | tiny "
                              "(random weights, one name per published file: docs/ip_adapter.md); none exists for "
                              "SD 2.x / sd-turbo"),
    "--ip-adapter-scale": dict(type=ip_scale, default=None, metavar="S",
                               help="how strongly the style image steers the picture, 0-5 (default 0.6); needs "
                                    "--ip-adapter"),
    "--style-image": dict(type=style_image, action="append", default=None, metavar="PATH[:WEIGHT]",
                          help="the IP-Adapter's style image (repeatable: several are blended by their weights, "
                               "default 1 each); encoded once, never per frame; needs --ip-adapter"),
    "--streams": dict(type=int, default=1, metavar="N",
                      help="independent streams served by one engine: one model in memory, their rows in one UNet "
                           "call per tick (default 1: a single engine; docs/multistream.md)"),
    "--engine-dir": dict(default=None, metavar="DIR", help="engine cache root (default $RTDIFFUSION_CACHE or "
                                                             "~/.cache/rtdiffusion/engines)"),
}
# hidden, deprecated spellings -> the flag they stand for
ALIASES = {"--t-index": "--t-index-list", "--frame-buffer": "--frame-buffer-size"}

CONTROL_OPTIONS = ["--controlnet", "--ip-adapter", "--ip-adapter-scale", "--style-image"]
ENGINE_OPTIONS = ["--model", "--width", "--height", "--strength", "--steps", "--t-index-list", "--cfg", "--guidance",
                  "--delta", "--prompt", "--negative-prompt", "--seed", "--device", "--dtype", "--backend",
                  "--threads", "--compile-preset", "--compile-artifacts", "--vae", "--vae-id", "--frame-buffer-size",
                  "--max-vram-gb", "--similar-filter"]


class Renamed(argparse.Action):
    """A hidden old flag whose meaning moved elsewhere: using it is an error that says where."""

    def __init__(self, option_strings, dest, message: str, **kw):
        super().__init__(option_strings, dest, **kw)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(self.message)


class Deprecated(argparse.Action):
    """A hidden old spelling that still works, with a warning naming the new one."""

    def __init__(self, option_strings, dest, message: str, **kw):
        super().__init__(option_strings, dest, **kw)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        log.warning("%s", self.message)
        setattr(namespace, self.dest, values)


def add_option(p: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, *, note: str | None = None,
               **override: Any) -> argparse.Action:
    """Add the shared ``flag``; ``override`` may set default, choices or required, ``note`` extends the help."""
    if set(override) - {"default", "choices", "required"}:  # (note= and these only)
        raise TypeError(f"{flag}: only default, choices and required may differ between subcommands")
    kw = {**OPTIONS[flag], **override}
    if note:
        kw["help"] = f"{kw['help']}; {note}"
    action = p.add_argument(flag, **kw)
    for alias, target in ALIASES.items():
        if target == flag:
            hidden = {k: v for k, v in kw.items() if k not in ("help", "required")}
            p.add_argument(alias, dest=action.dest, help=argparse.SUPPRESS, **hidden)
    return action


def add_engine_args(p: argparse.ArgumentParser, *, skip: tuple[str, ...] = (), **overrides: dict[str, Any]) -> None:
    """Every engine option (less ``skip``) in an "engine" group. ``overrides``: flag name without dashes
    and with underscores (e.g. ``model``) -> keywords for :func:`add_option`."""
    g = p.add_argument_group("engine")
    for flag in ENGINE_OPTIONS:
        if flag in skip:
            continue
        kw = overrides.get(flag.lstrip("-").replace("-", "_"), {})
        if flag == "--model":
            kw = {"required": True, **kw}
        add_option(g, flag, **kw)
    c = p.add_argument_group("conditioning (ControlNet, IP-Adapter)")
    for flag in CONTROL_OPTIONS:
        if flag not in skip:
            add_option(c, flag, **overrides.get(flag.lstrip("-").replace("-", "_"), {}))


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """StreamEngine.from_pretrained keywords from the parsed engine options."""
    kw = dict(width=args.width, height=args.height, strength=args.strength, steps=args.steps,
              t_index_list=args.t_index_list, cfg=args.cfg, guidance_scale=args.guidance, delta=args.delta,
              prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, device=args.device,
              dtype=args.dtype, backend=args.backend, vae=args.vae, vae_id=args.vae_id, frame_buffer_size=args.frame_buffer_size,
              max_vram_gb=args.max_vram_gb, compile_preset=args.compile_preset,
              compile_artifacts=args.compile_artifacts, threads=args.threads)
    if args.similar_filter is not None:
        kw.update(similar_filter=True, similar_threshold=args.similar_filter)
    kw.update(control_kwargs(args))
    return kw


def control_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """controlnets= and ip_adapter= for from_pretrained, only when given (an engine without them is as before)."""
    kw: dict[str, Any] = {}
    if getattr(args, "controlnet", None):
        kw["controlnets"] = [dict(spec) for spec in args.controlnet]
    if getattr(args, "ip_adapter", None):
        ip: dict[str, Any] = {"model": args.ip_adapter}
        if args.ip_adapter_scale is not None:
            ip["scale"] = args.ip_adapter_scale
        kw["ip_adapter"] = ip
    return kw


def style_images(args: argparse.Namespace):
    """What engine.set_style_image takes for --style-image: one path, or [(path, weight), ...]; None if none."""
    images = getattr(args, "style_image", None)
    if not images:
        return None
    if len(images) == 1 and images[0][1] == 1.0:
        return images[0][0]
    return [(path, w) for path, w in images]


def check_control_args(args: argparse.Namespace) -> None:
    """The conditioning flags, together, before anything loads: one-line errors naming the flags."""
    from ..errors import ConfigError

    nets = getattr(args, "controlnet", None) or []
    if len(nets) > MAX_CONTROLNETS:
        raise ConfigError(f"--controlnet: at most {MAX_CONTROLNETS} ControlNets; got {len(nets)}")
    if not getattr(args, "ip_adapter", None):
        for flag, value in (("--style-image", getattr(args, "style_image", None)),
                            ("--ip-adapter-scale", getattr(args, "ip_adapter_scale", None))):
            if value:
                raise ConfigError(f"{flag} needs --ip-adapter MODEL (the IP-Adapter that reads the style image)")
    for path, _ in getattr(args, "style_image", None) or []:
        check_image(path, "--style-image")
    _check_models(args, nets)
    if hasattr(args, "control_video"):  # run: the 'external' ControlNets read the second video
        external = [i for i, spec in enumerate(nets) if spec.get("preprocessor") == "external"]
        if external and not args.control_video:
            raise ConfigError(f"--controlnet {nets[external[0]]['model']}:external (ControlNet {external[0]}) "
                              f"takes its control image from --control-video PATH; give one, or another "
                              f"preprocessor ({', '.join(p for p in PREPROCESSORS if p != 'external')})")
        if args.control_video and not external:
            raise ConfigError("--control-video feeds ControlNets with the 'external' preprocessor; add one, e.g. "
                              "--controlnet MODEL:external")


def _check_models(args: argparse.Namespace, nets: list[dict[str, Any]]) -> None:
    """The cheap model checks, before loading: a random: ControlNet's name, the IP-Adapter's family."""
    from ..control import controlnet, ip_adapter
    from ..errors import ConfigError

    for spec in nets:
        model = spec["model"]
        if model.startswith("random:") and model[len("random:"):] not in controlnet.RANDOM_CONTROLNETS:
            raise ConfigError(f"--controlnet {model}: unknown random ControlNet; expected one of "
                              f"{', '.join('random:' + k for k in controlnet.RANDOM_CONTROLNETS)}, a hub id, a "
                              f"folder or a .safetensors file")
    if getattr(args, "ip_adapter", None):
        try:
            ip_adapter.check_family_early(ip_adapter.IPAdapterSpec.parse(args.ip_adapter), args.model)
        except ConfigError as exc:
            raise ConfigError(f"--ip-adapter {args.ip_adapter}: {exc}") from None


def check_image(path: str, flag: str) -> None:
    """A readable image file, or a ConfigError naming ``flag`` and what was wrong."""
    import os

    from ..errors import ConfigError

    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path!r}: no such file")
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... on a bad file
        raise ConfigError(f"{flag} {path!r} is not a readable image (PNG, JPEG, ...): {exc}") from None


def check_engine_args(args: argparse.Namespace) -> None:
    """Check every engine option before anything loads or opens, with errors that name the flags."""
    from ..backends import choose_backend, tensorrt_usable
    from ..config import (Backend, EngineConfig, FilterSettings, StreamSettings, VaeKind, apply_updates,
                          parse_device, parse_dtype, parse_enum)
    from ..errors import ConfigError

    with cli_spelling():
        dev = parse_device(args.device)
        dt = parse_dtype(args.dtype, dev)
        config = EngineConfig(args.model, args.width or 512, args.height or 512, dev, dt,
                              parse_enum(Backend, args.backend, "backend"), parse_enum(VaeKind, args.vae, "vae"),
                              args.frame_buffer_size, max_vram_gb=args.max_vram_gb,
                              compile_preset=args.compile_preset, compile_artifacts=args.compile_artifacts)
        if config.backend in (Backend.GRAPH, Backend.TRT) and dev.type != "cuda":
            raise ConfigError(f"--backend {args.backend} needs a CUDA device; torch sees none. Use --backend eager, "
                              "compiled or auto on the CPU")
        if config.backend is Backend.TRT:
            trt_ok, trt_why = tensorrt_usable()
            if not trt_ok:
                raise ConfigError(f"--backend trt needs TensorRT 10.1+ or 11.x: {trt_why}; use --backend graph or "
                                  "compiled without it")
        choose_backend(config)
        threshold = 0.98 if args.similar_filter is None else args.similar_filter
        apply_updates(StreamSettings(filter=FilterSettings(args.similar_filter is not None, threshold)),
                      config.num_inference_steps, strength=args.strength, steps=args.steps,
                      t_index_list=args.t_index_list, cfg=args.cfg, guidance_scale=args.guidance, delta=args.delta)
        check_control_args(args)


def build_engine(args: argparse.Namespace, progress=None, **extra: Any):
    """The engine for the parsed options; errors while it is built name the flags. The build's stages go to
    stderr (cli/progress_view.py) unless --no-progress was given, and to ``progress``'s listeners."""
    from ..engine import StreamEngine
    from ..progress import BuildProgress
    from .progress_view import TerminalProgress

    if not getattr(args, "no_progress", False):
        progress = progress or BuildProgress()
        progress.subscribe(TerminalProgress())
    with cli_spelling():
        engine = StreamEngine.from_pretrained(args.model, **engine_kwargs(args), progress=progress, **extra)
        images = style_images(args)
        if images is not None:
            engine.set_style_image(images)
        return engine
