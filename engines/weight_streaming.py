"""Low-VRAM mode: stream UNet weights from pinned host memory into a fixed set of device buffers.

Two pieces, used in this order by the engine:

    plan = plan_streaming(unet, budget_bytes, reserve_bytes, dtype=torch.float16)   # pure, works on `meta`
    streamer = WeightStreamer.install(unet, plan, device, mode=StreamMode.PREFETCH)  # None if nothing streams
    streamer.describe()   # -> dict for status()
    streamer.join()       # make the current stream wait for an outstanding prefetch (before graph capture)
    streamer.remove()     # streamed weights go back to (pinned) host memory; hooks and device buffers are freed

Planner
-------
The UNet is cut into *units* in execution order (the order ``UNet2DConditionModel.forward`` runs them):

    stem   = time_embedding, class_embedding, add_embedding, encoder_hid_proj, conv_in   (those present)
    down_blocks.i   (split into resnets.j / attentions.j / downsamplers when too large)
    mid_block       (resnets.0, attentions.0, resnets.1)
    up_blocks.i     (resnets.j / attentions.j / upsamplers)
    head   = conv_norm_out, conv_out

An attention (``Transformer2DModel``) is split further into ``<name>.in`` (norm + proj_in), one unit per
``transformer_blocks.k`` and ``<name>.proj_out``. A unit is split only when it does not fit a segment buffer,
and only when its children cover all of its parameters (otherwise it stays whole). Parameters that are in no
unit, and all registered buffers, stay resident on the device.

Consecutive units are grouped into segments. The budget identity the planner enforces is

    resident_bytes + num_buffers * buffer_bytes + reserve_bytes <= budget_bytes

where ``reserve_bytes`` is what the caller keeps for everything else (text encoders, VAE, activations,
CUDA context) and ``buffer_bytes`` is the largest segment. When the whole UNet fits
(``total_bytes + reserve_bytes <= budget_bytes``) the plan has no segments and nothing changes. Segments are
balanced: the planner first finds the fewest segments greedy packing needs, then the smallest buffer that
still packs into that many. Every parameter is placed at a 256-byte aligned offset (counted in the sizes).

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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

ALIGN = 256  # bytes; every streamed parameter starts at a multiple of this in host and device buffers
GiB = 1024**3

# Modules run before the down blocks / after the up blocks, in forward order (absent ones are skipped).
_STEM = ("time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj", "conv_in")
_HEAD = ("conv_norm_out", "conv_out")


class StreamingPlanError(ValueError):
    """The budget cannot hold even the smallest unit (message names the unit and the bytes it needs)."""


class StreamMode(str, enum.Enum):
    PREFETCH = "prefetch"  # two device buffers, copy of segment k+1 overlaps compute of segment k
    SYNC = "sync"  # one device buffer, copy then compute


# --------------------------------------------------------------------------------------------- planner


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _param_bytes(p: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes a parameter takes in a streamed buffer: floating params are stored in ``dtype``."""
    return _aligned(p.numel() * (dtype if p.is_floating_point() else p.dtype).itemsize)


