"""The UNet's added conditioning: the inputs a family's UNet takes beyond (sample, timestep, embeds).

One small object per engine, chosen from the UNet config (``engines.base.unet_added_inputs``), never by a
model name. It owns how its buffers are shaped and when they are written; the frame step only passes the
buffers (``FrameBuffers.added``, the conditioning bundle) to ``nets.unet`` in the order the networks and
the exported specs expect.

- :class:`NoAddedConditioning` (SD 1.5, SD 2.1): no buffers, nothing to write.
- :class:`TextTimeConditioning` (SDXL): ``text_embeds [B, P]``, the pooled prompt embedding (uncond rows
  first, as in ``unet_in``), written when the prompt changes; ``time_ids [B, 6]`` = original size, crop
  top-left, target size = (H, W, 0, 0, H, W) as diffusers' SDXL img2img pipeline builds them for a frame of
  H x W pixels, written once when a layout's buffers are made (the size is part of the layout).
"""

from __future__ import annotations

from typing import Mapping, Protocol

import torch

from engines.base import unet_added_inputs

from .prompts import TextEmbedding


class AddedConditioning(Protocol):
    def allocate(self, rows: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]: ...

    def write_size(self, added: tuple[torch.Tensor, ...], height: int, width: int) -> None: ...

    def write_prompt(self, added: tuple[torch.Tensor, ...], cond: TextEmbedding, uncond: TextEmbedding | None,
                     uncond_rows: int) -> None: ...


class NoAddedConditioning:
    """SD 1.5 / 2.1: the UNet takes only (sample, timestep, embeds)."""

    def allocate(self, rows: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        return ()

    def write_size(self, added: tuple[torch.Tensor, ...], height: int, width: int) -> None:
        pass

    def write_prompt(self, added: tuple[torch.Tensor, ...], cond: TextEmbedding, uncond: TextEmbedding | None,
                     uncond_rows: int) -> None:
        pass


class TextTimeConditioning:
    """SDXL (``addition_embed_type`` "text_time"): pooled text embedding and size/crop ids."""

    def __init__(self, pooled_dim: int):
        self.pooled_dim = pooled_dim
        self.writes = {"prompt": 0, "size": 0}  # how often each buffer kind was written (tests, status)

    def allocate(self, rows: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        text_embeds = torch.zeros(rows, self.pooled_dim, dtype=dtype, device=device)  # [B, P]
        time_ids = torch.zeros(rows, 6, dtype=dtype, device=device)  # [B, 6]
        return text_embeds, time_ids

    def write_size(self, added: tuple[torch.Tensor, ...], height: int, width: int) -> None:
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=added[1].dtype)  # [6]
        added[1].copy_(ids.expand_as(added[1]))
        self.writes["size"] += 1

    def write_prompt(self, added: tuple[torch.Tensor, ...], cond: TextEmbedding, uncond: TextEmbedding | None,
                     uncond_rows: int) -> None:
        text_embeds = added[0]  # [B, P]
        text_embeds[uncond_rows:].copy_(cond.pooled.expand(text_embeds.shape[0] - uncond_rows, -1))
        if uncond_rows:
            text_embeds[:uncond_rows].copy_(uncond.pooled.expand(uncond_rows, -1))
        self.writes["prompt"] += 1


def conditioning_for(unet_config: Mapping) -> AddedConditioning:
    inputs = dict(unet_added_inputs(unet_config))
    if not inputs:
        return NoAddedConditioning()
    return TextTimeConditioning(inputs["text_embeds"][0])
