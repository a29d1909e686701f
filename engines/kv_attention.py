"""Temporal KV cache, the attention side: where the self-attention layers are and the processors on them.

``CachedSelfAttnProcessor`` runs each attn1 of the UNet over [fresh K/V | bank K/V slots] with the cache's
bias; ``ExportSelfAttnProcessor`` and ``KVCacheExportWrapper`` make the bank an explicit input and the fresh
K/V explicit outputs for export. The banks, biases and ring bookkeeping they read are owned by
``engines/kv_cache.py``'s ``TemporalKVCache`` (its module docstring has the layout and the frame protocol).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .kv_cache import TemporalKVCache


@dataclass
class _Layer:
    """One self-attention layer's view of the cache."""

    name: str  # the attn_processors key
    rows: int  # B
    tokens: int  # L = h_l * w_l
    channels: int  # C = heads * head_dim
    heads: int
    ring_k: torch.Tensor  # [B, 2+M, L, C]
    ring_v: torch.Tensor  # [B, 2+M, L, C]
    bias: torch.Tensor  # [1, 1, 1, (1+M)*L], shared by layers with the same L


def _level_sizes(latent_hw: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """(h, w) at each UNet level: diffusers' stride-2 conv downsampler (padding 1) maps h -> ceil(h/2)."""
    sizes = [latent_hw]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def _layer_hw(name: str, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    parts = name.split(".")
    levels = len(sizes)
    if parts[0] == "down_blocks":
        return sizes[int(parts[1])]
    if parts[0] == "up_blocks":
        return sizes[levels - 1 - int(parts[1])]
    if parts[0] == "mid_block":
        return sizes[levels - 1]
    raise ValueError(f"cannot place self-attention layer {name!r}: expected it under down_blocks, "
                     "mid_block or up_blocks of a UNet2DConditionModel")


def _self_attention_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(attn_processors key, Attention module) for every attn1 that is a self-attention."""
    out = []
    for mod_name, module in unet.named_modules():
        if mod_name.endswith(".attn1") and hasattr(module, "set_processor") and not module.is_cross_attention:
            out.append((mod_name + ".processor", module))
    return out


def _check_supported(name: str, attn: torch.nn.Module) -> None:
    unsupported = [what for what, present in (
        ("spatial_norm", attn.spatial_norm is not None), ("group_norm", attn.group_norm is not None),
        ("norm_q/norm_k", attn.norm_q is not None or attn.norm_k is not None),
        ("kv_heads != heads", attn.to_k.out_features != attn.to_q.out_features)) if present]
    if unsupported:
        raise ValueError(f"self-attention layer {name!r} uses {', '.join(unsupported)}, which the temporal "
                         "KV cache does not support (it supports SD 1.5 / 2.x / XL style attn1 layers)")


class CachedSelfAttnProcessor:
    """attn1 processor: SDPA of the current queries over [fresh K/V | bank K/V slots], bias-masked.

    Writes the fresh K/V into ``ring[:, 0]`` (the one copy this adds to plain attention) and reads the
    bank through a view, so the call allocates nothing beyond what plain attention does. ``cache.span``
    (a host int, fixed under a captured graph) selects how many bank slots are read; 0 is plain attention.
    """

    def __init__(self, cache: "TemporalKVCache", layer: _Layer) -> None:
        self.cache = cache
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs) -> torch.Tensor:
        lay = self.layer
        B, L, C, H = hidden_states.shape[0], lay.tokens, lay.channels, lay.heads  # B <= lay.rows
        D = C // H
        if (hidden_states.ndim != 3 or not 1 <= B <= lay.rows or tuple(hidden_states.shape[1:]) != (L, C)
                or encoder_hidden_states is not None or attention_mask is not None):
            raise ValueError(f"{lay.name}: the temporal KV cache was installed for self-attention input "
                             f"[<= {lay.rows}, {L}, {C}] with no mask; got {list(hidden_states.shape)}"
                             f"{' with encoder_hidden_states' if encoder_hidden_states is not None else ''}"
                             f"{' with attention_mask' if attention_mask is not None else ''} "
                             "(reinstall the cache for a larger batch or another resolution)")
        residual = hidden_states
        q = attn.to_q(hidden_states).view(B, L, H, D).transpose(1, 2)  # [B, H, L, D]
        span = self.cache.span
        if span == 0:
            k = attn.to_k(hidden_states).view(B, L, H, D).transpose(1, 2)  # [B, H, L, D]
            v = attn.to_v(hidden_states).view(B, L, H, D).transpose(1, 2)  # [B, H, L, D]
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # [B, H, L, D]
        else:
            S = 1 + span
            ring_k, ring_v = lay.ring_k[:B], lay.ring_v[:B]  # [B, 2+M, L, C] views of the first B rows
            ring_k[:, 0].copy_(attn.to_k(hidden_states))  # fresh K [B, L, C]
            ring_v[:, 0].copy_(attn.to_v(hidden_states))  # fresh V [B, L, C]
            k = ring_k[:, :S].view(B, S * L, H, D).transpose(1, 2)  # [B, H, S*L, D], a view
            v = ring_v[:, :S].view(B, S * L, H, D).transpose(1, 2)  # [B, H, S*L, D], a view
            bias = lay.bias[..., : S * L]  # [1, 1, 1, S*L]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # [B, H, L, D]
        return _finish(attn, out, residual, B, L, C)


def _finish(attn, out: torch.Tensor, residual: torch.Tensor, B: int, L: int, C: int) -> torch.Tensor:
    out = out.transpose(1, 2).reshape(B, L, C)  # [B, L, C]
    out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class _ExportIO:
    """Carries the bank inputs into, and the fresh K/V out of, the export processors during one forward."""

    def __init__(self) -> None:
        self.banks: Sequence[torch.Tensor] = ()
        self.slot_bias: torch.Tensor | None = None
        self.fresh: list[torch.Tensor | None] = []


class ExportSelfAttnProcessor:
    """attn1 processor for export: the bank is a graph input, the fresh K/V a graph output.

    Reads all M slots (a static graph); the bias over them is built in-graph from the [M] slot bias.
    """

    def __init__(self, io: _ExportIO, index: int, layer: _Layer, max_frames: int) -> None:
        self.io, self.index, self.layer, self.max_frames = io, index, layer, max_frames

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs) -> torch.Tensor:
        lay, M = self.layer, self.max_frames
        B, L, C, H = hidden_states.shape[0], lay.tokens, lay.channels, lay.heads  # B: dynamic in export
        D, S = C // H, 1 + M
        residual = hidden_states
        bank_k = self.io.banks[2 * self.index]  # [B, M, L, C]
        bank_v = self.io.banks[2 * self.index + 1]  # [B, M, L, C]
        q = attn.to_q(hidden_states).view(B, L, H, D).transpose(1, 2)  # [B, H, L, D]
        k_new = attn.to_k(hidden_states)  # [B, L, C]
        v_new = attn.to_v(hidden_states)  # [B, L, C]
        k = torch.cat([k_new.unsqueeze(1), bank_k], 1).reshape(B, S * L, H, D).transpose(1, 2)  # [B, H, S*L, D]
        v = torch.cat([v_new.unsqueeze(1), bank_v], 1).reshape(B, S * L, H, D).transpose(1, 2)  # [B, H, S*L, D]
        slot_bias = self.io.slot_bias  # [M]
        bank_bias = slot_bias.unsqueeze(1).expand(M, L).reshape(1, 1, 1, M * L)  # [1, 1, 1, M*L]
        bias = torch.cat([bank_bias.new_zeros(1, 1, 1, L), bank_bias], -1)  # [1, 1, 1, S*L]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # [B, H, L, D]
        self.io.fresh[2 * self.index] = k_new
        self.io.fresh[2 * self.index + 1] = v_new
        return _finish(attn, out, residual, B, L, C)


class KVCacheExportWrapper(torch.nn.Module):
    """``(sample, timestep, embeds, *banks, slot_bias) -> (eps, *fresh)`` for export.

    banks: kv_bank_k.0, kv_bank_v.0, kv_bank_k.1, ... each [B, M, L, C]; kv_slot_bias [M] (0 visible, -inf excluded);
    fresh: kv_fresh_k.0, kv_fresh_v.0, ... each [B, L, C]. Bindings: :meth:`TemporalKVCache.export_bindings`.
    """

    spec_ordered = True  # engines.onnx_export.export_adapter uses it as it is

    def __init__(self, unet: torch.nn.Module, io: _ExportIO, n_layers: int) -> None:
        super().__init__()
        self.unet = unet
        self._io = io
        self._n = n_layers

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                *banks_and_bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(banks_and_bias) != 2 * self._n + 1:
            raise ValueError(f"expected {2 * self._n} bank tensors and the slot bias; got {len(banks_and_bias)}")
        self._io.banks, self._io.slot_bias = banks_and_bias[:-1], banks_and_bias[-1]
        self._io.fresh = [None] * (2 * self._n)
        eps = self.unet(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
        fresh = tuple(self._io.fresh)
        self._io.banks, self._io.slot_bias, self._io.fresh = (), None, []
        return (eps, *fresh)
