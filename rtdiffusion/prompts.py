"""Prompt encoding with a cache, and prompt blending (linear and slerp).

The text encoder stays resident on the device. Each distinct text is encoded once and kept (LRU), so an
unchanged prompt costs nothing and switching back to an earlier one costs only a copy.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from engines.graph import CapturedStep, CaptureError

from .config import PromptBlend, PromptSpec
from .models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class PromptEncoder:
    def __init__(self, text_encoder: torch.nn.Module, tokenizer: Tokenizer, device: torch.device,
                 dtype: torch.dtype, capacity: int = 64):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.device, self.dtype, self.capacity = device, dtype, capacity
        self.encodes = 0  # text-encoder calls so far (status: prompt_encodes)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._graph: CapturedStep | None = None
        self._ids: torch.Tensor | None = None  # [1, T] int64: the captured encoder's input
        self.graphed = False
        if device.type == "cuda":
            self._capture()

    def _capture(self) -> None:
        """On CUDA, capture the text encoder once for one prompt: a prompt change then costs one replay
        (about 1 ms) instead of hundreds of kernel launches, so it does not stutter the stream."""
        self._ids = torch.full((1, self.tokens), 0, dtype=torch.long, device=self.device)
        try:
            with torch.no_grad():
                self._graph = CapturedStep(lambda: self.text_encoder(self._ids, return_dict=False)[0],
                                           self.device, name="text encoder")
            self.graphed = True
        except CaptureError as exc:
            log.warning("text encoder runs eagerly (prompt changes cost more): %s", exc)

    @property
    def tokens(self) -> int:
        return self.tokenizer.max_length

    @property
    def dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> list[torch.Tensor]:
        """[1, T, D] per text; only texts not in the cache reach the text encoder (in one batch)."""
        found = {t: self._cache[t] for t in texts if t in self._cache}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            ids = self.tokenizer(missing).to(self.device)  # [N, T]
            if self._graph is not None:
                out = []
                for row in ids:
                    self._ids.copy_(row[None])
                    self._graph.replay()
                    out.append(self._graph.output[0].to(self.dtype, copy=True))  # [T, D]
            else:
                out = self.text_encoder(ids, return_dict=False)[0].to(self.dtype)  # [N, T, D]
            self.encodes += 1
            for text, emb in zip(missing, out):
                found[text] = emb.unsqueeze(0)
        for t in dict.fromkeys(texts):  # most recently used last; evict only after collecting the results
            self._cache[t] = found[t]
            self._cache.move_to_end(t)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return [found[t] for t in texts]

    def embed(self, spec: PromptSpec) -> torch.Tensor:
        """The (blended) conditional embedding of ``spec``: [1, T, D]."""
        texts = [t for t, _ in spec.parts]
        weights = [w for _, w in spec.parts]
        embs = self.encode_texts(texts)
        if len(embs) == 1:
            return embs[0]
        if spec.method is PromptBlend.LINEAR:
            total = sum(weights)
            return sum(e.float() * (w / total) for e, w in zip(embs, weights)).to(self.dtype)
        return _slerp_many(embs, weights).to(self.dtype)

    def negative(self, spec: PromptSpec) -> torch.Tensor:
        return self.encode_texts([spec.negative])[0]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of each token vector (last dim), with linearly interpolated norms."""
    a, b = a.float(), b.float()
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(eps), b / nb.clamp_min(eps)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1 + eps, 1 - eps)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / so
    # nearly parallel vectors: fall back to linear interpolation of the unit vectors
    direction = torch.where(so.abs() < 1e-4, (1 - t) * ua + t * ub, direction)
    return direction * ((1 - t) * na + t * nb)


def _slerp_many(embs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    acc, cum = embs[0].float(), weights[0]
    for e, w in zip(embs[1:], weights[1:]):
        if cum + w > 0:
            acc = slerp(acc, e, w / (cum + w))
        cum += w
    return acc
