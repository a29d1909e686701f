"""Frames into and out of a multi-stream group: checks, upload, readback, and the error that names streams.

Every stream's frames travel together: host frames are gathered into one pinned [N*F, H, W, 3] staging
tensor and uploaded with one copy; the outputs come back with one copy and one host sync (the tick's only
one, as a single engine's readback), then are handed out per stream. CUDA frames are copied device to device
into their rows on the group's stream, after the caller's stream (GPU-side ordering, no host sync).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import host_frames
from .errors import FrameError
from .multistream_step import GroupIO


class StreamErrors(FrameError):
    """Some streams of a tick failed (bad frame, settings that could not be applied); the others ran.

    errors: {stream index: the error}; outputs: one entry per stream (an output, None without a frame, or
    the stream's error)."""

    def __init__(self, errors: dict[int, BaseException], outputs: list):
        self.errors, self.outputs = dict(errors), list(outputs)
        msgs = "; ".join(str(e) for _, e in sorted(self.errors.items()))
        super().__init__(f"{len(self.errors)} stream(s) did not run this tick, the others did: {msgs}")


def check_frame(frame: Any, want: tuple[int, ...], device: torch.device, who: str = "") -> tuple[Any, str]:
    """(frame, kind) with kind 'numpy', 'torch' (CPU) or 'cuda'; FrameError naming what was expected."""
    return host_frames.check_frame(frame, want, device, who, runner="group")


class GroupFrames:
    """Pinned staging for the group's frames (CUDA), or direct copies (CPU)."""

    def __init__(self, io: GroupIO, stream: torch.cuda.Stream | None):
        self.io, self.stream = io, stream
        cuda = stream is not None
        self._in_host = torch.zeros(io.frame_u8.shape, dtype=torch.uint8, pin_memory=cuda)  # [N*F, H, W, 3]
        self._out_host = torch.zeros(io.out_u8.shape, dtype=torch.uint8, pin_memory=cuda)  # [N*F, H, W, 3]
        self._out_event = torch.cuda.Event() if cuda else None

    def upload(self, checked: list, F: int) -> None:
        """checked[i]: (frame, kind) or None (stream i has no frame this tick: its rows keep the old one)."""
        dst, host_rows, cuda_rows = self.io.frame_u8, [], []
        for i, c in enumerate(checked):
            if c is not None:
                frame, kind = c
                src = frame if frame.ndim == 4 else frame[None]  # [F, H, W, 3]
                (cuda_rows if kind == "cuda" else host_rows).append((slice(i * F, (i + 1) * F), src, kind))
        if self.stream is None:
            for rows, src, kind in host_rows:
                dst[rows].copy_(torch.from_numpy(np.ascontiguousarray(src)) if kind == "numpy" else src)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))  # the caller's writes first
        for rows, src, kind in host_rows:
            self._in_host[rows].copy_(torch.from_numpy(np.ascontiguousarray(src)) if kind == "numpy" else src)
        with torch.cuda.stream(self.stream):
            if host_rows:
                dst.copy_(self._in_host, non_blocking=True)  # one upload for every stream
            for rows, src, _ in cuda_rows:
                dst[rows].copy_(src, non_blocking=True)

    def download(self, checked: list, F: int) -> list:
        """One output per stream, the kind and shape of its frame (None where it had none)."""
        outs: list = [None] * len(checked)
        src = self.io.out_u8
        if self.stream is not None and any(c is not None and c[1] != "cuda" for c in checked):
            with torch.cuda.stream(self.stream):
                self._out_host.copy_(src, non_blocking=True)
                self._out_event.record()
            self._out_event.synchronize()  # the one host sync of a tick: handing the results back
            src = self._out_host
        for i, c in enumerate(checked):
            if c is None:
                continue
            frame, kind = c
            rows = slice(i * F, (i + 1) * F)
            if kind == "cuda":
                with torch.cuda.stream(self.stream):
                    out = self.io.out_u8[rows].clone()
            else:
                out = src[rows].clone()
            out = out[0] if frame.ndim == 3 else out
            outs[i] = out.numpy() if kind == "numpy" else out
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        return outs
