"""`rtdiffusion build`: build engines ahead of time into the engine cache, with progress.

    rtdiffusion build --model stabilityai/sd-turbo --backend trt --width 512 --height 512 \
        --min-steps 1 --max-steps 4                     # ONNX export + three TensorRT engines
    rtdiffusion build --model random:tiny --export-only # ONNX only (works without a GPU or TensorRT)
    rtdiffusion build --model M --backend compiled --compile-artifacts aoti   # AOTInductor packages
    rtdiffusion build --model M --backend compiled      # jit on CUDA: warms Inductor's on-disk caches

The UNet engine covers every stream batch from min-steps x F to max-steps x F (F: --frame-buffer-size;
x2 with --cfg full), so switching --steps or the guidance mode at run time never needs a rebuild. Everything that
changes an engine (weights, LoRA, size, batch range, dtype, library versions, GPU, build options) is in
its cache key: see docs/engines.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..backends import TRT_GUIDANCE, TRT_MAX_STEPS, TRT_MIN_STEPS, check_aoti_on_cuda, prepare_cuda_modules
from ..progress import LOAD, NETWORKS, NO_STAGE, TRT, BuildProgress
from ..vocabulary import cli_spelling
from .common import Deprecated, Renamed, add_option
from .progress_view import TerminalProgress

log = logging.getLogger(__name__)

BACKENDS = ("trt", "compiled")


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="build engines ahead of time into the engine cache",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_option(p, "--model", required=True)
    add_option(p, "--backend", default="trt", choices=list(BACKENDS),
               note=f"build makes {' or '.join(BACKENDS)} engines (default trt)")
    p.add_argument("--export-only", action="store_true",
                   help="export the ONNX files into the cache and stop (no GPU or TensorRT needed)")
    add_option(p, "--width")
    add_option(p, "--height")
    p.add_argument("--min-steps", type=int, default=TRT_MIN_STEPS, metavar="N", help="the fewest --steps the "
                   f"engine must run (default {TRT_MIN_STEPS}, as the engine loads)")
    add_option(p, "--max-steps", default=TRT_MAX_STEPS, note=f"the engine must run (default {TRT_MAX_STEPS}, as the "
               "engine loads)")
    add_option(p, "--frame-buffer-size")
    add_option(p, "--cfg", default=TRT_GUIDANCE, note=f"build covers this mode and every cheaper one (default "
               f"{TRT_GUIDANCE}, as the engine loads)")
    add_option(p, "--vae")
    add_option(p, "--vae-id")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA to fuse (repeatable)")
    add_option(p, "--dtype")
    add_option(p, "--device")
    add_option(p, "--threads")
    add_option(p, "--engine-dir")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimisation level 0-5 (default 3)")
    p.add_argument("--workspace-gb", type=float, default=None, help="TensorRT builder workspace cap")
    add_option(p, "--compile-preset")
    add_option(p, "--compile-artifacts")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime parity check of CPU exports")
    # old spellings: --frames (was frames per call) says where it went; --guidance MODE still works, with a warning
    p.add_argument("--frames", action=Renamed, nargs="?", help=argparse.SUPPRESS,
                   message="build has no --frames: frames per UNet call is --frame-buffer-size")
    p.add_argument("--guidance", action=Deprecated, dest="cfg", help=argparse.SUPPRESS,
                   message="build --guidance MODE is deprecated: use --cfg MODE (--guidance is the guidance scale, "
                           "a number, in every other subcommand)")
    p.set_defaults(func=run)


def _parse_lora(items: list[str]) -> tuple[tuple[str, float], ...]:
    out = []
    for item in items:
        path, sep, scale = item.rpartition(":")
        if not sep or not _is_float(scale):
            path, scale = item, "1.0"
        out.append((path, float(scale)))
    return tuple(out)


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    import torch

    from engines.cache import EngineCache
    from engines.specs import AxisRange, SpecParams, make_specs, unet_batch_range
    from engines.versions import lora_identity, weights_fingerprint

    from ..config import (CfgMode, CompileArtifacts, VaeKind, parse_device, parse_dtype, parse_enum, parse_threads,
                          set_cpu_threads)
    from ..models.loading import load_components

    # ---- validate every flag before any work (boundary) ----
    with cli_spelling():
        if args.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}; got {args.backend!r}")
        vae_kind = parse_enum(VaeKind, args.vae, "vae")
        cfg = parse_enum(CfgMode, args.cfg, "cfg")
        if not 1 <= args.min_steps <= args.max_steps <= 16:
            raise ValueError(f"--min-steps and --max-steps need 1 <= min_steps <= max_steps <= 16; "
                             f"got {args.min_steps}, {args.max_steps}")
        if not 1 <= args.frame_buffer_size <= 16:
            raise ValueError(f"--frame-buffer-size must be from 1 to 16; got {args.frame_buffer_size}")
        batch = unet_batch_range(args.min_steps, args.max_steps, args.frame_buffer_size, cfg.value)
        threads = parse_threads(args.threads)
    if args.backend == "trt" and not args.export_only:
        from engines.trt_build import TensorRTUnavailable, TrtBuildOptions, import_tensorrt

        try:
            import_tensorrt()
        except TensorRTUnavailable as exc:
            why = f"{type(exc.__cause__).__name__}: {exc.__cause__}" if exc.__cause__ else str(exc)
            log.error("cannot build TensorRT engines here (%s). Install TensorRT (10.1+ or 11.x) with pip install "
                      "'rtdiffusion[tensorrt]' on a machine with an NVIDIA GPU and driver, or build with "
                      "--backend compiled; --export-only exports the ONNX files without TensorRT.", why)
            return 2
        # precision is --dtype: the ONNX graph's types (strongly typed engines; no precision flags)
        options = TrtBuildOptions(optimization_level=args.opt_level, workspace_gb=args.workspace_gb)
    with cli_spelling():
        device = parse_device(args.device)
        dtype = parse_dtype(args.dtype, device)
    set_cpu_threads(device, threads)
    aoti = args.compile_artifacts == "aoti" or (args.compile_artifacts == "auto" and device.type != "cuda")
    if args.backend == "compiled" and aoti:
        with cli_spelling():
            check_aoti_on_cuda(CompileArtifacts.AOTI, device)
    if args.backend == "compiled" and not aoti and device.type != "cuda":
        raise ValueError("--backend compiled --compile-artifacts jit warms Inductor's caches for a CUDA device; "
                         "torch sees none (use --compile-artifacts aoti, or build on the GPU machine)")
    if args.backend == "trt" and not args.export_only and device.type != "cuda":
        raise ValueError("--backend trt needs a CUDA device; torch sees none")
    lora = _parse_lora(args.lora)

    cache = EngineCache(args.engine_dir)
    progress = BuildProgress([TerminalProgress()])  # the stages on stderr, estimated from the last such build
    work = "ONNX export" if args.export_only else TRT if args.backend == "trt" else None
    progress.plan([(LOAD, False), *([(work, False)] if work else [(n, True) for n in NETWORKS])],
                  device_type=device.type, root=cache.root,
                  key={"command": "build", "model": args.model, "backend": args.backend, "aoti": aoti,
                       "export_only": args.export_only, "device": device.type, "dtype": str(dtype),
                       "width": args.width, "height": args.height, "steps": [args.min_steps, args.max_steps],
                       "frame_buffer_size": args.frame_buffer_size, "cfg": cfg.value})
    with progress.stage(LOAD):
        comps = load_components(args.model, device, dtype, vae_kind, vae_id=args.vae_id, lora=lora)
    width = args.width or comps.default_size
    height = args.height or comps.default_size
    params = SpecParams.from_modules(comps.unet, comps.vae, width, height, batch=batch,
                                     frames=AxisRange(args.frame_buffer_size, args.frame_buffer_size,
                                                      args.frame_buffer_size), dtype=dtype)
    lora_ids = lora_identity(lora)
    log.info("building %s for %s at %dx%d, UNet batch %d..%d (steps %d..%d x %d frame(s), cfg %s), %s, "
             "cache %s", "ONNX" if args.export_only else args.backend, args.model, width, height, batch.min,
             batch.max, args.min_steps, args.max_steps, args.frame_buffer_size, cfg.value, params.dtype, cache.root)
    weights = {"unet": weights_fingerprint(comps.unet), "vae": weights_fingerprint(comps.vae)}

    if args.export_only:
        from engines.onnx_export import export_all_to_cache

        with progress.stage(work):
            entries = export_all_to_cache(comps.unet, comps.vae, make_specs(params), cache, model=args.model,
                                          lora=lora_ids, weights=weights, verify=not args.no_verify)
    elif args.backend == "trt":
        from engines.trt_runtime import ensure_trt_engines

        with progress.stage(work):
            entries = ensure_trt_engines(comps.unet, comps.vae, params, cache, model=args.model, lora=lora_ids,
                                         options=options, weights=weights, device=device)
    else:
        entries = _build_compiled(comps, params, cache, model=args.model, preset=args.compile_preset, aoti=aoti,
                                  stage=progress.stage)
    progress.finish()
    for name, entry in entries.items():
        size = sum(a["size"] for a in entry.manifest["artifacts"].values()) if hasattr(entry, "manifest") else 0
        log.info("%-12s %s (%.1f MB)", name, entry.path if hasattr(entry, "path") else entry, size / 1e6)
    return 0


def _build_compiled(comps, params, cache, *, model: str, preset: str, aoti: bool, stage=NO_STAGE) -> dict:
    """Run the compiled networks once for every UNet batch size in range, and the VAE once, at the shapes
    the engine uses: with ``aoti`` each call builds (or finds) its AOTInductor package in the engine cache;
    otherwise (jit, CUDA only) the calls warm Inductor's on-disk caches (TORCHINDUCTOR_CACHE_DIR, set under
    the engine cache root when unset), which a later run finds.
    """
    import torch

    from engines.compiled import compiled_networks
    from engines.specs import make_specs

    if comps.unet.device.type == "cuda":
        prepare_cuda_modules(comps)  # the same modules the engine compiles, or its cache would miss
    nets = compiled_networks(comps.unet, comps.vae, preset=preset, aoti=aoti, cache=cache, model=model, stage=stage)
    specs = make_specs(params)
    with torch.no_grad():
        for b in range(params.batch[0].min, params.batch[-1].max + 1):
            nets.unet(*specs["unet"].sample_inputs(comps.unet.device, {"B": b}))
            log.info("compiled UNet for batch %d", b)
        nets.decode(nets.encode(*specs["vae_encoder"].sample_inputs(comps.unet.device)))
    if comps.unet.device.type == "cuda":
        torch.cuda.synchronize()
    if not aoti:
        return {"inductor cache": Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])}
    described = nets.describe()
    failed = {k: v["fallbacks"] for k, v in described.items() if isinstance(v, dict) and v.get("fallbacks")}
    if failed:
        raise RuntimeError(f"AOTInductor could not package every network: {failed}")
    used = {name for v in described.values() if isinstance(v, dict) for name in v.get("packages", ())}
    return {e.path.name: e for e in cache.entries() if e.path.name in used}
