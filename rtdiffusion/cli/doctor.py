"""`rtdiffusion doctor`: what this machine has and which backends can run on it.

Reports the GPU (name, compute capability, memory), NVIDIA driver, CUDA (torch's build), cuDNN, and the
versions of torch, TensorRT, ONNX, ONNX Runtime, diffusers and transformers, then one line per backend:
usable or not, and why. ``--json`` prints the same as one JSON object. Exit status 0 whenever the report
was made (a missing optional library is a finding, not an error).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
from typing import Any

from .common import add_option

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="report GPU, driver, library versions and usable backends",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_option(p, "--engine-dir", note="the one to report on")
    p.set_defaults(func=run)


def collect(engine_dir: str | None = None) -> dict[str, Any]:
    """The doctor report as data (also used by tests and the web demo's status page)."""
    from engines.cache import EngineCache
    from engines.versions import driver_version, gpu_info, library_versions

    gpu = gpu_info()
    versions = library_versions()
    cuda = bool(gpu.get("available"))
    backends: dict[str, tuple[bool, str]] = {
        "eager": (True, "always (CPU or GPU)"),
        "graph": (cuda, "CUDA device found" if cuda else "needs a CUDA device"),
    }
    triton = importlib.util.find_spec("triton") is not None
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")
    if cuda:
        why = ("CUDA device and triton found" if triton else
               "needs triton (ships with CUDA builds of torch)")
        why += ("; AOTInductor packages (--compile-artifacts aoti) are refused on CUDA for now (loading one "
                "crashed on the H200; see BENCHMARKS.md)")
        backends["compiled"] = (triton, why)
    else:
        backends["compiled"] = (bool(cxx), "no CUDA device: AOTInductor packages for the CPU (C++ compiler found)"
                                if cxx else "needs a C++ compiler (g++) on the CPU")
    trt_caps = None
    if versions.get("tensorrt") is not None:
        from engines.trt_caps import installed_caps

        trt_caps = installed_caps()[0]
    trt_ok, trt_why = _tensorrt_status(versions.get("tensorrt"), cuda, trt_caps)
    backends["trt"] = (trt_ok, trt_why)
    onnx_ok = versions.get("onnx") is not None and importlib.util.find_spec("onnxscript") is not None
    backends["onnx export"] = (onnx_ok, "onnx and onnxscript found" if onnx_ok else
                               "needs pip install 'rtdiffusion[onnx]'")
    ort = versions.get("onnxruntime") is not None
    backends["onnx parity check"] = (ort, "onnxruntime found" if ort else "needs onnxruntime")
    cache = EngineCache(engine_dir)
    return {
        "gpu": gpu,
        "driver": driver_version(),
        "versions": versions,
        "python": sys.version.split()[0],
        "backends": {k: {"usable": ok, "why": why} for k, (ok, why) in backends.items()},
        "tensorrt": trt_caps.describe() if trt_caps is not None else None,  # engines/trt_caps.py
        "engine_cache": {"root": str(cache.root), "entries": len(cache.entries())},
    }


def _tensorrt_status(version: str | None, cuda: bool, caps=None) -> tuple[bool, str]:
    if version is None:
        return False, "tensorrt is not installed (pip install 'rtdiffusion[tensorrt]' on a GPU machine)"
    if caps is None or caps.problem:
        return False, caps.problem if caps is not None else f"TensorRT {version} found but not usable"
    if not cuda:
        return False, f"TensorRT {version} found but no CUDA device"
    return True, f"TensorRT {version} and a CUDA device found"


def format_report(r: dict[str, Any]) -> str:
    g = r["gpu"]
    rows = []
    if g.get("available"):
        rows.append(("GPU", f"{g['name']} ({g['capability']}, {g['memory_gb']} GiB) x{g['count']}"))
    else:
        rows.append(("GPU", "none visible to torch"))
    rows.append(("NVIDIA driver", r["driver"] or "not found (no nvidia-smi)"))
    rows.append(("CUDA (torch build)", g.get("torch_cuda") or "none (CPU build of torch)"))
    if g.get("cudnn"):
        rows.append(("cuDNN", str(g["cudnn"])))
    rows.append(("Python", r["python"]))
    for name, v in r["versions"].items():
        if name != "cuda":
            rows.append((name, v or "not installed"))
    rows.append(("engine cache", f"{r['engine_cache']['root']} ({r['engine_cache']['entries']} entries)"))
    t = r.get("tensorrt")
    if t:  # what the installed TensorRT supports (engines/trt_caps.py)
        rows.append(("TensorRT features", f"{t['typing']}; timing cache {'yes' if t['timing_cache'] else 'no'}; "
                     f"weight streaming {'yes' if t['weight_streaming'] else 'no'}; "
                     f"refit {'yes' if t['refit'] else 'no'}; precision {t['precision']}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append("backends:")
    for name, b in r["backends"].items():
        lines.append(f"  {name:<18} {'yes' if b['usable'] else 'no ':<4} {b['why']}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    report = collect(args.engine_dir)
    # The report is this command's output (stdout), not a log message.
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else format_report(report))
    return 0
