"""Frames at the engine's edge: checking what the caller hands in, uploading it, handing the result back.

    caller's frame (numpy / CPU torch / CUDA torch, uint8 [H, W, 3] or [F, H, W, 3])
      check()     -> FrameError naming the expected shape, dtype and device; nothing changes on error
      upload()    host: pageable -> pinned staging -> device (non_blocking, on the engine's stream)
                  CUDA: the engine's stream waits for the caller's (GPU-side); zero copy for input_buffer
      download()  host: device -> pinned staging, then the one host sync of a frame; CUDA: a clone
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from .errors import FrameError


def check_frame(frame: Any, want: tuple[int, ...], device: torch.device, who: str = "",
                runner: str = "engine") -> tuple[Any, str]:
    """(frame, kind) with kind 'numpy', 'torch' (CPU) or 'cuda'; FrameError naming what was expected.
    ``who`` prefixes the messages ("stream 2: "); ``runner`` names what runs on ``device`` ("engine", "group")."""
    if isinstance(frame, np.ndarray):
        kind, dtype_ok = "numpy", frame.dtype == np.uint8
    elif isinstance(frame, torch.Tensor):
        kind, dtype_ok = ("cuda" if frame.is_cuda else "torch"), frame.dtype == torch.uint8
        if frame.is_cuda and device.type != "cuda":
            raise FrameError(f"{who}got a CUDA frame but the {runner} runs on {device}; pass a CPU frame")
    else:
        raise FrameError(f"{who}a frame must be a numpy array or a torch tensor of uint8 {list(want)}; "
                         f"got {type(frame).__name__}")
    if not dtype_ok:
        raise FrameError(f"{who}a frame must be uint8 (0-255) of shape {list(want)}; got dtype {frame.dtype}")
    if tuple(frame.shape) != want:
        raise FrameError(f"{who}a frame must have shape {list(want)} (height, width, RGB) for this {runner}; "
                         f"got {list(frame.shape)}")
    return frame, kind


class HostFrames:
    """Checks, pinned staging and copies for the frames a caller passes to ``engine(frame)``."""

    def __init__(self, frames: int, height: int, width: int, device: torch.device,
                 stream: torch.cuda.Stream | None):
        cuda = device.type == "cuda"
        self.frames, self.height, self.width, self.device, self.stream = frames, height, width, device, stream
        F, H, W = frames, height, width
        # pinned host staging for uploads / readback
        self.in_host = torch.zeros(F, H, W, 3, dtype=torch.uint8, pin_memory=cuda)  # [F, H, W, 3] uint8
        self.out_host = torch.zeros(F, H, W, 3, dtype=torch.uint8, pin_memory=cuda)  # [F, H, W, 3] uint8
        self.out_event = torch.cuda.Event() if cuda else None

    @property
    def shape(self) -> tuple[int, ...]:
        """What a caller passes: (H, W, 3), or (F, H, W, 3) with a frame buffer."""
        return (self.height, self.width, 3) if self.frames == 1 else (self.frames, self.height, self.width, 3)

    def _stream_ctx(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def check(self, frame: Any) -> tuple[Any, str]:
        """The frame and its kind ('numpy', 'torch', 'cuda'); FrameError naming what was expected."""
        return check_frame(frame, self.shape, self.device)

    def check_input_buffer(self, tensor: Any, device: torch.device) -> None:
        """register_input's tensor: contiguous uint8 of the frame shape on ``device``, or FrameError."""
        want = self.shape
        if (not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tuple(tensor.shape) != want
                or tensor.device != device or not tensor.is_contiguous()):
            got = (f"{type(tensor).__name__} {getattr(tensor, 'dtype', '')} {list(getattr(tensor, 'shape', []))} "
                   f"on {getattr(tensor, 'device', '?')}")
            raise FrameError(f"an input buffer must be a contiguous uint8 tensor of shape {list(want)} on "
                             f"{device}; got {got}")

    def upload(self, frame: Any, kind: str, dst: torch.Tensor) -> None:
        """Copy a checked frame into ``dst`` ([F, H, W, 3] uint8, the engine's input) on the engine's stream."""
        src = frame if frame.ndim == 4 else frame[None]
        if kind == "cuda":
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # GPU-side, not a host sync
            if src.data_ptr() == dst.data_ptr():
                return  # the caller wrote into input_buffer: zero copy
            with self._stream_ctx():
                dst.copy_(src, non_blocking=True)
            return
        host = torch.from_numpy(np.ascontiguousarray(src)) if kind == "numpy" else src
        if self.stream is None:
            dst.copy_(host)
            return
        self.in_host.copy_(host)  # pageable -> pinned (host memcpy)
        with self._stream_ctx():
            dst.copy_(self.in_host, non_blocking=True)

    def download(self, output: torch.Tensor, ready: torch.cuda.Event | None, kind: str,
                 out_u8: torch.Tensor) -> Any:
        """The result as the caller's kind: ``output`` (the step's view of ``out_u8``, [F, H, W, 3] uint8)."""
        if kind == "cuda":
            torch.cuda.current_stream(self.device).wait_event(ready)
            return output.clone()
        if self.stream is None:
            out = output.clone()
        else:
            with self._stream_ctx():
                self.out_host.copy_(out_u8, non_blocking=True)
                self.out_event.record()
            self.out_event.synchronize()  # the one host sync of a frame: handing the result back
            out = (self.out_host[0] if self.frames == 1 else self.out_host).clone()
        return out.numpy() if kind == "numpy" else out
