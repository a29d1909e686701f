"""Weights fingerprints remembered across restarts, so a cached start does not hash the weights again.

``versions.weights_fingerprint`` reads samples of every tensor (one gather and one device-to-host copy per
network); at a restart that found every AOTInductor package in the cache it was measured at 2.4 s of the
start-up (issue 17). The fingerprint only depends on where the weights came from, so it is kept in
``<engine cache root>/.fingerprints.json`` under a key of that origin (:func:`origin_key`):

- ``random:<arch>`` models: the model name, its seed, the architecture config, dtype, device type and the
  torch / diffusers versions (seeded initialisation is deterministic for those);
- a local diffusers folder (or a hub snapshot): the folder and the path, size and modification time of every
  weights file under it;
- plus, always, the module class, its config and the name, shape, stride and dtype of every tensor.

Anything else (LoRA fused in, a TAESD from another folder, no identity at all) has no origin key and is
hashed every time, as before. The file is a small JSON map written atomically; an unreadable file or entry is
ignored and rewritten (the worst case is one fingerprint computed again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Mapping

import torch

from .cache import _canon, write_atomic
from .cache_stamps import read_table
from .versions import package_version, weights_fingerprint

log = logging.getLogger(__name__)

FILE = ".fingerprints.json"  # dot-named: internal to the cache root, like .locks (not an entry)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_lock = threading.Lock()


def origin_key(module: torch.nn.Module, identity: Mapping[str, Any] | None, network: str) -> str | None:
    """A digest that changes whenever the weights ``module`` was built from could, or None when
    ``identity`` (``Components.identity``) does not pin them down."""
    if not identity or identity.get("lora"):
        return None
    model = str(identity.get("model", ""))
    origin: dict[str, Any] = {"identity": dict(identity), "network": network}
    if model.startswith("random:"):
        pass  # the seed is in the identity
    elif identity.get("folder") and (network == "unet" or identity.get("vae") == "kl"):
        # the UNet (and the KL VAE) come from the folder; TAESD comes from elsewhere (not in the identity)
        origin["files"] = _weight_files(Path(str(identity["folder"])))
        if not origin["files"]:
            return None
    else:
        return None
    params = list(module.parameters())
    config = getattr(getattr(module, "net", module), "config", {}) or {}
    origin.update(
        module=type(getattr(module, "net", module)).__qualname__,
        config={k: v for k, v in dict(config).items() if not k.startswith("_")},
        dtype=str(params[0].dtype) if params else "none",
        device=params[0].device.type if params else "cpu",
        versions={"torch": torch.__version__, "diffusers": package_version("diffusers")},
        tensors=[(n, list(t.shape), list(t.stride()), str(t.dtype)) for n, t in module.state_dict().items()],
    )
    return hashlib.sha256(json.dumps(_canon(origin), sort_keys=True).encode()).hexdigest()


def _weight_files(folder: Path) -> list[tuple[str, int, int]]:
    out = []
    for f in sorted(folder.rglob("*")):
        if f.suffix in WEIGHT_SUFFIXES and f.is_file():
            st = f.stat()
            out.append((f.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    return out


def cached_fingerprint(module: torch.nn.Module, identity: Mapping[str, Any] | None, network: str,
                       root: str | os.PathLike) -> str:
    """``weights_fingerprint(module)``, read from ``root/.fingerprints.json`` when its origin is known."""
    key = origin_key(module, identity, network)
    path = Path(root) / FILE
    if key is not None:
        known = read_table(path).get(key)
        if isinstance(known, str) and known.startswith(("s32:", "full:")):
            return known
    value = weights_fingerprint(module)
    if key is not None:
        with _lock:  # one writer per process; between processes the last write wins (both are right)
            table = read_table(path)
            table[key] = value
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, json.dumps(table, indent=1, sort_keys=True).encode())
            except OSError as exc:
                log.warning("could not remember the weights fingerprint in %s: %s", path, exc)
    return value

