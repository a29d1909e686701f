"""Seeded random weights for ``random:`` models, drawn fast: each initialiser's own distribution, fewer draws.

Building ``random:sd-turbo`` on the CPU spent 13-19 s of a 23-26 s start in torch's initialisers
(BENCHMARKS.md, "CPU start-up"): every nn.Linear / nn.Conv2d draws kaiming-uniform values from torch's
serial CPU generator, and transformers' CLIP then draws every weight a second time from its own normal
initialiser. :func:`seeded_build` keeps every library's initialiser code, so each tensor gets exactly the
distribution (bounds, mean, std) its library gives it, and changes where the numbers come from, for CPU
float32 / float64 tensors only:

- ``uniform_(a, b)`` and ``normal_(mean, std)`` are caught below autograd (a ``TorchDispatchMode`` of this
  thread) and recorded, not drawn: the tensor is *pending*. The last fill of a tensor wins, so a weight
  that two initialisers fill one after the other is drawn once;
- any other operation that touches a pending tensor's storage (a read, a partial write such as an
  embedding's padding row, a copy) draws it first, so every operation sees the values it would have seen;
  a ``fill_`` / ``zero_`` of the whole tensor just drops the pending fill;
- when the build ends, every pending tensor is drawn in chunks of :data:`CHUNK` values, each from its own
  SFC64 stream seeded by (seed, label, the fill's index in the build, the chunk's index), on a few threads
  (numpy draws without the GIL). The values depend on the seed, the label and the build's operations only,
  never on the thread count or on timing: the same in every process, on every run.

Tensors of at most :data:`SMALL` values (biases, norms, a tiny test model's layers) are left to torch's own
generator: catching them costs more than drawing them.

Everything else (CUDA tensors, other dtypes, views, fills given their own ``generator``, other random ops)
runs torch's own code with torch's generator, seeded with ``seed`` inside ``torch.random.fork_rng`` (the
caller's random state is left as it was).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Bump when the drawn values change for the same seed (it is part of Components.identity, so remembered
# weight fingerprints and engine-cache entries of the old values are not reused).
SCHEME = "sfc64-chunks-v1"
CHUNK = 1 << 20  # values per stream: fixed, so the values never depend on the thread count
SMALL = 1 << 16  # fills of tensors up to this many values run torch's own code and generator
MAX_THREADS = 8

_aten = torch.ops.aten
_UNIFORM = _aten.uniform_.default
_NORMAL = _aten.normal_.default
_WHOLE_WRITES = (_aten.fill_.Scalar, _aten.zero_.default)  # need no earlier values when they cover it all
_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's generators seeded with ``seed`` inside the block (the CPU's, and ``device``'s when it is a CUDA
    device), the caller's random state restored after it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def seeded_build(seed: int, device: torch.device, label: str) -> Iterator[None]:
    """Build modules inside this block with seeded random weights, the same for the same (seed, label) in
    every process. ``device``: where the modules go (its CUDA generator is seeded and restored too)."""
    with seeded_rng(seed, device), FastInit(seed, label):
        yield


@dataclass
class _Fill:
    tensor: torch.Tensor  # whole storage, contiguous, CPU float32/float64 (kept referenced until drawn)
    normal: bool  # False: uniform_(a, b); True: normal_(mean=a, std=b)
    a: float
    b: float
    index: int  # the fill's index among this build's fills: its streams' seed


class FastInit(TorchDispatchMode):
    """The dispatch mode of :func:`seeded_build` (see the module docstring). One build, one thread."""

    def __init__(self, seed: int, label: str) -> None:
        super().__init__()
        self.seed = int(seed) % 2**64  # SeedSequence takes non-negative words; -1 and 1 stay distinct
        self.label = zlib.crc32(label.encode())
        self.pending: dict[int, _Fill] = {}  # storage address -> its pending fill
        self.fills = 0
        self._pool: ThreadPoolExecutor | None = None

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        try:
            if exc[0] is None:
                for fill in sorted(self.pending.values(), key=lambda f: f.index):
                    self._draw(fill)
        finally:
            self.pending.clear()
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in (_UNIFORM, _NORMAL) and args[0].numel() > SMALL and kwargs.get("generator") is None
                and _lazy_ok(args[0])):
            t, names = args[0], (("from", "to") if func is _UNIFORM else ("mean", "std"))
            a = float(args[1]) if len(args) > 1 else float(kwargs.get(names[0], 0.0))
            b = float(args[2]) if len(args) > 2 else float(kwargs.get(names[1], 1.0))
            self.pending[_address(t)] = _Fill(t, func is _NORMAL, a, b, self.fills)
            self.fills += 1
            return t
        if self.pending:
            if func in _WHOLE_WRITES and args[0].numel() > SMALL and _lazy_ok(args[0]):
                self.pending.pop(_address(args[0]), None)  # overwritten whole: never drawn
            else:
                for t in _tensors(args, kwargs):
                    cpu = t.device.type == "cpu" and t.layout is torch.strided
                    fill = self.pending.pop(_address(t), None) if cpu else None
                    if fill is not None:
                        self._draw(fill)
        return func(*args, **kwargs)

    def _draw(self, fill: _Fill) -> None:
        flat = fill.tensor.detach().numpy().reshape(-1)  # a view of the tensor's memory
        starts = range(0, flat.size, CHUNK)
        if len(starts) > 1 and _threads() > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_threads(), thread_name_prefix="random-init")
            list(self._pool.map(lambda j: self._chunk(fill, flat, j), range(len(starts))))
        else:
            for j in range(len(starts)):
                self._chunk(fill, flat, j)

    def _chunk(self, fill: _Fill, flat: np.ndarray, j: int) -> None:
        _fill(_stream(self.seed, self.label, fill.index, j), fill, flat[j * CHUNK:(j + 1) * CHUNK])


def _stream(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence(list(words))))


def _fill(rng: np.random.Generator, fill: _Fill, part: np.ndarray) -> None:
    """``part`` (in place) <- U(a, b) or N(mean=a, std=b) values from ``rng``."""
    if fill.normal:
        rng.standard_normal(out=part, dtype=part.dtype)
        part *= fill.b
        part += fill.a
    else:
        rng.random(out=part, dtype=part.dtype)
        part *= fill.b - fill.a
        part += fill.a


def _lazy_ok(t: Any) -> bool:
    """A plain CPU float tensor that is its whole storage, contiguous (so its address names it)."""
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype in _DTYPES
            and t.numel() > 0 and t.is_contiguous() and t.storage_offset() == 0
            and t.numel() * t.element_size() == t.untyped_storage().nbytes())


def _address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    stack = list(args) + list(kwargs.values())
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            stack.extend(x)


def _threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))
