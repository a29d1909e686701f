"""The text side of a model family: tokenizers and encoders behind one call.

A :class:`TextStack` turns texts into the UNet's prompt conditioning::

    tokenize(texts)  -> ids: one [N, T] int64 per encoder
    stack(*ids)      -> (embeds [N, T, D], pooled [N, P] or None)

- :class:`ClipText` (SD 1.5, SD 2.1 / sd-turbo): one CLIP text encoder, its last hidden state; no pooled.
- :class:`DualClipText` (SDXL, SDXL-Turbo): CLIP ViT-L and OpenCLIP bigG (with projection). As diffusers'
  SDXL pipelines do: embeds = the penultimate hidden states of both, concatenated (D = 768 + 1280 = 2048);
  pooled = the projected pooled output of the second encoder (P = 1280). An empty negative prompt is all
  zeros (diffusers' ``force_zeros_for_empty_prompt``).

Both are ``nn.Module``s so that moving, casting, hooking and capturing them works as for one encoder.
"""

from __future__ import annotations

import torch

from .tokenizer import Tokenizer


class TextStack(torch.nn.Module):
    tokens: int  # T
    dim: int  # D
    pooled_dim: int  # P, 0 when the family has no pooled embedding
    zero_empty_negative: bool = False

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def encoders(self) -> int:
        return len(self.tokenize([""]))


class ClipText(TextStack):
    def __init__(self, encoder: torch.nn.Module, tokenizer: Tokenizer):
        super().__init__()
        self.encoder, self.tokenizer = encoder, tokenizer
        self.tokens, self.dim, self.pooled_dim = tokenizer.max_length, int(encoder.config.hidden_size), 0

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, ...]:
        return (self.tokenizer(texts),)  # ([N, T],)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.encoder(ids, return_dict=False)[0], None  # [N, T, D]


class DualClipText(TextStack):
    zero_empty_negative = True

    def __init__(self, encoder: torch.nn.Module, tokenizer: Tokenizer, encoder_2: torch.nn.Module,
                 tokenizer_2: Tokenizer):
        super().__init__()
        self.encoder, self.tokenizer, self.encoder_2, self.tokenizer_2 = encoder, tokenizer, encoder_2, tokenizer_2
        if tokenizer.max_length != tokenizer_2.max_length:
            raise ValueError(f"the two tokenizers must pad to the same length; got {tokenizer.max_length} and "
                             f"{tokenizer_2.max_length}")
        self.tokens = tokenizer.max_length
        self.dim = int(encoder.config.hidden_size) + int(encoder_2.config.hidden_size)
        self.pooled_dim = int(encoder_2.config.projection_dim)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, ...]:
        return self.tokenizer(texts), self.tokenizer_2(texts)  # [N, T] each

    def forward(self, ids: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = self.encoder(ids, output_hidden_states=True).hidden_states[-2]  # [N, T, D1]
        out2 = self.encoder_2(ids_2, output_hidden_states=True)
        embeds = torch.cat([h1, out2.hidden_states[-2]], dim=-1)  # [N, T, D1 + D2]
        return embeds, out2.text_embeds  # [N, T, D], [N, P]
