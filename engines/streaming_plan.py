"""Low-VRAM mode, the planner: which UNet weights stream, in which pieces, and what it costs.

Pure: reads parameter shapes only, so it works on a ``meta`` UNet. The runtime that carries a plan out
(pinned host segments, device buffers, copy stream, hooks) is ``engines/weight_streaming.py``:

    plan = plan_streaming(unet, budget_bytes, reserve_bytes, dtype=torch.float16)   # here
    streamer = WeightStreamer.install(unet, plan, device, mode=StreamMode.PREFETCH)  # weight_streaming.py

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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ALIGN = 256  # bytes; every streamed parameter starts at a multiple of this in host and device buffers
GiB = 1024**3

# Modules run before the down blocks / after the up blocks, in forward order (absent ones are skipped).
_STEM = ("time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj", "conv_in")
_HEAD = ("conv_norm_out", "conv_out")


class StreamingPlanError(ValueError):
    """The budget cannot hold even the smallest unit (message names the unit and the bytes it needs)."""


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
