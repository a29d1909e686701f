"""Engine options shared by every subcommand that builds an engine (run, bench, td, demo, build)."""

from __future__ import annotations

import argparse
from typing import Any


def add_engine_args(p: argparse.ArgumentParser, *, default_model: str | None = None) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", required=default_model is None, default=default_model,
                   help="hub id, local diffusers folder, or random:sd-turbo | random:sd15 | random:tiny "
                        "(random weights: noise-like pictures, for speed tests and demos only)")
    g.add_argument("--width", type=int, default=None, help="pixels (default: the model's own size)")
    g.add_argument("--height", type=int, default=None, help="pixels (default: the model's own size)")
    g.add_argument("--t-index", type=int, nargs="+", default=[32], metavar="I",
                   help="denoising steps as indices into 50 timesteps, noisiest first (default: 32)")
    g.add_argument("--cfg", default="none", choices=["none", "self", "initialize", "full"],
                   help="residual classifier-free guidance mode (default: none)")
    g.add_argument("--guidance", type=float, default=1.2, help="guidance scale; <= 1 disables guidance")
    g.add_argument("--delta", type=float, default=1.0, help="RCFG delta")
    g.add_argument("--prompt", default="", help="the prompt")
    g.add_argument("--negative-prompt", default="", help="the negative prompt (cfg initialize / full)")
    g.add_argument("--seed", type=int, default=2)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", help="auto | float16 | bfloat16 | float32")
    g.add_argument("--backend", default="auto", choices=["auto", "eager", "graph", "compiled", "trt"])
    g.add_argument("--compile-preset", default="default", choices=["default", "fast", "max"],
                   help="backend compiled: Inductor settings (fast/max: frozen weights, longer compile)")
    g.add_argument("--compile-artifacts", default="auto", choices=["auto", "jit", "aoti"],
                   help="backend compiled: torch.compile (jit) or AOTInductor packages kept in the engine "
                        "cache, loaded on restart without compiling (aoti); auto: jit on CUDA, aoti on the CPU")
    g.add_argument("--vae", default="tiny", choices=["tiny", "kl"], help="TAESD (default) or the full KL VAE")
    g.add_argument("--frame-buffer", type=int, default=1, help="frames per UNet call")
    g.add_argument("--max-vram-gb", type=float, default=None,
                   help="stream UNet weights from host memory to fit this budget (low-VRAM mode)")
    g.add_argument("--similar-filter", type=float, default=None, metavar="THRESHOLD",
                   help="skip frames more similar than THRESHOLD (0..1) to the last processed one")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = dict(width=args.width, height=args.height, t_index_list=args.t_index, cfg=args.cfg,
              guidance_scale=args.guidance, delta=args.delta, prompt=args.prompt,
              negative_prompt=args.negative_prompt, seed=args.seed, device=args.device, dtype=args.dtype,
              backend=args.backend, vae=args.vae, frame_buffer_size=args.frame_buffer,
              max_vram_gb=args.max_vram_gb, compile_preset=args.compile_preset,
              compile_artifacts=args.compile_artifacts)
    if args.similar_filter is not None:
        kw.update(similar_filter=True, similar_threshold=args.similar_filter)
    return kw


def build_engine(args: argparse.Namespace):
    from ..engine import StreamEngine

    return StreamEngine.from_pretrained(args.model, **engine_kwargs(args))
