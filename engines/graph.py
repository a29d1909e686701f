"""Whole-frame CUDA graphs and the LRU cache that holds them.

:class:`CapturedStep` captures a no-argument callable once (after warm-up on a side stream) and replays it.
Inputs and outputs are whatever tensors the callable reads and writes: they must stay at fixed addresses,
which is why the frame engine only ever writes its buffers in place.

:class:`GraphCache` keeps captured steps by a key of what changes the captured work (layout: slots, frames,
CFG rows, resolution, dtype, device; the I/O buffer addresses), least recently used first out. It is
thread-safe: the frame loop and a control thread may use it at once.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterable, Iterator

import torch

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """A step could not be captured as a CUDA graph (the caller falls back, loudly)."""


class CapturedStep:
    """``fn`` captured as one CUDA graph on ``device``; ``replay()`` enqueues it on the current stream.

    ``state`` lists tensors that ``fn`` carries from call to call (a latent ring, say): warm-up runs change
    them, so they are saved before warm-up and restored before capture (capture itself runs nothing).
    Each captured step has its own memory pool, released with :meth:`release`.
    """

    def __init__(self, fn: Callable[[], Any], device: torch.device, *, state: Iterable[torch.Tensor] = (),
                 warmup: int = 2, name: str = "step", before_capture: Callable[[], None] | None = None):
        self.name = name
        state = list(state)
        saved = [t.clone() for t in state]
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream(device).wait_stream(side)
            if before_capture is not None:  # e.g. join a weight-streaming prefetch left open by warm-up
                with torch.cuda.stream(side):
                    before_capture()
            for t, s in zip(state, saved):
                t.copy_(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side):
                self.output = fn()
        except Exception as exc:  # capture errors come from deep inside torch and CUDA
            raise CaptureError(f"could not capture {name} as a CUDA graph: {type(exc).__name__}: {exc}") from exc
        torch.cuda.current_stream(device).wait_stream(side)
        self.released = False

    def replay(self) -> None:
        self.graph.replay()

    def release(self) -> None:
        """Free the graph and its memory pool. Waits for the device first: a replay still running must not
        see its memory handed to someone else (this runs only when the cache evicts, never per frame)."""
        if not self.released:
            torch.cuda.synchronize()
            self.graph.reset()
            self.released = True


class Branch:
    """A parallel branch of the frame's work: a second CUDA stream forked from and joined back into the
    current one (events, no host sync). Inside a capture the branch becomes a parallel path of the same
    graph, so its kernels can run alongside the main path's on SMs the main path leaves idle.

        side.fork()          # the branch waits for what the current stream has enqueued so far
        with side: ...       # enqueue the branch's work on its stream
        side.join()          # the current stream waits for the branch

    On the CPU (no streams) the branch's work simply runs in order, with the same data flow.
    """

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ctx = None

    def fork(self) -> None:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def __enter__(self) -> "Branch":
        if self.stream is not None:
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(*exc)
        return False


class GraphCache:
    """An LRU map from keys to captured work (any value with an optional ``release()``).

    capacity: how many entries stay; putting one more evicts (and releases) the least recently used.
    """

    def __init__(self, capacity: int = 4):
        _check_capacity(capacity)
        self._capacity = capacity
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        _check_capacity(value)
        with self._lock:
            self._capacity = value
            self._evict()

    def get(self, key: Hashable) -> Any | None:
        """The entry for ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None and old is not value:
                _release(old)
            self._entries[key] = value
            self._evict()

    def remove(self, key: Hashable) -> bool:
        """Drop one entry; True if it was there."""
        with self._lock:
            value = self._entries.pop(key, None)
        if value is None:
            return False
        _release(value)
        return True

    def purge(self, n: int | None = None) -> int:
        """Drop the ``n`` least recently used entries (all when None); returns how many were dropped."""
        with self._lock:
            count = len(self._entries) if n is None else max(0, min(n, len(self._entries)))
            dropped = [self._entries.popitem(last=False)[1] for _ in range(count)]
        for v in dropped:
            _release(v)
        return count

    def keys(self) -> list[Hashable]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self.keys())

    def _evict(self) -> None:
        while len(self._entries) > self._capacity:
            key, value = self._entries.popitem(last=False)
            log.info("graph cache full (capacity %d): evicting %s", self._capacity, key)
            _release(value)


def _check_capacity(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"graph cache capacity must be an integer >= 1; got {value!r}")


def _release(value: Any) -> None:
    release = getattr(value, "release", None)
    if callable(release):
        release()
