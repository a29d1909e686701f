"""Temporal KV cache: each frame's self-attention also attends to the keys/values of earlier frames.

Frame-by-frame img2img flickers; letting every self-attention layer (``attn1`` of each
``BasicTransformerBlock``) of the UNet look at the keys and values that the same layer produced for up to
``maxframes`` earlier frames, at the same UNet batch row (so the same noise level), steadies the stream
(StreamV2V's feature bank, the TouchDesigner StreamDiffusion forks' "cached attention").

One :class:`TemporalKVCache` owns every tensor the feature touches, allocated once at install for one
(batch rows, latent size, max_frames, dtype, device). Nothing is allocated and nothing syncs the host
afterwards: settings, reset and the ring bookkeeping are host logic that ends in in-place device writes
(``fill_`` of a few scalars), so a CUDA graph captured once stays valid across every setting change
(see :class:`Span` for the one exception, chosen at install).
The attention processors (and where the self-attention layers are) live in ``engines/kv_attention.py``;
this module owns the banks and their bookkeeping, and re-exports the processors.

Per self-attention layer (B = UNet batch rows, M = max_frames, L = tokens h_l*w_l, C = channels)::

    ring_k, ring_v  [B, 2+M, L, C] dtype   slot 0      fresh K/V of the current call (written by the processor)
                                           slots 1..M  the bank: K/V of earlier frames, ring order
                                           slot M+1    scratch: where the ring write goes on frames that
                                                       are not written (keeps the write branch-free)
    bias_L          [1, 1, 1, (1+M)*L] dtype   additive attention bias over [fresh | bank]: 0 on the fresh
                                           tokens always; per bank slot 0 (visible) or -inf (empty,
                                           beyond maxframes, or cache off). Shared by layers with equal L.
    slot_bias       [M] dtype              the same per-slot values, for exported networks
    slot_index      [1] int64              where the next ring write goes (0..M-1 bank, M scratch)

Batch-major slots make [fresh | bank] one strided view ``ring[:, :1+span].view(B, (1+span)*L, H, D)``:
no ``torch.cat`` and no copy per call. The price: for B > 1 the bank / fresh views are not contiguous, so
a TensorRT runner binding them directly needs B == 1 or a staging copy (see :meth:`binding_tensors`).

Masking rule. A bank slot takes part only if it holds a frame written since the last reset or enable,
its index is below ``maxframes`` and the cache is on. Excluded slots get -inf bias, so their softmax
weight is exactly 0 and the result equals plain attention (tests hold it within 1e-6 in fp32). The
current frame's own keys are never masked, so no row is ever all -inf (SDPA would return NaN).

Frame protocol (who calls what, in order)::

    install(unet, batch_rows, latent_hw, max_frames, dtype, device, span=Span.FULL) -> cache
        once, after building the UNet and before capture / compile / export.
    cache.set_settings(enabled, maxframes, interval)   host, between frames; in-place writes only.
    cache.reset()                                      host, between frames: empties the bank.
    per frame:
        unet(sample, timestep, embeds)   processors write fresh K/V into slot 0, read bank + bias
        cache.write_ring()               device only: ring[:, 1 + slot_index] <- ring[:, 0] (capturable)
        cache.after_frame()              host: marks the written slot visible, picks the next slot,
                                         writes slot_index and changed bias slots in place
    A graph backend captures ``unet + write_ring`` once and calls ``after_frame`` after each replay;
    with ``Span.ACTIVE`` it keys its graphs by ``cache.span`` (one capture per value). Settings and
    reset go after ``after_frame`` and before the next frame, never between a frame and its after_frame.
    A UNet call may use fewer rows than ``batch_rows`` (the first B rows of each ring); when the stream
    batch changes (steps, guidance), rows map to other noise levels: call ``reset()``.

Ring rule. Frames are counted from the last reset / enable (n = 0, 1, ...). Frame n is written when
``n % interval == 0``, into bank slot ``w % maxframes`` where w counts the writes; so after frame n the
bank holds the last ``maxframes`` written frames, and frame n+1 attends to them.

Export. :meth:`TemporalKVCache.export_module` returns a module whose forward is
``(sample, timestep, embeds, *banks, slot_bias) -> (eps, *fresh)`` with
``banks = kv_bank_k.0, kv_bank_v.0, kv_bank_k.1, ...`` each ``[B, M, L, C]`` and ``fresh`` each ``[B, L, C]``,
so the exported graph is static, the banks are explicit inputs and the ring write stays outside it.
"""

