"""The on-disk engine cache: a frozen key -> a folder of artifacts with a manifest.

Generic: ONNX exports, TensorRT plans and AOTInductor packages are all stored through
:meth:`EngineCache.get_or_build`. The key is data (:class:`CacheKey`); its sha256 names the folder.

Layout under the cache root (default ``$RTDIFFUSION_CACHE`` or ``~/.cache/rtdiffusion/engines``):

    <root>/
      <network>-<backend>-<digest16>/     one entry per key, never modified after it appears
        manifest.json                     key (full), digest, artifacts {name: {size, sha256}},
                                          versions, created, build_seconds, extra
        <artifacts...>                    e.g. model.onnx (+ model.onnx.data), engine.plan
      .locks/<digest16>.lock              advisory lock held while one process builds that key
      .verified.json                      artifacts already hashed: stat signature -> sha256 (see Verify)
      .tmp-<digest16>-<pid>-<rand>/       a build in progress (renamed into place when complete)
      .trash-<digest16>-<rand>/           a corrupt entry moved aside (deleted best-effort)
      timing/                             TensorRT timing caches (shared across keys; see trt_build)

Protocol for one key (two processes may run it at once):

    1. lookup: entry folder exists and verifies (manifest parses, key matches, every artifact has the
       manifest's size, and with Verify.SHA256 its sha256)          -> return it, no lock taken
    2. take the key's lock (blocks; logs who it waits for; gives up with LockTimeout, naming the holder's
       pid, when the holder stays stopped (SIGSTOP, Ctrl-Z) for ``stopped_grace_s`` or the wait passes
       ``lock_timeout_s``)
    3. lookup again (another process may have finished meanwhile)    -> return it
       a corrupt entry is moved to .trash-* with a warning naming what is wrong
    4. build_fn(tmp folder) writes the artifacts; hashes and sizes go into manifest.json; files and the
       folder are fsynced; os.rename(tmp, entry) publishes it in one step
    5. release the lock

A reader therefore sees either no entry or a complete one. A builder killed mid-build leaves a .tmp-*
folder that the next builder of that key removes (it holds the lock, so no one else is using it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .cache_stamps import VerifiedStamps
from .locks import LockTimeout, file_lock  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1  # manifest format; bump when the layout changes (old entries then miss, never mis-load)


def default_root() -> Path:
    env = os.environ.get("RTDIFFUSION_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rtdiffusion" / "engines"


def _canon(value: Any, floats_as_text: bool = True) -> Any:
    """JSON-able canonical form: mappings sorted, tuples as lists; in keys floats are repr strings so that
    a key's bytes never depend on JSON float formatting (manifests keep numbers as numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _canon(v, floats_as_text) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canon(v, floats_as_text) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float):
        return repr(value) if floats_as_text else value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canon(dataclasses.asdict(value), floats_as_text)
    return str(value)


