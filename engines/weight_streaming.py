"""Low-VRAM mode: stream UNet weights from pinned host memory into a fixed set of device buffers.

Two pieces, used in this order by the engine:

    plan = plan_streaming(unet, budget_bytes, reserve_bytes, dtype=torch.float16)   # pure, works on `meta`
    streamer = WeightStreamer.install(unet, plan, device, mode=StreamMode.PREFETCH)  # None if nothing streams
    streamer.describe()   # -> dict for status()
    streamer.join()       # make the current stream wait for an outstanding prefetch (before graph capture)
    streamer.remove()     # streamed weights go back to (pinned) host memory; hooks and device buffers are freed

The planner (units, segments, the budget identity) is ``engines/streaming_plan.py``; its names are
re-exported here.

Executor and its stream protocol
--------------------------------
Every streamed parameter's bytes live in one pinned host buffer per segment (``uint8``, aligned offsets).
The device holds ``num_buffers`` fixed ``uint8`` buffers of ``buffer_bytes``; segment k always uses buffer
``k % num_buffers``, and each streamed ``nn.Parameter`` keeps its identity while its ``.data`` becomes a view
into its segment's buffer at its offset. Module forwards are unchanged; only the *contents* of the buffers
change, so the parameter addresses are stable (a CUDA graph can capture it).

PREFETCH (two buffers, a dedicated copy stream C; S is the caller's current stream):

    pre-hook of segment k:   S waits copy_done[k]                           (segment k is on the device)
                             mark = S.record()                              (everything before k is done,
                                                                             in particular segment k-1, the
                                                                             last user of buffer (k+1) % 2)
                             C waits mark; C: buf[(k+1)%2] <- host[k+1]; copy_done[k+1] = C.record()
    forward hook of the UNet: mark = S.record(); C waits mark;
                             C: buf[0] <- host[0]; copy_done[0] = C.record()   (next call's segment 0)

    S: |seg0 compute|seg1 compute|seg2 compute| ... |seg n-1|  (VAE, scheduler ...)  |seg0 ...
    C:  |copy seg1  |copy seg2   |copy seg3   | ...          |copy seg0              |

So a call costs about max(copy, compute) per segment instead of their sum, and a copy into a buffer never
starts before the compute that last read that buffer was enqueued before the mark it waits on.

SYNC (one buffer, the fallback when the second buffer cannot be allocated, and a benchmark baseline):
the pre-hook of segment k copies host[k] into the buffer on S itself, then the segment computes.

No per-call host sync and no per-call allocation: the copies and event record/waits are the only work the
hooks add. Device "cpu" works too (no streams or events; copies are plain copies), which is what the CPU
equality tests use.

CUDA graph capture
------------------
The copy stream forks from the capture stream (it waits on a mark recorded on S) and every copy is joined
back (S waits on its copy_done) before the call returns: during capture the end-of-call prefetch of
segment 0 is joined at once, so a captured call costs one segment-0 copy more than an eager one (it no
longer overlaps the work between calls). Events recorded before the capture are not waited on inside it:
``torch.cuda.graph`` synchronizes the device on entry, and replays are ordered on their stream. The
invariant that makes replays correct: after every completed call (eager or replayed) buffer 0 holds
segment 0. Call ``join()`` after eager warm-up calls and before capture or replay. Do not interleave
eager calls and replays on different streams.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .streaming_plan import (ALIGN, GiB, Segment, StreamingPlan, StreamingPlanError, _aligned, _resolve_units,
                             _unique_params, _Unit, budget_for_segments, plan_streaming)

__all__ = [  # the runtime, and (from streaming_plan.py) the planner
    "StreamMode", "WeightStreamer", "plan_streaming", "budget_for_segments", "StreamingPlan", "Segment",
    "StreamingPlanError", "ALIGN", "GiB", "_resolve_units",
]

logger = logging.getLogger(__name__)


class StreamMode(str, enum.Enum):
    PREFETCH = "prefetch"  # two device buffers, copy of segment k+1 overlaps compute of segment k
    SYNC = "sync"  # one device buffer, copy then compute


# -------------------------------------------------------------------------------------------- executor


@dataclass(frozen=True)
class _Slot:
    """Where one streamed parameter lives: segment, byte offset in the segment, dtype and shape."""

    param: nn.Parameter
    segment: int
    offset: int
    dtype: torch.dtype
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def _view(flat: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    return flat[offset : offset + nbytes].view(dtype).view(shape)


class WeightStreamer:
    """Installed on a UNet: owns the pinned host segments, the device buffers, the copy stream and the hooks.

    Create with ``install``; the constructor is private. ``describe()`` is cheap (no device work).
    """

    def __init__(self) -> None:  # use install()
        self._hooks: list[Any] = []
        self._check_hooks: list[Any] = []

    # ------------------------------------------------------------------ setup (allocates; never per call)
    @classmethod
    def install(
        cls,
        unet: nn.Module,
        plan: StreamingPlan,
        device: torch.device | str,
        mode: StreamMode | str = StreamMode.PREFETCH,
    ) -> WeightStreamer | None:
        """Move ``unet`` to ``device`` under ``plan``. Returns None (and just moves it) when nothing streams.

        Floating parameters are converted to ``plan.dtype``. Streamed weights are copied into pinned host
        memory (plain host memory on device "cpu"), their original storage is released. If the second device
        buffer cannot be allocated, falls back to SYNC with a warning (visible in ``describe()``).
        """
        try:
            mode = StreamMode(mode)
        except ValueError:
            raise ValueError(f"mode must be one of {[m.value for m in StreamMode]}; got {mode!r}") from None
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if any(p.is_meta for p in unet.parameters()):
            raise ValueError("install needs real weights; the UNet has parameters on the meta device")
        if not plan.streaming:
            unet.to(device=device, dtype=plan.dtype)
            logger.info("weight streaming: UNet fits the budget (%.2f GiB), kept resident", plan.total_bytes / GiB)
            return None
        self = cls()
        self.plan = plan
        self.device = device
        self._cuda = device.type == "cuda"
        units = _resolve_units(unet)
        missing = [n for s in plan.segments for n in s.units if n not in units]
        if missing:
            raise ValueError(f"plan does not match this UNet: unknown units {missing[:5]}")
        n = len(plan.segments)

        # Layout: parameter -> (segment, aligned offset); check the plan's sizes against the model.
        self._slots: list[_Slot] = []
        streamed: set[int] = set()
        self._seg_first: list[nn.Module] = []
        self._unit_seg: list[tuple[_Unit, int]] = []
        for seg in plan.segments:
            off = 0
            for name in seg.units:
                u = units[name]
                self._unit_seg.append((u, seg.index))
                for p in u.params():
                    if id(p) in streamed:
                        raise ValueError(f"parameter shared between streamed units (in {name}); cannot stream it")
                    streamed.add(id(p))
                    dt = plan.dtype if p.is_floating_point() else p.dtype
                    slot = _Slot(p, seg.index, off, dt, p.shape)
                    self._slots.append(slot)
                    off += _aligned(slot.nbytes)
            if off != seg.param_bytes:
                raise ValueError(f"plan does not match this UNet: segment {seg.index} is {off} bytes, plan says "
                                 f"{seg.param_bytes}")
            self._seg_first.append(units[seg.units[0]].modules[0])

        # Resident part: everything not streamed goes to the device now.
        for p in _unique_params([unet]):
            if id(p) not in streamed:
                p.data = p.data.to(device=device, dtype=plan.dtype if p.is_floating_point() else p.dtype)
        for mod in unet.modules():
            for bname, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[bname] = b.to(device)

        # Host segments: [param_bytes] uint8 each, pinned when the device is CUDA.
        pin = self._cuda
        self._host = [torch.empty(s.param_bytes, dtype=torch.uint8, pin_memory=pin) for s in plan.segments]
        for s in self._slots:
            _view(self._host[s.segment], s.offset, s.nbytes, s.dtype, s.shape).copy_(s.param.data)

        # Device buffers: [buffer_bytes] uint8 x 1 or 2.
        self.fallback_reason: str | None = None
        bufs = [torch.empty(plan.buffer_bytes, dtype=torch.uint8, device=device)]
        if mode is StreamMode.PREFETCH:
            try:
                bufs.append(torch.empty(plan.buffer_bytes, dtype=torch.uint8, device=device))
            except torch.cuda.OutOfMemoryError:
                mode = StreamMode.SYNC
                self.fallback_reason = (f"could not allocate the second {plan.buffer_bytes / 2**20:.0f} MiB segment "
                                        "buffer; streaming synchronously (copy, then compute)")
                logger.warning("weight streaming: %s", self.fallback_reason)
        self.mode = mode
        self._bufs = bufs
        nb = len(bufs)
        # Precomputed copy pairs: dst [param_bytes] view of buffer k % nb <- src host segment k.
        self._dst = [bufs[k % nb][: s.param_bytes] for k, s in enumerate(plan.segments)]
        for s in self._slots:
            s.param.data = _view(bufs[s.segment % nb], s.offset, s.nbytes, s.dtype, s.shape)

        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device)
            self._copy_done = [torch.cuda.Event() for _ in range(n)]
            self._mark = torch.cuda.Event()
        self._pending = [False] * n  # copy of segment k launched and not yet waited on by compute
        self._active = -1  # segment whose pre-hook ran last in the current call
        self._in_call = False
        self._calls = 0

        # Hooks: segment 0 switches at the UNet's own pre-hook, segment k>0 at its first module.
        self._hooks.append(unet.register_forward_pre_hook(lambda m, a: self._enter(0)))
        for k in range(1, n):
            self._hooks.append(self._seg_first[k].register_forward_pre_hook(lambda m, a, k=k: self._enter(k)))
        self._hooks.append(unet.register_forward_hook(lambda m, a, o: self._exit()))
        # First call only: every module of every unit checks that it runs while its segment is active.
        for u, k in self._unit_seg:
            for mod in u.modules:
                self._check_hooks.append(mod.register_forward_pre_hook(lambda m, a, k=k, u=u.name: self._check(k, u)))
        self._unet = unet

        if self.mode is StreamMode.PREFETCH:
            with torch.no_grad():
                self._launch(0)  # segment 0 for the first call
        logger.info("weight streaming installed (%s): %s", self.mode.value, self.describe())
        return self

    # -------------------------------------------------------------- per call (no host sync, no allocation)
    def _launch(self, k: int) -> None:
        """Enqueue host[k] -> its device buffer on the copy stream, after everything on the current stream."""
        if not self._cuda:
            self._dst[k].copy_(self._host[k])
            return
        cur = torch.cuda.current_stream(self.device)
        self._mark.record(cur)
        self._copy_stream.wait_event(self._mark)
        with torch.cuda.stream(self._copy_stream):
            self._dst[k].copy_(self._host[k], non_blocking=True)
        self._copy_done[k].record(self._copy_stream)
        self._pending[k] = True

    def _wait(self, k: int) -> None:
        """The current stream waits for segment k's copy (a device-side wait, not a host sync)."""
        if self._cuda and self._pending[k]:
            torch.cuda.current_stream(self.device).wait_event(self._copy_done[k])
        self._pending[k] = False

    def _enter(self, k: int) -> None:
        n = len(self._dst)
        if k == 0:
            if self._in_call:  # the previous call raised part-way: buffer 0 may hold another segment
                logger.warning("weight streaming: previous UNet call did not finish; reloading segment 0")
                self._pending = [False] * n
                if self.mode is StreamMode.PREFETCH:
                    self._launch(0)
            self._in_call = True
            if self._cuda and self._pending[0] and torch.cuda.is_current_stream_capturing():
                # Launched before the capture: torch.cuda.graph synchronized the device, so it is complete;
                # waiting on an event recorded outside the capture is not allowed inside it.
                self._pending[0] = False
        elif k != self._active + 1:
            raise RuntimeError(f"weight streaming: segment {k} entered after segment {self._active}; the UNet "
                               "ran its modules out of the planned order")
        self._active = k
        if self.mode is StreamMode.SYNC:
            self._dst[k].copy_(self._host[k], non_blocking=self._cuda)  # on the current stream, then compute
            return
        self._wait(k)
        if k + 1 < n:
            self._launch(k + 1)

    def _exit(self) -> None:
        if self._active != len(self._dst) - 1:
            raise RuntimeError(f"weight streaming: UNet call ended in segment {self._active} of {len(self._dst)}")
        self._in_call = False
        self._active = -1
        self._calls += 1
        if self._check_hooks:  # the first call ran every unit in order: stop checking
            for h in self._check_hooks:
                h.remove()
            self._check_hooks = []
        if self.mode is StreamMode.PREFETCH:
            self._launch(0)  # next call's segment 0, overlapping whatever runs between calls
            if self._cuda and torch.cuda.is_current_stream_capturing():
                self._wait(0)  # join the copy stream before the capture ends

    def _check(self, k: int, unit: str) -> None:
        if self._active != k:
            raise RuntimeError(f"weight streaming: unit '{unit}' of segment {k} ran while segment "
                               f"{self._active} was loaded; the UNet's forward order differs from the plan")

    # ------------------------------------------------------------------------------------ public, cold
    def join(self) -> None:
        """Make the current stream wait for any outstanding prefetch (device-side; no host sync)."""
        for k in range(len(self._dst)):
            self._wait(k)

    def describe(self) -> dict[str, Any]:
        d = self.plan.describe()
        d.update({
            "mode": self.mode.value,
            "device_buffers": len(self._bufs),
            "device_buffer_bytes": len(self._bufs) * self.plan.buffer_bytes,
            "host_pinned": self._cuda,
            "fallback": self.fallback_reason,
            "calls": self._calls,
        })
        return d

    def remove(self) -> None:
        """Undo install: hooks removed, streamed parameters become (pinned) host tensors, buffers freed.

        Synchronizes the device once (cold path) so no copy is in flight when the buffers go away.
        """
        if self._cuda:
            torch.cuda.synchronize(self.device)
        for h in self._hooks + self._check_hooks:
            h.remove()
        self._hooks, self._check_hooks = [], []
        for s in self._slots:
            s.param.data = _view(self._host[s.segment], s.offset, s.nbytes, s.dtype, s.shape)
        self._dst, self._bufs = [], []
        logger.info("weight streaming removed; streamed weights are on the host")
