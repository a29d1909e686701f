"""Style images for the IP-Adapter: read on the caller's thread, encoded on the device once per image.

    set_style_image(image | [(image, weight), ...])            caller's thread (StyleImages.accept)
        path / PIL.Image / uint8 [H, W, 3] numpy or torch -> uint8 [H, W, 3] CPU tensor, keyed by content
        (sha1 of the pixels): the settings carry only ((key, weight), ...), so an unchanged image compares equal
    between frames (StyleEncoder.write_tokens, from the engine's _apply)
        each key not seen before: preprocess on the device (shortest side -> S, bicubic, centre crop S x S,
        CLIP mean/std; S = the vision config's image_size, 224 for ViT-H/14) -> CLIP vision encoder:
            base: image_embeds [1, E]        plus, full-face: hidden_states[-2] [1, 1 + (S/patch)^2, E']
        blend: the weighted average of those features (weights / their sum)
        project: diffusers' image projection -> tokens [1, T_ip, D]
        write: embeds[U:, T_text:] <- tokens; embeds[:U, T_text:] <- the uncond tokens: the projection of
        zero image embeds (base) or of a zero image's hidden states (plus, full-face), as diffusers' pipelines do

An image is encoded once (``encodes`` counts vision-encoder runs) and its features kept (LRU, ``capacity``
images), so switching back to an earlier style costs only the blend and the projection. Nothing here runs
per frame.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engines.graph import CapturedStep, CaptureError

from ..errors import ConfigError

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_SIDE = 4096  # a style image is read at 224 px; this bounds the upload and the resize on the device
_EXPECTED = ("a path to an image file, a PIL image, a uint8 [H, W, 3] numpy array or torch tensor, or a list of "
             "(image, weight) pairs with finite weights >= 0 summing to > 0")

Style = tuple[tuple[str, float], ...]  # ((image key, weight), ...): what StreamSettings carries


class StyleImages:
    """Decoded style images by content key (uint8 [H, W, 3] on the CPU), shared by both threads (lock)."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._images: OrderedDict[str, tuple[str, torch.Tensor]] = OrderedDict()  # key -> (label, pixels)
        self.protected: frozenset[str] = frozenset()  # keys of the applied style: never evicted

    def accept(self, image: Any) -> Style:
        """Validate and decode ``image``; ConfigError names what was expected and registers nothing."""
        decoded = [(*_decode(img), w) for img, w in _parts(image)]
        style = []
        with self._lock:
            for label, pixels, weight in decoded:
                key = _key(pixels)
                self._images[key] = (label, pixels)
                self._images.move_to_end(key)
                style.append((key, weight))
            keep = self.protected | {k for k, _ in style}
            for key in [k for k in self._images if k not in keep][:max(0, len(self._images) - self.capacity)]:
                del self._images[key]
        return tuple(style)

    def get(self, key: str) -> tuple[str, torch.Tensor]:
        with self._lock:
            return self._images[key]

    def keys(self) -> set[str]:
        with self._lock:
            return set(self._images)

    def describe(self, style: Style) -> list[list]:
        with self._lock:
            return [[self._images[k][0] if k in self._images else k, w] for k, w in style]


def _parts(image: Any) -> list[tuple[Any, float]]:
    if not isinstance(image, (list, tuple)):
        return [(image, 1.0)]
    if not image:
        raise ConfigError(f"a style image list is empty; expected {_EXPECTED}")
    parts = []
    for item in image:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(f"a style image list must hold (image, weight) pairs; got an item of type "
                              f"{type(item).__name__}. Expected {_EXPECTED}")
        img, w = item
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"style image weights must be finite numbers >= 0; got {w!r}")
        parts.append((img, float(w)))
    if sum(w for _, w in parts) <= 0:
        raise ConfigError("a style image list needs at least one weight > 0")
    return parts


def _decode(image: Any) -> tuple[str, torch.Tensor]:
    """(label, uint8 [H, W, 3] contiguous CPU tensor)."""
    from PIL import Image

    label = None
    if isinstance(image, (str, os.PathLike)):
        label = os.fspath(image)
        try:
            with Image.open(label) as im:
                image = np.array(im.convert("RGB"))
        except Exception as exc:  # missing file, not an image, truncated: PIL raises many classes
            raise ConfigError(f"style image {label!r} could not be read as an image ({type(exc).__name__}: {exc}); "
                              f"expected {_EXPECTED}") from exc
    elif isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        kind, dtype_ok, shape = "array", image.dtype == np.uint8, tuple(image.shape)
    elif isinstance(image, torch.Tensor):
        kind, dtype_ok, shape = "tensor", image.dtype == torch.uint8, tuple(image.shape)
    else:
        raise ConfigError(f"a style image must be {_EXPECTED}; got {type(image).__name__}")
    if not dtype_ok:
        raise ConfigError(f"a style image array must be uint8 (0-255) of shape [H, W, 3]; got dtype {image.dtype}")
    if len(shape) != 3 or shape[2] != 3 or not (1 <= shape[0] <= MAX_SIDE and 1 <= shape[1] <= MAX_SIDE):
        raise ConfigError(f"a style image array must have shape [H, W, 3] (RGB, sides 1..{MAX_SIDE}); "
                          f"got {list(shape)}")
    # a copy: the caller may reuse its buffer, and the image is keyed by its content now
    pixels = torch.from_numpy(np.array(image, copy=True)) if kind == "array" else image.detach().cpu().clone()
    pixels = pixels.contiguous()
    return label or f"{kind} {shape[1]}x{shape[0]}", pixels


