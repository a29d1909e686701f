"""IP-Adapter cross-attention: the image tokens ride in ``embeds`` behind the text tokens.

Every cross-attention layer (``attn2`` of each transformer block) gets an :class:`IPAttnProcessor`. The UNet
is called as always, ``unet(sample, timestep, embeds)``, with ``embeds [B, T_text + T_ip, D]``::

    embeds [B, T_text + T_ip, D]  ->  text = embeds[:, :T_text]   (views, no copy)
                                      ip   = embeds[:, T_text:]
    out = attention(q, to_k(text), to_v(text)) + scale * attention(q, to_k_ip(ip), to_v_ip(ip))

as diffusers' ``IPAdapterAttnProcessor2_0`` computes it (the IP tokens are not passed through ``norm_cross``).
``scale`` is one device tensor ``[1]`` fp32 shared by every layer (:class:`IPScale`), written in place
between frames: a scale or on/off change needs no recapture. Nothing here allocates beyond the attention
itself (the projections, the two SDPA calls and their reshapes), and nothing syncs the host, so the
processor runs inside a captured frame graph.

Export: ``IPScale.bound(t)`` makes every processor read ``t`` (an exported network's ``ip_scale`` input)
for the duration of a trace.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F


class IPScale:
    """The IP-Adapter scale every processor reads: ``tensor [1]`` fp32 on the engine's device."""

    def __init__(self, device: torch.device):
        self.tensor = torch.zeros(1, dtype=torch.float32, device=device)  # [1] fp32
        self.host_value = 0.0  # what was last written (for status; no device read)

    def write(self, value: float) -> None:
        """Between frames: an in-place fill, so captured graphs keep reading the same address."""
        self.tensor.fill_(float(value))
        self.host_value = float(value)

    @contextmanager
    def bound(self, tensor: torch.Tensor) -> Iterator[None]:
        """Read ``tensor`` instead of the buffer for the duration (export: the ``ip_scale`` graph input)."""
        saved, self.tensor = self.tensor, tensor
        try:
            yield
        finally:
            self.tensor = saved


class IPAttnProcessor(torch.nn.Module):
    """Cross-attention with IP-Adapter image tokens (diffusers ``Attention`` processor protocol)."""

    def __init__(self, text_tokens: int, hidden_size: int, cross_attention_dim: int, scale: IPScale):
        super().__init__()
        self.text_tokens = text_tokens  # T_text: where embeds splits into text and image tokens
        self.scale = scale  # shared, not a submodule or buffer: one address for every layer
        self.to_k_ip = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise RuntimeError("IPAttnProcessor is installed on cross-attention layers only (it got no "
                               "encoder_hidden_states)")
        T = self.text_tokens
        text, ip = encoder_hidden_states[:, :T], encoder_hidden_states[:, T:]  # [B, T_text, D], [B, T_ip, D]
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        B = text.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, T, B)
            attention_mask = attention_mask.view(B, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)  # [B, L, C]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_kv"):  # compile presets fast / max
            key, value = attn.to_kv(text).chunk(2, dim=-1)  # one matrix product for both: [B, T_text, C] each
        else:
            key, value = attn.to_k(text), attn.to_v(text)  # [B, T_text, C]
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        q = query.view(B, -1, heads, head_dim).transpose(1, 2)  # [B, heads, L, hd]
        k = key.view(B, -1, heads, head_dim).transpose(1, 2)
        v = value.view(B, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(B, -1, heads * head_dim).to(query.dtype)  # [B, L, C]
        ip_k = self.to_k_ip(ip).view(B, -1, heads, head_dim).transpose(1, 2)  # [B, heads, T_ip, hd]
        ip_v = self.to_v_ip(ip).view(B, -1, heads, head_dim).transpose(1, 2)
        ip_out = F.scaled_dot_product_attention(q, ip_k, ip_v, attn_mask=None, dropout_p=0.0, is_causal=False)
        ip_out = ip_out.transpose(1, 2).reshape(B, -1, heads * head_dim).to(query.dtype)  # [B, L, C]
        out = out.addcmul_(ip_out, self.scale.tensor)  # out + scale * ip_out, in place (scale [1] fp32)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(unet: torch.nn.Module) -> list[tuple[str, int]]:
    """(attn_processors key, hidden size) of every cross-attention layer, in ``unet.attn_processors`` order:
    the order the published IP-Adapter files number their layers in (1, 3, 5, ...: diffusers'
    ``_convert_ip_adapter_attn_to_diffusers``)."""
    cfg = unet.config
    channels = list(cfg.block_out_channels)
    out = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        elif name.startswith("down_blocks"):
            hidden = channels[int(name[len("down_blocks.")])]
        else:
            raise ValueError(f"cannot place cross-attention layer {name!r} of the UNet")
        out.append((name, hidden))
    return out


def install(unet: torch.nn.Module, ip_layers: dict[str, torch.Tensor], text_tokens: int, scale: IPScale,
            ) -> dict[str, IPAttnProcessor]:
    """Put an :class:`IPAttnProcessor` on every cross-attention layer of ``unet``, loaded from the ``ip_adapter``
    section of a published file (``{"1.to_k_ip.weight": ..., "1.to_v_ip.weight": ..., "3.to_k_ip.weight": ...}``).
    Self-attention processors (the temporal KV cache's, say) are left as they are."""
    param = next(unet.parameters())
    procs = {}
    for i, (name, hidden) in enumerate(cross_attention_layers(unet)):
        key = 2 * i + 1
        k, v = ip_layers[f"{key}.to_k_ip.weight"], ip_layers[f"{key}.to_v_ip.weight"]  # [hidden, D]
        proc = IPAttnProcessor(text_tokens, hidden, int(k.shape[1]), scale)
        proc.load_state_dict({"to_k_ip.weight": k, "to_v_ip.weight": v})
        procs[name] = proc.to(device=param.device, dtype=param.dtype).requires_grad_(False)
    put_back(unet, procs)
    return procs


def missing(unet: torch.nn.Module, procs: dict[str, IPAttnProcessor]) -> list[str]:
    """The cross-attention layers whose processor is no longer ours (a backend replaced it)."""
    current = unet.attn_processors
    return [name for name, proc in procs.items() if current.get(name) is not proc]


def put_back(unet: torch.nn.Module, procs: dict[str, IPAttnProcessor]) -> None:
    """``procs`` on their layers; every other layer keeps the processor it has."""
    current = dict(unet.attn_processors)
    current.update(procs)
    unet.set_attn_processor(current)