from __future__ import annotations

import enum
import logging
from contextlib import contextmanager
from typing import Iterator

import torch

from .kv_attention import (CachedSelfAttnProcessor, ExportSelfAttnProcessor, KVCacheExportWrapper, _check_supported,
                           _ExportIO, _Layer, _layer_hw, _level_sizes, _self_attention_layers)
from .specs import Binding, dtype_name

__all__ = ["Span", "TemporalKVCache", "install", "CachedSelfAttnProcessor", "ExportSelfAttnProcessor",
           "KVCacheExportWrapper", "NEG_INF"]

logger = logging.getLogger(__name__)

NEG_INF = float("-inf")


class Span(enum.Enum):
    """How many bank slots the attention reads; chosen at install.

    FULL: always all ``max_frames`` slots; on/off and ``maxframes`` only rewrite the bias. One captured
      graph (or compiled program, or exported net) serves every setting. Cost: the self-attention key
      length is always (1 + max_frames) x L, even with the cache off.
    ACTIVE: exactly ``maxframes`` slots when on, none when off (then the processor is plain attention:
      zero extra cost). Cost follows the settings, but the attention shapes change with them, so a graph
      backend needs one capture per ``cache.span`` value (and torch.compile one program per value).
    """

    FULL = "full"
    ACTIVE = "active"


