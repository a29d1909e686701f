"""Identity helpers for cache keys and ``rtdiffusion doctor``: library versions, GPU, weights, LoRA files.

Weights identity (``weights_fingerprint``). Hashing every byte of an 866 M-parameter UNet (1.7 GB in fp16)
costs a device-to-host copy and about 1-2 s of sha256 at every start. Instead, by default we hash:

- every parameter and buffer name, shape and dtype, in state_dict order;
- per tensor, all bytes if it is at most 64 KiB, else 32 evenly spaced 256-byte windows of its bytes
  (first and last included), gathered on the tensor's device and copied to the host in one transfer.

That is about 8 KiB per tensor (about 6 MB for the SD UNet), a few tens of ms. Fine-tunes, fused LoRAs and
dtype changes alter every element of the touched tensors, so a sample always sees them; two checkpoints that
differ only in bytes between the windows of every touched tensor would collide. ``full=True`` hashes all
bytes (the same cost as above) for the paranoid; its result is a different string ("full:" prefix).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

log = logging.getLogger(__name__)

_SMALL = 64 * 1024
_WINDOWS = 32
_WINDOW = 256


def weights_fingerprint(module: torch.nn.Module, full: bool = False) -> str:
    """Content hash of ``module.state_dict()`` (see the module docstring for what is sampled)."""
    h = hashlib.sha256()
    pieces: list[torch.Tensor] = []
    for name, t in module.state_dict().items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        if t.numel() == 0:
            continue
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        n = flat.numel()
        if full or n <= _SMALL:
            pieces.append(flat)
        else:
            step = (n - _WINDOW) / (_WINDOWS - 1)
            pieces.extend(flat[int(i * step):int(i * step) + _WINDOW] for i in range(_WINDOWS))
    # One gather per device, one device->host copy each: the only sync of this function.
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in pieces:
        by_device.setdefault(p.device, []).append(p)
    for dev in sorted(by_device, key=str):
        h.update(torch.cat(by_device[dev]).cpu().numpy().tobytes())
    return ("full:" if full else "s32:") + h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (LoRA files are tens to hundreds of MB: well under a second)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def lora_identity(loras: Iterable[tuple[str, float]]) -> tuple[tuple[str, str, float], ...]:
    """(name, content hash, scale) for each LoRA; a local file or folder is hashed, a hub id is kept as
    given (its revision is then the identity: pin revisions for reproducible caches)."""
    out = []
    for name, scale in loras:
        p = Path(name).expanduser()
        if p.is_file():
            ident = file_fingerprint(p)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*.safetensors")) or sorted(f for f in p.rglob("*.bin"))
            ident = hashlib.sha256("".join(file_fingerprint(f) for f in files).encode()).hexdigest()
        else:
            ident = f"id:{name}"
        out.append((str(name), ident, float(scale)))
    return tuple(sorted(out))


# Distributions that install a module under another name (the first installed one is read).
_DISTRIBUTIONS = {
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt_libs"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"),
}


def package_version(name: str) -> str | None:
    """The installed version of module ``name``, or None when it is not installed.

    Read from the installed distribution's metadata (importlib.metadata), without importing the module: a
    version probe should not load a library the run may never use (onnx and onnxruntime: 0.12 s on a
    2-core CPU machine; tensorrt and triton load their CUDA libraries). A module found on the path that no
    distribution's metadata names is imported as before (its ``__version__``; None if the import fails). A
    module already imported answers with its own ``__version__``: that is the code that runs."""
    loaded = sys.modules.get(name)
    if loaded is not None:  # not remembered: a module imported later (or a test's stand-in) answers for itself
        return str(getattr(loaded, "__version__", "unknown"))
    return _installed_version(name)


@functools.cache
def _installed_version(name: str) -> str | None:
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):  # a broken parent package, or a module without a spec
        return None
    for dist in _DISTRIBUTIONS.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        mod = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    return str(getattr(mod, "__version__", "unknown"))


def gpu_capability(device: torch.device | str | int | None = None) -> str:
    """'sm_90' for an H100/H200, 'cpu' when there is no CUDA device."""
    if not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def gpu_info(device: torch.device | str | int | None = None) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"available": False, "torch_cuda": torch.version.cuda}
    props = torch.cuda.get_device_properties(device)
    return {"available": True, "name": props.name, "capability": gpu_capability(device),
            "memory_gb": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def driver_version() -> str | None:
    """NVIDIA driver version from nvidia-smi (None if it is not installed)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def library_versions() -> dict[str, str | None]:
    """Versions that artifacts depend on; None marks a missing library."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tensorrt": package_version("tensorrt"),
        "onnx": package_version("onnx"),
        "onnxruntime": package_version("onnxruntime"),
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
    }
