"""Prompt encoding with a cache, and prompt blending (linear and slerp).

The text encoder(s) stay resident on the device (SDXL's two as one stack, ``models/text.py``); an SDXL
prompt's pooled embedding is cached, blended and written along with its token embeddings. Each distinct text is encoded once and kept (LRU), so an
unchanged prompt costs nothing and switching back to an earlier one costs only a copy.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from engines.graph import CapturedStep, CaptureError

from .config import PromptBlend, PromptSpec
from .models.text import TextStack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextEmbedding:
    """One (blended) prompt's conditioning: what the buffers are written from."""

    embeds: torch.Tensor  # [1, T, D]
    pooled: torch.Tensor | None = None  # [1, P] (SDXL's pooled, projected embedding), else None

    def map(self, fn) -> "TextEmbedding":
        return TextEmbedding(fn(self.embeds), None if self.pooled is None else fn(self.pooled))


class PromptEncoder:
    """Encodes prompts with a family's :class:`~rtdiffusion.models.text.TextStack` (one or two encoders,
    resident on the device), caching each distinct text."""

    def __init__(self, text: TextStack, device: torch.device, dtype: torch.dtype, capacity: int = 64):
        self.text = text
        self.device, self.dtype, self.capacity = device, dtype, capacity
        self.encodes = 0  # text-encoder calls so far (status: prompt_encodes)
        self._cache: OrderedDict[str, TextEmbedding] = OrderedDict()
        self._graph: CapturedStep | None = None
        self._ids: tuple[torch.Tensor, ...] = ()  # one [1, T] int64 per encoder: the captured stack's input
        self.graphed = False
        if device.type == "cuda":
            self._capture()

    def _capture(self) -> None:
        """On CUDA, capture the text encoders once for one prompt: a prompt change then costs one replay
        (about 1 ms) instead of hundreds of kernel launches, so it does not stutter the stream."""
        self._ids = tuple(torch.full((1, self.tokens), 0, dtype=torch.long, device=self.device)
                          for _ in range(self.text.encoders))
        try:
            with torch.no_grad():
                self._graph = CapturedStep(lambda: self.text(*self._ids), self.device, name="text encoder")
            self.graphed = True
        except CaptureError as exc:
            log.warning("text encoder runs eagerly (prompt changes cost more): %s", exc)

    @property
    def tokens(self) -> int:
        return self.text.tokens

    @property
    def dim(self) -> int:
        return self.text.dim

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> list[TextEmbedding]:
        """One embedding per text; only texts not in the cache reach the text encoders (in one batch)."""
        found = {t: self._cache[t] for t in texts if t in self._cache}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            ids = tuple(i.to(self.device) for i in self.text.tokenize(missing))  # [N, T] per encoder
            if self._graph is not None:
                out = []
                for n in range(len(missing)):
                    for dst, src in zip(self._ids, ids):
                        dst.copy_(src[n:n + 1])
                    self._graph.replay()
                    emb, pooled = self._graph.output
                    out.append(TextEmbedding(emb.to(self.dtype, copy=True),  # [1, T, D]
                                             None if pooled is None else pooled.to(self.dtype, copy=True)))
            else:
                emb, pooled = self.text(*ids)  # [N, T, D], [N, P] or None
                out = [TextEmbedding(emb[n:n + 1].to(self.dtype), None if pooled is None else
                                     pooled[n:n + 1].to(self.dtype)) for n in range(len(missing))]
            self.encodes += 1
            for text, emb in zip(missing, out):
                found[text] = emb
        for t in dict.fromkeys(texts):  # most recently used last; evict only after collecting the results
            self._cache[t] = found[t]
            self._cache.move_to_end(t)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return [found[t] for t in texts]

    def embed(self, spec: PromptSpec) -> TextEmbedding:
        """The (blended) conditional embedding of ``spec`` (embeds [1, T, D], pooled [1, P] or None)."""
        texts = [t for t, _ in spec.parts]
        weights = [w for _, w in spec.parts]
        embs = self.encode_texts(texts)
        if len(embs) == 1:
            return embs[0]
        if spec.method is PromptBlend.LINEAR:
            total = sum(weights)
            blend = lambda xs: sum(x.float() * (w / total) for x, w in zip(xs, weights)).to(self.dtype)  # noqa: E731
        else:
            blend = lambda xs: _slerp_many(xs, weights).to(self.dtype)  # noqa: E731
        pooled = None if embs[0].pooled is None else blend([e.pooled for e in embs])
        return TextEmbedding(blend([e.embeds for e in embs]), pooled)

    def negative(self, spec: PromptSpec) -> TextEmbedding:
        """The uncond embedding; an empty negative prompt is zeros where the family says so (SDXL)."""
        if not spec.negative and self.text.zero_empty_negative:
            return self.encode_texts([""])[0].map(torch.zeros_like)
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