def _key(pixels: torch.Tensor) -> str:
    h = hashlib.sha1(repr(tuple(pixels.shape)).encode())
    h.update(pixels.numpy().tobytes())
    return h.hexdigest()[:16]


class StyleEncoder:
    """The CLIP vision encoder and the image projection, resident on the device; features cached per image."""

    def __init__(self, vision: torch.nn.Module, projection: torch.nn.Module, hidden_states: bool,
                 device: torch.device, dtype: torch.dtype, capacity: int = 16):
        # hidden_states: the projection reads hidden_states[-2] (plus, full-face), else image_embeds (base)
        self.vision, self.projection, self.hidden_states = vision, projection, hidden_states
        self.device, self.dtype = device, dtype
        self.size = int(vision.config.image_size)  # S
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        self.images = StyleImages(capacity)
        self.encodes = 0  # vision-encoder runs on style images (status: ip_adapter.encodes)
        self._features: dict[str, torch.Tensor] = {}  # key -> [1, E] or [1, L, E'] on the device
        self._last: tuple[Style, torch.Tensor] | None = None  # the last blend and its tokens
        self._graph: CapturedStep | None = None
        self._pix: torch.Tensor | None = None  # [1, 3, S, S]: the captured encoder's input (CUDA)
        self.graphed = False
        if device.type == "cuda":
            self._capture()
        with torch.no_grad():
            self.uncond_tokens = self.projection(self._uncond_features())  # [1, T_ip, D]
        self.tokens = int(self.uncond_tokens.shape[1])  # T_ip

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [H, W, 3] (any device) -> pixel_values [1, 3, S, S] in the engine's dtype, on the device."""
        S = self.size
        x = pixels.to(self.device).permute(2, 0, 1)[None].float().div_(255.0)  # [1, 3, H, W] in [0, 1]
        h, w = x.shape[-2:]
        r = S / min(h, w)
        nh, nw = max(S, int(h * r)), max(S, int(w * r))  # floor, as transformers sizes it
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
        top, left = (nh - S) // 2, (nw - S) // 2
        x = x[..., top:top + S, left:left + S]  # [1, 3, S, S]
        return ((x - self.mean) / self.std).to(self.dtype)

    def _capture(self) -> None:
        """On CUDA, capture the vision encoder once for one image: a style change then costs one replay instead
        of hundreds of kernel launches between two frames (the same as the prompt encoder, prompts.py)."""
        self._pix = torch.zeros(1, 3, self.size, self.size, device=self.device, dtype=self.dtype)
        try:
            with torch.no_grad():
                self._graph = CapturedStep(lambda: self._encode(self._pix), self.device, name="image encoder")
            self.graphed = True
        except CaptureError as exc:
            log.warning("the IP-Adapter image encoder runs eagerly (style changes cost more): %s", exc)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The features the projection reads: image_embeds [N, E] (base) or hidden_states[-2] [N, L, E']."""
        if self._graph is not None and pixel_values.shape == self._pix.shape:
            self._pix.copy_(pixel_values)
            self._graph.replay()
            return self._graph.output.clone()  # the graph's output is overwritten by the next replay
        return self._encode(pixel_values)

    @torch.no_grad()
    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.hidden_states:
            return self.vision(pixel_values, output_hidden_states=True).hidden_states[-2]
        return self.vision(pixel_values).image_embeds

    def _uncond_features(self) -> torch.Tensor:
        if self.hidden_states:
            return self.encode(torch.zeros(1, 3, self.size, self.size, device=self.device, dtype=self.dtype))
        E = int(self.vision.config.projection_dim)
        return torch.zeros(1, E, device=self.device, dtype=self.dtype)

    def features(self, key: str) -> torch.Tensor:
        if key not in self._features:
            try:
                _, pixels = self.images.get(key)
            except KeyError:
                raise ConfigError(f"style image {key} was dropped before it was encoded (more than "
                                  f"{self.images.capacity} other images were set meanwhile); set it again") from None
            self._features[key] = self.encode(self.preprocess(pixels))
            self.encodes += 1
        return self._features[key]

    @torch.no_grad()
    def tokens_for(self, style: Style) -> torch.Tensor:
        """The projected tokens [1, T_ip, D] of a (blended) style; no style: the uncond tokens."""
        if not style:
            return self.uncond_tokens
        if self._last is not None and self._last[0] == style:
            return self._last[1]
        total = sum(w for _, w in style)
        blend = sum(self.features(k).float() * (w / total) for k, w in style)  # weighted average
        tokens = self.projection(blend.to(self.dtype))  # [1, T_ip, D]
        self._last = (style, tokens)
        return tokens

    def write_tokens(self, embeds: torch.Tensor, text_tokens: int, uncond_rows: int, style: Style) -> None:
        """Image tokens into the tail of ``embeds [B, T_text + T_ip, D]``, in place."""
        self.images.protected = frozenset(k for k, _ in style)  # first: nothing of it is evicted from now on
        tokens = self.tokens_for(style)
        tail = embeds[:, text_tokens:]  # [B, T_ip, D] view
        U = uncond_rows
        tail[U:].copy_(tokens.expand(tail.shape[0] - U, -1, -1))
        if U:
            tail[:U].copy_(self.uncond_tokens.expand(U, -1, -1))
        live = self.images.keys()
        for key in [k for k in self._features if k not in live]:  # evicted images: drop their features
            del self._features[key]