def _unique_params(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@dataclass(frozen=True)
class _Unit:
    """Modules that always travel together, in forward order; ``modules[0]`` runs first."""

    name: str
    modules: tuple[nn.Module, ...]

    def params(self) -> list[nn.Parameter]:
        return _unique_params(list(self.modules))

    def nbytes(self, dtype: torch.dtype) -> int:
        return sum(_param_bytes(p, dtype) for p in self.params())


def _top_units(unet: nn.Module) -> list[_Unit]:
    units = []
    stem = [getattr(unet, n) for n in _STEM if isinstance(getattr(unet, n, None), nn.Module)]
    if stem:
        units.append(_Unit("stem", tuple(stem)))
    for i, b in enumerate(unet.down_blocks):
        units.append(_Unit(f"down_blocks.{i}", (b,)))
    if getattr(unet, "mid_block", None) is not None:
        units.append(_Unit("mid_block", (unet.mid_block,)))
    for i, b in enumerate(unet.up_blocks):
        units.append(_Unit(f"up_blocks.{i}", (b,)))
    head = [getattr(unet, n) for n in _HEAD if isinstance(getattr(unet, n, None), nn.Module)]
    if head:
        units.append(_Unit("head", tuple(head)))
    return [u for u in units if u.params()]


def _children(unit: _Unit) -> list[_Unit] | None:
    """The unit's sub-units in forward order, or None when it cannot be split safely."""
    if len(unit.modules) != 1:
        return None
    m, name = unit.modules[0], unit.name
    kids: list[_Unit] = []
    if hasattr(m, "transformer_blocks") and hasattr(m, "proj_in"):  # Transformer2DModel
        kids.append(_Unit(f"{name}.in", tuple(x for x in (getattr(m, "norm", None), m.proj_in) if x is not None)))
        kids += [_Unit(f"{name}.transformer_blocks.{k}", (b,)) for k, b in enumerate(m.transformer_blocks)]
        kids.append(_Unit(f"{name}.proj_out", (m.proj_out,)))
    elif hasattr(m, "resnets"):  # down / mid / up block
        resnets = list(m.resnets)
        attns = list(getattr(m, "attentions", None) or [])
        if "Mid" in type(m).__name__:  # resnets[0], then (attn j, resnets[j+1])
            order = [("resnets", 0, resnets[0])]
            for j, a in enumerate(attns):
                order.append(("attentions", j, a))
                if j + 1 < len(resnets):
                    order.append(("resnets", j + 1, resnets[j + 1]))
        else:  # (resnets[j], attentions[j]) ..., then down/upsamplers
            order = []
            for j, r in enumerate(resnets):
                order.append(("resnets", j, r))
                if j < len(attns):
                    order.append(("attentions", j, attns[j]))
        kids += [_Unit(f"{name}.{kind}.{j}", (mod,)) for kind, j, mod in order]
        for sampler in ("downsamplers", "upsamplers"):
            if getattr(m, sampler, None) is not None:
                # The ModuleList itself is never called: its elements are the modules that run (and get hooks).
                kids.append(_Unit(f"{name}.{sampler}", tuple(getattr(m, sampler))))
    else:
        return None
    kids = [k for k in kids if k.params()]
    covered = {id(p) for k in kids for p in k.params()}
    if covered != {id(p) for p in unit.params()}:
        return None  # an unknown block layout: keep it whole rather than guess its order
    return kids


@dataclass(frozen=True)
class Segment:
    index: int
    units: tuple[str, ...]  # unit names in forward order
    param_bytes: int  # bytes in the flat buffer (aligned), copied once per UNet call


@dataclass(frozen=True)
class StreamingPlan:
    """What streams, in which pieces, and what it costs. Empty ``segments``: everything fits, nothing streams.

    All sizes are bytes on the device at ``dtype``; ``bytes_per_call`` is what crosses PCIe per UNet call.
    """

    budget_bytes: int
    reserve_bytes: int  # the caller's: text encoders + VAE + activations + context
    dtype: torch.dtype
    total_bytes: int  # all UNet parameters at dtype (aligned)
    resident_bytes: int  # UNet parameters + buffers that stay on the device while streaming
    num_buffers: int  # device segment buffers the plan budgets for (2: prefetch)
    buffer_bytes: int  # size of each device segment buffer (the largest segment); 0 when nothing streams
    segments: tuple[Segment, ...] = field(default=())

    @property
    def streaming(self) -> bool:
        return bool(self.segments)

    @property
    def bytes_per_call(self) -> int:
        return sum(s.param_bytes for s in self.segments)

    @property
    def device_bytes(self) -> int:
        """UNet bytes the device holds under this plan (resident part + segment buffers)."""
        if not self.streaming:
            return self.total_bytes
        return self.resident_bytes + self.num_buffers * self.buffer_bytes

    def describe(self) -> dict[str, Any]:
        return {
            "streaming": self.streaming,
            "budget_gib": round(self.budget_bytes / GiB, 3),
            "reserve_gib": round(self.reserve_bytes / GiB, 3),
            "dtype": str(self.dtype).replace("torch.", ""),
            "unet_gib": round(self.total_bytes / GiB, 3),
            "resident_gib": round(self.resident_bytes / GiB, 3),
            "num_segments": len(self.segments),
            "num_buffers": self.num_buffers if self.streaming else 0,
            "buffer_mib": round(self.buffer_bytes / 2**20, 1),
            "bytes_per_call": self.bytes_per_call,
            "segments": [
                {"units": f"{s.units[0]} .. {s.units[-1]}" if len(s.units) > 1 else s.units[0],
                 "num_units": len(s.units), "mib": round(s.param_bytes / 2**20, 1)}
                for s in self.segments
            ],
        }


@dataclass(frozen=True)
class _Node:
    """A unit with its size at the plan's dtype and its sub-units (None: cannot be split)."""

    unit: _Unit
    nbytes: int
    children: tuple[_Node, ...] | None


def _tree(units: list[_Unit], dtype: torch.dtype) -> list[_Node]:
    def node(u: _Unit) -> _Node:
        kids = _children(u)
        return _Node(u, u.nbytes(dtype), None if kids is None else tuple(node(k) for k in kids))

    return [node(u) for u in units]


def _split_to(nodes: list[_Node] | tuple[_Node, ...], cap: int) -> list[tuple[_Unit, int]]:
    """Units in forward order, split until each is <= cap where possible; (unit, bytes) pairs."""
    out: list[tuple[_Unit, int]] = []
    for nd in nodes:
        if nd.nbytes > cap and nd.children is not None:
            out += _split_to(nd.children, cap)
        else:
            out.append((nd.unit, nd.nbytes))
    return out


def _pack(sized: list[tuple[_Unit, int]], cap: int) -> list[list[tuple[_Unit, int]]] | None:
    """Greedy consecutive packing into bins of at most ``cap`` bytes; None if a unit is larger than cap."""
    bins: list[list[tuple[_Unit, int]]] = []
    used = cap + 1
    for u, nb in sized:
        if nb > cap:
            return None
        if used + nb > cap:
            bins.append([])
            used = 0
        bins[-1].append((u, nb))
        used += nb
    return bins


def plan_streaming(
    unet: nn.Module,
    budget_bytes: int,
    reserve_bytes: int,
    dtype: torch.dtype = torch.float16,
    num_buffers: int = 2,
) -> StreamingPlan:
    """Cut ``unet`` (a diffusers UNet2DConditionModel, any device including ``meta``) into streamed segments.

    Pure: reads parameter shapes only. Raises StreamingPlanError when the smallest unit cannot fit.
    """
    if budget_bytes <= 0 or reserve_bytes < 0:
        raise ValueError(f"budget_bytes must be > 0 and reserve_bytes >= 0; got {budget_bytes}, {reserve_bytes}")
    if num_buffers not in (1, 2):
        raise ValueError(f"num_buffers must be 1 (sync) or 2 (prefetch); got {num_buffers}")
    units = _top_units(unet)
    in_units = {id(p) for u in units for p in u.params()}
    all_params = _unique_params([unet])
    total = sum(_param_bytes(p, dtype) for p in all_params)
    resident = sum(_param_bytes(p, dtype) for p in all_params if id(p) not in in_units)
    resident += sum(_aligned(b.numel() * b.element_size()) for b in unet.buffers())
    common = dict(budget_bytes=int(budget_bytes), reserve_bytes=int(reserve_bytes), dtype=dtype, total_bytes=total)

    if total + reserve_bytes <= budget_bytes:
        return StreamingPlan(**common, resident_bytes=total, num_buffers=num_buffers, buffer_bytes=0)

    cap = (budget_bytes - reserve_bytes - resident) // num_buffers
    tree = _tree(units, dtype)
    finest = _split_to(tree, 0)  # every unit split as far as it goes
    smallest_cap = max(nb for _, nb in finest)
    if cap < smallest_cap:
        name, nb = max(((u.name, nb) for u, nb in finest), key=lambda x: x[1])
        need = reserve_bytes + resident + num_buffers * nb
        raise StreamingPlanError(
            f"max VRAM budget {budget_bytes / GiB:.2f} GiB is too small to stream this UNet: unit '{name}' "
            f"needs {nb / 2**20:.1f} MiB per segment buffer x {num_buffers} buffers + {resident / 2**20:.1f} MiB "
            f"resident + {reserve_bytes / GiB:.2f} GiB reserve = {need / GiB:.2f} GiB at least"
        )
    bins = _pack(_split_to(tree, cap), cap)
    assert bins is not None
    # Balance: the smallest buffer that still packs into the same number of segments.
    lo, hi = smallest_cap, cap
    while lo < hi:
        mid = (lo + hi) // 2
        b = _pack(_split_to(tree, mid), mid)
        if b is not None and len(b) <= len(bins):
            hi = mid
        else:
            lo = mid + 1
    bins = _pack(_split_to(tree, hi), hi)
    assert bins is not None
    segments = tuple(
        Segment(i, tuple(u.name for u, _ in b), sum(nb for _, nb in b)) for i, b in enumerate(bins)
    )
    assert len(segments) > num_buffers, "a plan with no more segments than buffers would fit resident"
    plan = StreamingPlan(
        **common, resident_bytes=resident, num_buffers=num_buffers,
        buffer_bytes=max(s.param_bytes for s in segments), segments=segments,
    )
    assert plan.device_bytes + reserve_bytes <= budget_bytes
    return plan


def budget_for_segments(
    unet: nn.Module, num_segments: int, reserve_bytes: int, dtype: torch.dtype = torch.float16, num_buffers: int = 2
) -> int:
    """The smallest budget (bytes) whose plan has at most ``num_segments`` segments (1: fully resident).

    For tests and benchmarks. The plan at that budget may have fewer segments when no budget gives exactly
    ``num_segments``; check ``len(plan.segments)``.
    """
    def count(budget: int) -> int:
        try:
            plan = plan_streaming(unet, budget, reserve_bytes, dtype, num_buffers)
        except StreamingPlanError:
            return 1 << 30
        return max(1, len(plan.segments))

    lo, hi = reserve_bytes + 1, reserve_bytes + _unique_total(unet, dtype) + 2 * GiB
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) <= num_segments:
            hi = mid
        else:
            lo = mid + 1
    return hi


def _unique_total(unet: nn.Module, dtype: torch.dtype) -> int:
    return sum(_param_bytes(p, dtype) for p in _unique_params([unet]))


def _resolve_units(unet: nn.Module) -> dict[str, _Unit]:
    """Every unit name the planner can produce, at any split depth, -> unit."""
    out: dict[str, _Unit] = {}
    todo = _top_units(unet)
    while todo:
        u = todo.pop()
        out[u.name] = u
        todo += _children(u) or []
    return out


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