@dataclass(frozen=True)
class CacheKey:
    """Everything an artifact depends on. Any difference gives a different folder.

    model: the model id or folder as given (readability only; identity is ``weights``).
    weights: content hash of the weights (``versions.weights_fingerprint``); LoRA fused or not.
    lora: the LoRA set, as (name, content hash, scale) triples, sorted.
    network: "unet", "vae_encoder", "vae_decoder", or e.g. "frame_step" for the compiled backend.
    shapes: the spec's ``cache_fields()`` (bindings, dynamic axes, profiles), or any shape description.
    dtype: "float16", ...
    backend: "onnx", "trt", "compiled", ...
    backend_version: e.g. "tensorrt 10.7.0" (+ torch/onnx versions the artifact depends on).
    gpu: compute capability like "sm_90", or "any" for device-independent artifacts (ONNX).
    options: build options (TensorRT flags, optimisation level, compile mode, ...).
    """

    model: str
    weights: str
    lora: tuple[tuple[str, str, float], ...]
    network: str
    shapes: Any
    dtype: str
    backend: str
    backend_version: str
    gpu: str
    options: Any = None

    def __post_init__(self) -> None:
        for name in ("model", "weights", "network", "dtype", "backend", "backend_version", "gpu"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ValueError(f"cache key field {name!r} must be a non-empty string; got {v!r}")
        lora = tuple(sorted((str(n), str(h), float(s)) for n, h, s in (self.lora or ())))
        object.__setattr__(self, "lora", lora)
        # Canonicalise now so equal keys compare equal and the dataclass stays hashable.
        object.__setattr__(self, "shapes", json.dumps(_canon(self.shapes), sort_keys=True))
        object.__setattr__(self, "options", json.dumps(_canon(self.options or {}), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shapes"] = json.loads(self.shapes)
        d["options"] = json.loads(self.options)
        d["lora"] = [list(t) for t in self.lora]
        d["format"] = FORMAT
        return _canon(d)

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of every field (64 hex)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def folder_name(self) -> str:
        safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in f"{self.network}-{self.backend}")
        return f"{safe}-{self.digest[:16]}"


class Verify(enum.Enum):
    """How a hit is checked. SIZE: stat only (instant; catches truncation). SHA256: also hash every artifact
    against its manifest (about 1 s per GB), once per version of the file: a hash that matched is
    remembered in ``<root>/.verified.json`` with the file's size, modification and change times and inode,
    and a later lookup hashes the file again only when one of them differs (any write or replacement
    changes them; a TensorRT plan of 1.7 GB is then not re-read at every start). A file is remembered only
    once it has been left alone for 2 s (``cache_stamps.py``), so a write in the same clock tick as the
    hash cannot hide behind equal times. Corruption that changes neither (a failing disk) goes unseen after
    the first hash. The default is SHA256."""

    SIZE = "size"
    SHA256 = "sha256"


class CacheCorrupt(RuntimeError):
    """An entry exists but does not match its manifest. The message names the entry and what is wrong."""


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    manifest: dict[str, Any]

    def artifact(self, name: str) -> Path:
        if name not in self.manifest["artifacts"]:
            raise KeyError(f"cache entry {self.path} has no artifact {name!r}; "
                           f"it has {sorted(self.manifest['artifacts'])}")
        return self.path / name

    @property
    def extra(self) -> dict[str, Any]:
        return self.manifest.get("extra", {})


BuildFn = Callable[[Path], Mapping[str, Any] | None]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def _safe_artifact_name(name: str) -> bool:
    """An artifact name is a relative POSIX path of plain parts (what _build writes): no '..', no '.', no
    empty part, not absolute, no backslash or drive letter; anything else could point outside the entry."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name or ":" in name:
        return False
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class EngineCache:
    """A folder of cache entries. Safe for several threads and processes (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None, verify: Verify = Verify.SHA256,
                 lock_timeout_s: float | None = None, stopped_grace_s: float | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.verify = verify
        self.lock_timeout_s = lock_timeout_s  # None: LOCK_TIMEOUT_S
        self.stopped_grace_s = stopped_grace_s  # None: STOPPED_GRACE_S

    def entry_path(self, key: CacheKey) -> Path:
        return self.root / key.folder_name

    def lookup(self, key: CacheKey) -> CacheEntry | None:
        """The verified entry for ``key``, or None when there is none. Raises CacheCorrupt if it is bad."""
        path = self.entry_path(key)
        if not path.exists():
            return None
        return self._verify(path, key)

    def get_or_build(self, key: CacheKey, build_fn: BuildFn, *, versions: Mapping[str, Any] | None = None) -> CacheEntry:
        """The entry for ``key``; built with ``build_fn(tmp_folder)`` if missing or corrupt.

        ``build_fn`` writes its artifacts (any files, no subfolders needed) into the folder it is given and
        may return a JSON-able mapping stored as the manifest's ``extra``. Exceptions from it propagate; the
        partial folder is removed and nothing is published.
        """
        with contextlib.suppress(CacheCorrupt):  # corrupt: handled under the lock below
            hit = self.lookup(key)
            if hit is not None:
                log.debug("engine cache hit %s", hit.path)
                return hit
        self.root.mkdir(parents=True, exist_ok=True)
        what = f"{key.network} ({key.backend}) for {key.model}"
        with self._lock(key, what):
            try:
                hit = self.lookup(key)
            except CacheCorrupt as exc:
                log.warning("%s; rebuilding it", exc)
                self._discard(self.entry_path(key))
                hit = None
            if hit is not None:
                log.info("engine cache: %s was built by another process meanwhile", hit.path.name)
                return hit
            return self._build(key, build_fn, versions or {})

    def invalidate(self, key: CacheKey, reason: str) -> None:
        """Move an entry aside (e.g. it verified but TensorRT could not deserialise it) so the next
        ``get_or_build`` rebuilds it."""
        path = self.entry_path(key)
        with self._lock(key, key.network):
            if path.exists():
                log.warning("engine cache entry %s is unusable (%s); it will be rebuilt", path, reason)
                self._discard(path)

    def entries(self) -> list[CacheEntry]:
        """Every entry whose manifest parses (not verified), for listing and tools."""
        out = []
        if not self.root.is_dir():
            return out
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or not (p / MANIFEST).is_file():
                continue
            with contextlib.suppress(OSError, ValueError):
                out.append(CacheEntry(p, json.loads((p / MANIFEST).read_text())))
        return out

    # ---- internals ---------------------------------------------------------------------------------
    def _lock(self, key: CacheKey, what: str):
        return file_lock(self.root / ".locks" / f"{key.digest[:16]}.lock", what, timeout_s=self.lock_timeout_s,
                         stopped_grace_s=self.stopped_grace_s)

    def _verify(self, path: Path, key: CacheKey) -> CacheEntry:
        mpath = path / MANIFEST
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise CacheCorrupt(f"engine cache entry {path} has an unreadable manifest ({exc})") from exc
        if not isinstance(manifest, dict):
            raise CacheCorrupt(f"engine cache entry {path} has a manifest that is not a JSON object "
                               f"(got {type(manifest).__name__})")
        if manifest.get("key") != key.to_dict() or manifest.get("digest") != key.digest:
            raise CacheCorrupt(f"engine cache entry {path} has a manifest for another key")
        arts = manifest.get("artifacts")
        if not isinstance(arts, dict) or not arts:
            raise CacheCorrupt(f"engine cache entry {path} lists no artifacts")
        stamps = VerifiedStamps(self.root)  # artifacts hashed before and unchanged since (Verify)
        for name, meta in arts.items():
            if not _safe_artifact_name(name):
                raise CacheCorrupt(f"engine cache entry {path}: artifact name {name!r} is not a relative path inside "
                                   "the entry (absolute, '..', or empty parts)")
            if not isinstance(meta, dict):
                raise CacheCorrupt(f"engine cache entry {path}: the manifest entry for artifact {name} is not a "
                                   f"JSON object (got {type(meta).__name__})")
            f = path / name
            try:
                size = f.stat().st_size
            except OSError:
                raise CacheCorrupt(f"engine cache entry {path}: artifact {name} is missing") from None
            if size != meta.get("size"):
                raise CacheCorrupt(f"engine cache entry {path}: artifact {name} is {size} bytes, the manifest "
                                   f"says {meta.get('size')} (truncated or overwritten)")
            if self.verify is Verify.SHA256 and not stamps.known(path, name, meta.get("sha256")):
                if sha256_file(f) != meta.get("sha256"):
                    raise CacheCorrupt(f"engine cache entry {path}: artifact {name} does not match its sha256 "
                                       "(corrupted on disk)")
                stamps.hashed(path, name, meta.get("sha256"))
        stamps.save()
        return CacheEntry(path, manifest)

    def _build(self, key: CacheKey, build_fn: BuildFn, versions: Mapping[str, Any]) -> CacheEntry:
        prefix = f".tmp-{key.digest[:16]}-"
        for stale in self.root.glob(prefix + "*"):  # a builder that died; we hold the lock
            log.info("removing an abandoned build folder %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        final = self.entry_path(key)
        try:
            t0 = time.monotonic()
            extra = build_fn(tmp)
            seconds = time.monotonic() - t0
            artifacts = {}
            for f in sorted(tmp.rglob("*")):
                if f.is_file() and f.name != MANIFEST:
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                    artifacts[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
            if not artifacts:
                raise RuntimeError(f"building {key.network} ({key.backend}) wrote no artifacts into {tmp}")
            manifest = {
                "format": FORMAT,
                "digest": key.digest,
                "key": key.to_dict(),
                "artifacts": artifacts,
                "versions": _canon(dict(versions), floats_as_text=False),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "created_unix": time.time(),
                "build_seconds": round(seconds, 3),
                "builder_pid": os.getpid(),
                "extra": _canon(dict(extra or {}), floats_as_text=False),
            }
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
            _fsync_dir(tmp)
            os.rename(tmp, final)  # atomic publish; final cannot exist (checked under the lock)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        total = sum(a["size"] for a in artifacts.values())
        log.info("engine cache: built %s in %.1f s (%d artifacts, %.1f MB)", final.name, seconds,
                 len(artifacts), total / 1e6)
        return CacheEntry(final, manifest)

    def _discard(self, path: Path) -> None:
        trash = self.root / f".trash-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
