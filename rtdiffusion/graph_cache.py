"""The engine's cache of captured frame graphs, as the Python API and status() see it.

Holds the capacity rule (RTDIFFUSION_GRAPH_CACHE), the readable form of a cache key and
``GraphCacheControl``, the view ``StreamEngine.graph_cache`` returns. The cache itself is
``engines.graph.GraphCache``; the engine owns it and captures into it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .engine import StreamEngine

GRAPH_CACHE_ENV = "RTDIFFUSION_GRAPH_CACHE"


def graph_cache_capacity(default: int) -> int:
    """RTDIFFUSION_GRAPH_CACHE: 'off' / '0' keeps only the active shape's graph (every switch recaptures),
    'on' the default capacity, a number that capacity. Unset: the engine's graph_cache_size."""
    raw = os.environ.get(GRAPH_CACHE_ENV, "").strip().lower()
    if not raw or raw == "on":
        return default
    if raw in ("off", "0"):
        return 1
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    raise ConfigError(f"{GRAPH_CACHE_ENV} must be 'on', 'off' or a capacity (a whole number); got {raw!r}")


def key_str(key: Any) -> str:
    """A graph key (StreamLayout, input address, output address, KV-cache key), readable."""
    layout = key[0]
    return (f"{layout.width}x{layout.height} S={layout.slots} F={layout.frames} cfg={layout.cfg.value} "
            f"{str(layout.dtype).replace('torch.', '')} kv={key[3][1]}")


class GraphCacheControl:
    """The engine's graph cache, as the Python API sees it.

    Reads go straight to the cache (it has its own lock). Changes take the engine's frame lock, so they land
    between frames; if they drop the graph of the shape now in use, the next frame captures it again.
    Keys are (StreamLayout, input address, output address, KV-cache key) tuples, as keys() lists them.
    """

    def __init__(self, engine: "StreamEngine"):
        self._engine, self._cache = engine, engine._graphs

    def keys(self) -> list:
        return self._cache.keys()

    def describe(self) -> list[str]:
        return [key_str(k) for k in self._cache.keys()]

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, key: Any) -> bool:
        return key in self._cache

    @property
    def active_key(self) -> tuple | None:
        e = self._engine
        return e._graph_key(e._state.buffers.layout) if e._executor.captures else None

    @property
    def capacity(self) -> int:
        return self._cache.capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        try:
            with self._engine._frame_lock:
                self._cache.capacity = value
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def remove(self, key: Any) -> bool:
        with self._engine._frame_lock:
            return self._cache.remove(key)

    def purge(self, n: int | None = None) -> int:
        """Drop the n least recently used graphs (all when None); returns how many were dropped."""
        with self._engine._frame_lock:
            return self._cache.purge(n)
