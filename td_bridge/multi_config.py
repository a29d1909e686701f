"""What `rtdiffusion td --streams N` was asked for: the single bridge's config and one ring pair per stream.

Ring names per stream: ``--input-name NAME`` gives ``NAME-0``, ``NAME-1``, ...; a comma-separated list
(``--input-name in_a,in_b``) gives each stream its own name exactly; without the flag, ``rtd_in_<pid>-<i>``
(and ``rtd_out_<pid>-<i>`` for outputs). Every name is checked as the single bridge checks its own (1 to 30
letters, digits, '_', '-', '.'), and no name may serve twice.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .bridge_config import BridgeConfig

MAX_STREAMS = 64  # rtdiffusion.multistream.MAX_STREAMS


def ring_names(given: str | None, prefix: str, streams: int, flag: str) -> tuple[str, ...]:
    """One shared-memory name per stream from ``--input-name`` / ``--output-name`` (see the module doc)."""
    if given is None:
        return tuple(f"{prefix}_{os.getpid()}-{i}" for i in range(streams))
    parts = given.split(",")
    if len(parts) == 1:
        return tuple(f"{given}-{i}" for i in range(streams))
    if len(parts) != streams:
        raise ValueError(f"{flag} takes one name (each stream gets it with a '-<i>' suffix) or {streams} "
                         f"comma-separated names, one per stream; got {len(parts)} names")
    return tuple(parts)


@dataclass(frozen=True)
class MultiConfig:
    """bridge: ports, pixel format, row order, slots, engine options (input/output names unused);
    input_names / output_names: one per stream."""

    bridge: BridgeConfig
    streams: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n = self.streams
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_STREAMS:
            raise ValueError(f"--streams must be an integer from 1 to {MAX_STREAMS} (1: the single-stream bridge, 2 "
                             f"or more: one engine serving that many streams); got {n!r}")
        if len(self.input_names) != n or len(self.output_names) != n:
            raise ValueError(f"a multi-stream bridge needs {n} input and {n} output ring names; got "
                             f"{len(self.input_names)} and {len(self.output_names)}")
        for i in range(n):
            self.stream_config(i)  # each name checked as BridgeConfig checks it (ValueError naming the flag)
        names = [*self.input_names, *self.output_names]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise ValueError(f"every stream needs its own input and output ring; {dup} would serve twice")

    def stream_config(self, i: int) -> BridgeConfig:
        """Stream ``i``'s view of the config: the bridge's, with its own ring names."""
        return dataclasses.replace(self.bridge, input_name=self.input_names[i], output_name=self.output_names[i])