class TemporalKVCache:
    """Owns the K/V rings, biases and ring bookkeeping of every self-attention layer. See the module doc."""

    def __init__(self, unet: torch.nn.Module, batch_rows: int, latent_hw: tuple[int, int], max_frames: int,
                 dtype: torch.dtype, device: torch.device | str, span: Span = Span.FULL) -> None:
        if not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be a positive integer; got {batch_rows!r}")
        if (not isinstance(latent_hw, (tuple, list)) or len(latent_hw) != 2
                or not all(isinstance(x, int) and x > 0 for x in latent_hw)):
            raise ValueError(f"latent_hw must be (height, width) in latent pixels; got {latent_hw!r}")
        if not isinstance(max_frames, int) or not 1 <= max_frames <= 16:
            raise ValueError(f"max_frames must be an integer from 1 to 16; got {max_frames!r}")
        if not isinstance(span, Span):
            raise ValueError(f"span must be one of {', '.join(s.name for s in Span)}; got {span!r}")
        self.unet = unet
        self.batch_rows = batch_rows
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.max_frames = max_frames
        self.dtype = dtype
        self.device = torch.device(device)
        self.span_policy = span

        found = _self_attention_layers(unet)
        if not found:
            raise ValueError("the UNet has no self-attention (attn1) layers to cache")
        levels = len(getattr(unet, "down_blocks"))
        sizes = _level_sizes(self.latent_hw, levels)
        M = max_frames
        self._biases: dict[int, torch.Tensor] = {}
        self.layers: list[_Layer] = []
        self._modules: list[torch.nn.Module] = []
        for name, attn in found:
            _check_supported(name, attn)
            h, w = _layer_hw(name, sizes)
            L, C = h * w, attn.to_q.out_features
            if L not in self._biases:
                self._biases[L] = torch.zeros(1, 1, 1, (1 + M) * L, dtype=dtype, device=self.device)  # [1,1,1,(1+M)L]
            self.layers.append(_Layer(
                name=name, rows=batch_rows, tokens=L, channels=C, heads=attn.heads,
                ring_k=torch.zeros(batch_rows, 2 + M, L, C, dtype=dtype, device=self.device),  # [B, 2+M, L, C]
                ring_v=torch.zeros(batch_rows, 2 + M, L, C, dtype=dtype, device=self.device),  # [B, 2+M, L, C]
                bias=self._biases[L]))
            self._modules.append(attn)
        self.slot_bias = torch.zeros(M, dtype=dtype, device=self.device)  # [M]
        self.slot_index = torch.zeros(1, dtype=torch.long, device=self.device)  # [1] int64

        # Host state; the device tensors above mirror it and are only ever written in place.
        self.enabled = False
        self.maxframes = M
        self.interval = 1
        self._filled = [False] * M  # bank slot holds a frame written since the last reset / enable
        self._visible = [True] * M  # host mirror of the bias (True: 0, False: -inf); True forces a first write
        self._index = -1  # host mirror of slot_index
        self._frame = 0  # frames since the last reset / enable
        self._ptr = 0  # next bank slot of the ring
        self._target = M  # where this frame's fresh K/V go: bank slot 0..M-1, or M (scratch)

        self._original = dict(unet.attn_processors)
        self.processors = {layer.name: CachedSelfAttnProcessor(self, layer) for layer in self.layers}
        self._install()
        self.reset()
        logger.info("temporal KV cache: %d self-attention layers, %d rows, latent %dx%d, max_frames %d, "
                    "span %s, %.1f MiB", len(self.layers), batch_rows, *self.latent_hw, M, span.value,
                    self.nbytes / 2**20)

    # ----- installation -------------------------------------------------------------------------------

    def _install(self) -> None:
        procs = dict(self._original)
        procs.update(self.processors)
        self.unet.set_attn_processor(procs)

    def reinstall(self) -> None:
        """Put the cached-attention processors back after :meth:`uninstall` (same banks, same addresses)."""
        self._install()

    def uninstall(self) -> None:
        """Put the UNet's original processors back (the buffers stay allocated until the cache is dropped)."""
        self.unet.set_attn_processor(dict(self._original))

    @property
    def nbytes(self) -> int:
        return (sum(l.ring_k.nbytes + l.ring_v.nbytes for l in self.layers)
                + sum(b.nbytes for b in self._biases.values()))

    # ----- host-side control (between frames; in-place device writes only, no sync) -------------------

    @property
    def span(self) -> int:
        """Bank slots the attention reads now (host int). FULL: always max_frames; ACTIVE: the settings."""
        if self.span_policy is Span.FULL:
            return self.max_frames
        return self.maxframes if self.enabled else 0

    def set_settings(self, enabled: bool, maxframes: int, interval: int) -> None:
        """Apply cache settings between frames. Enabling, or shrinking maxframes, drops stale frames."""
        if not isinstance(enabled, bool):
            raise ValueError(f"cache enabled must be true or false; got {enabled!r}")
        if not isinstance(maxframes, int) or isinstance(maxframes, bool) or not 1 <= maxframes <= self.max_frames:
            raise ValueError(f"cache maxframes must be an integer from 1 to {self.max_frames} (the allocated "
                             f"maximum); got {maxframes!r}")
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f"cache interval must be an integer >= 1; got {interval!r}")
        if enabled and not self.enabled:
            self._empty()
        if maxframes != self.maxframes:
            for s in range(maxframes, self.max_frames):
                self._filled[s] = False
            self._ptr %= maxframes
        self.enabled, self.maxframes, self.interval = enabled, maxframes, interval
        self._plan()
        self._publish()

    def reset(self) -> None:
        """Empty the bank (its contents stay but are masked out until overwritten)."""
        self._empty()
        self._plan()
        self._publish()

    def write_ring(self) -> None:
        """Device only, capturable: ring[:, 1 + slot_index] <- ring[:, 0] for every layer's K and V."""
        idx = self.slot_index
        for lay in self.layers:
            lay.ring_k[:, 1:].index_copy_(1, idx, lay.ring_k[:, 0:1])
            lay.ring_v[:, 1:].index_copy_(1, idx, lay.ring_v[:, 0:1])

    def after_frame(self) -> None:
        """Host: account for the frame just run (its ring write was enqueued) and prepare the next one."""
        if self._target < self.max_frames:
            self._filled[self._target] = True
            self._ptr = (self._ptr + 1) % self.maxframes
        self._frame += 1
        self._plan()
        self._publish()

    # ----- internals ----------------------------------------------------------------------------------

    def _empty(self) -> None:
        self._filled = [False] * self.max_frames
        self._frame = 0
        self._ptr = 0

    def _plan(self) -> None:
        """Pick where the next frame's K/V go and write it to slot_index (in place, only if it changed)."""
        write = self.enabled and self._frame % self.interval == 0
        self._target = self._ptr if write else self.max_frames
        if self._target != self._index:
            self.slot_index.fill_(self._target)
            self._index = self._target

    def _publish(self) -> None:
        """Write the bias of every bank slot whose visibility changed (in place, a few fill_ launches)."""
        for s in range(self.max_frames):
            visible = self.enabled and self._filled[s] and s < self.maxframes
            if visible == self._visible[s]:
                continue
            value = 0.0 if visible else NEG_INF
            self.slot_bias[s].fill_(value)
            for L, bias in self._biases.items():
                bias[..., (1 + s) * L:(2 + s) * L].fill_(value)
            self._visible[s] = visible

    # ----- inspection (tests, status) -----------------------------------------------------------------

    def bank_frames(self) -> list[bool]:
        """Host view: which bank slots the attention uses now."""
        return list(self._visible)

    @property
    def target_slot(self) -> int:
        """Where the next frame's K/V will be written: bank slot 0..M-1, or max_frames for 'not written'."""
        return self._target

    # ----- export ------------------------------------------------------------------------------------

    def export_bindings(self, batch_axis: str = "B") -> tuple[tuple[Binding, ...], tuple[Binding, ...]]:
        """(extra inputs, extra outputs) of the exported UNet, in :meth:`export_module` order.

        For ``engines.specs.unet_spec(p, extra_inputs=..., extra_outputs=...)``: the batch dim is the
        spec's dynamic axis ``batch_axis``; tokens, channels and max_frames are fixed.
        """
        dt = dtype_name(self.dtype)
        M = self.max_frames
        ins, outs = [], []
        for i, lay in enumerate(self.layers):
            for kv in ("k", "v"):
                ins.append(Binding(f"kv_bank_{kv}.{i}", (batch_axis, M, lay.tokens, lay.channels), dt))
                outs.append(Binding(f"kv_fresh_{kv}.{i}", (batch_axis, lay.tokens, lay.channels), dt))
        ins.append(Binding("kv_slot_bias", (M,), dt))
        return tuple(ins), tuple(outs)

    def binding_tensors(self) -> dict[str, torch.Tensor]:
        """The cache's own tensors behind each extra export name: bind these, then call write_ring().

        Views into the rings; contiguous (bindable by address) only when batch_rows == 1.
        """
        M = self.max_frames
        out: dict[str, torch.Tensor] = {}
        for i, lay in enumerate(self.layers):
            out[f"kv_bank_k.{i}"] = lay.ring_k[:, 1:1 + M]  # [B, M, L, C]
            out[f"kv_bank_v.{i}"] = lay.ring_v[:, 1:1 + M]  # [B, M, L, C]
            out[f"kv_fresh_k.{i}"] = lay.ring_k[:, 0]  # [B, L, C]
            out[f"kv_fresh_v.{i}"] = lay.ring_v[:, 0]  # [B, L, C]
        out["kv_slot_bias"] = self.slot_bias  # [M]
        return out

    @contextmanager
    def export_module(self) -> Iterator[KVCacheExportWrapper]:
        """Swap export processors onto the UNet for the duration; yields the wrapper to export / run."""
        io = _ExportIO()
        procs = dict(self._original)
        procs.update({lay.name: ExportSelfAttnProcessor(io, i, lay, self.max_frames)
                      for i, lay in enumerate(self.layers)})
        self.unet.set_attn_processor(procs)
        try:
            yield KVCacheExportWrapper(self.unet, io, len(self.layers))
        finally:
            self._install()


def install(unet: torch.nn.Module, batch_rows: int, latent_hw: tuple[int, int], max_frames: int,
            dtype: torch.dtype, device: torch.device | str, span: Span = Span.FULL) -> TemporalKVCache:
    """Allocate the cache for this (batch, resolution) and install its processors on every attn1 layer.

    ``batch_rows``: the largest UNet batch that will run (calls may use fewer rows). Starts disabled
    (every bank slot masked: the UNet computes plain attention). Reinstall for a larger batch or another
    resolution; ``set_settings`` covers everything else.
    """
    return TemporalKVCache(unet, batch_rows, latent_hw, max_frames, dtype, device, span)
