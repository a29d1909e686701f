"""Tokenizers: the model's own CLIP tokenizer, or a small one made locally for ``random:`` models.

Both turn a list of prompts into ``input_ids [N, 77] int64`` padded to the text encoder's length.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

import torch


class Tokenizer(Protocol):
    max_length: int

    def __call__(self, texts: list[str]) -> torch.Tensor: ...


class HashTokenizer:
    """A deterministic word tokenizer for random-weight models (no vocabulary files needed).

    Words and punctuation map to ids by a stable hash into ``[3, vocab_size)``; 0/1/2 are BOS/PAD/EOS as in
    the CLIP configs. Different prompts give different ids, equal prompts equal ids: all the engine needs
    from a tokenizer when the weights are random anyway. ``eos=vocab_size - 1`` makes EOS the highest id, as
    in the real CLIP vocabulary: CLIP text models whose config says eos_token_id 2 pool at the highest id
    (SDXL's pooled embedding), so the pool then lands on EOS and depends on the whole prompt.
    """

    def __init__(self, vocab_size: int, max_length: int = 77, bos: int = 0, pad: int = 1, eos: int = 2):
        self.vocab_size, self.max_length = vocab_size, max_length
        self.bos, self.pad, self.eos = bos, pad, eos

    def _ids(self, text: str) -> list[int]:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        top = self.vocab_size - 1 if self.eos == self.vocab_size - 1 else self.vocab_size  # word ids below EOS
        ids = [3 + int.from_bytes(hashlib.blake2s(w.encode(), digest_size=4).digest(), "little") % (top - 3)
               for w in words]
        ids = [self.bos] + ids[: self.max_length - 2] + [self.eos]
        return ids + [self.pad] * (self.max_length - len(ids))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self._ids(t) for t in texts], dtype=torch.long)  # [N, 77]


class ClipTokenizer:
    """The model's own tokenizer (transformers CLIPTokenizer) behind the same call."""

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        self.max_length = int(hf_tokenizer.model_max_length)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = self._tok(texts, padding="max_length", max_length=self.max_length, truncation=True,
                        return_tensors="pt")
        return out.input_ids  # [N, 77]
