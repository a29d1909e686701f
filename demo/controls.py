"""What the web app controls: the Controls state, the request bodies that change it, and the nine presets.

Every request body is a strict pydantic model: unknown fields, wrong types and out-of-range values are
rejected (422) before anything changes. A preset stores every control the page shows (not playback state);
a field left out of a preset (None) keeps the current value when the preset is applied, so preset files
written before a control existed still load.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rtdiffusion.vocabulary import t_index_for  # noqa: F401  (the one strength/steps mapping)

from .conditioning import MAX_CONTROLNETS, MAX_IP_SCALE, ControlNetSettings

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000
SEED_MAX = 2**63 - 1
PRESET_SLOTS = 9


@dataclass
class Controls:
    """What the page controls, as the server last applied it to the engine."""

    prompt_a: str = ""
    prompt_b: str = ""
    blend: float = 0.0  # 0 = all A, 1 = all B
    method: str = "linear"
    negative_prompt: str = ""
    seed: int = 2
    strength: float = 0.35
    steps: int = 1
    t_index_list: list[int] = field(default_factory=lambda: [32])
    guidance_scale: float = 1.2
    delta: float = 1.0
    cfg: str = "none"
    similar_filter: bool = False
    similar_threshold: float = 0.98
    similar_max_skip: int = 10
    cache_enabled: bool = False
    cache_maxframes: int = 1
    cache_interval: int = 1
    paused: bool = False
    frozen: bool = False
    # ControlNet / IP-Adapter (conditioning.py): one {scale, enabled, start, end} per ControlNet the engine has;
    # ip_adapter_scale None = the engine has no IP-Adapter
    controlnets: list[dict[str, Any]] = field(default_factory=list)
    ip_adapter_scale: float | None = None
    ip_adapter_enabled: bool = True


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---- request bodies: every field optional (None = keep), unknown fields rejected ----------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PromptBody(_Body):
    prompt_a: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    prompt_b: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    blend: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    method: Literal["linear", "slerp"] | None = None
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)


class SeedBody(_Body):
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    random: bool = False


class StepsBody(_Body):
    strength: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    steps: int | None = Field(None, ge=1, le=16)
    t_index_list: list[int] | None = Field(None, min_length=1, max_length=16)


class GuidanceBody(_Body):
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, allow_inf_nan=False)
    delta: float | None = Field(None, ge=0.0, le=10.0, allow_inf_nan=False)
    cfg: Literal["none", "self", "initialize", "full"] | None = None


class FilterBody(_Body):
    enabled: bool | None = None
    threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    max_skip: int | None = Field(None, ge=0, le=1000)


class CacheBody(_Body):
    enabled: bool | None = None
    maxframes: int | None = Field(None, ge=1, le=16)
    interval: int | None = Field(None, ge=1, le=1000)


class PlaybackBody(_Body):
    paused: bool | None = None
    frozen: bool | None = None


class RecordBody(_Body):
    recording: bool


class PresetBody(_Body):
    """Every control, by its Controls name; a field left out (None) is not part of the preset."""

    prompt_a: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    prompt_b: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    blend: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    method: Literal["linear", "slerp"] | None = None
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    strength: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    steps: int | None = Field(None, ge=1, le=16)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, allow_inf_nan=False)
    delta: float | None = Field(None, ge=0.0, le=10.0, allow_inf_nan=False)
    cfg: Literal["none", "self", "initialize", "full"] | None = None
    similar_filter: bool | None = None
    similar_threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    similar_max_skip: int | None = Field(None, ge=0, le=1000)
    cache_enabled: bool | None = None
    cache_maxframes: int | None = Field(None, ge=1, le=16)
    cache_interval: int | None = Field(None, ge=1, le=1000)
    controlnets: list[ControlNetSettings] | None = Field(None, max_length=MAX_CONTROLNETS)
    ip_adapter_scale: float | None = Field(None, ge=0.0, le=MAX_IP_SCALE, allow_inf_nan=False)
    ip_adapter_enabled: bool | None = None


PRESET_FIELDS = tuple(PresetBody.model_fields)


def prompt_argument(c: Controls) -> str | list[tuple[str, float]]:
    """Prompt A and B with the crossfade, as the engine's update_prompt takes it."""
    if not c.prompt_b or c.blend <= 0.0:
        return c.prompt_a
    if c.blend >= 1.0:
        return c.prompt_b
    return [(c.prompt_a, 1.0 - c.blend), (c.prompt_b, c.blend)]


def apply_all(engine: Any, c: Controls, cache: bool = False) -> None:
    """Push every control in ``c`` to the engine (the engine validates; ConfigError leaves it unchanged).

    The temporal cache settings are sent only when ``cache`` is true or the cache is on: not every backend has
    one, and turning it off where there is none is no change."""
    engine.update(t_index_list=c.t_index_list, guidance_scale=c.guidance_scale, delta=c.delta, cfg=c.cfg,
                  similar_filter=c.similar_filter, similar_threshold=c.similar_threshold,
                  similar_max_skip=c.similar_max_skip)
    if cache or c.cache_enabled:
        engine.update(cache_enabled=c.cache_enabled, cache_maxframes=c.cache_maxframes,
                      cache_interval=c.cache_interval)
    apply_conditioning(engine, c)
    engine.update_prompt(prompt_argument(c), method=c.method, negative_prompt=c.negative_prompt)
    engine.update_seed(c.seed)


def apply_conditioning(engine: Any, c: Controls) -> None:
    """Push the ControlNet and IP-Adapter settings, for the parts the engine has."""
    if c.controlnets:
        engine.update(controlnets=[dict(u) for u in c.controlnets])
    if c.ip_adapter_scale is not None:
        engine.update(ip_adapter_scale=c.ip_adapter_scale, ip_adapter_enabled=c.ip_adapter_enabled)


class PresetStore:
    """Nine slots, loaded from and saved to an optional JSON file (a list of objects or nulls)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.slots: list[dict[str, Any] | None] = [None] * PRESET_SLOTS
        if path and os.path.exists(path):
            self._load(path)

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, list) or len(data) > PRESET_SLOTS:
                raise ValueError(f"expected a JSON list of at most {PRESET_SLOTS} presets (or nulls)")
            for i, item in enumerate(data):
                try:
                    self.slots[i] = None if item is None else PresetBody.model_validate(item).model_dump(
                        exclude_none=True)
                except ValidationError as exc:
                    first = exc.errors()[0]
                    where = ".".join(str(p) for p in first.get("loc", ())) or "preset"
                    raise ValueError(f"preset {i + 1}: {where}: {first.get('msg')}") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"presets file {path}: {exc}") from None

    def save(self) -> None:
        if not self.path:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".presets-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.slots, f, indent=1)
        os.replace(tmp, self.path)  # atomic: a crash leaves the old file or the new one

    def get(self, slot: int) -> dict[str, Any] | None:
        check_slot(slot)
        return self.slots[slot - 1]

    def put(self, slot: int, preset: dict[str, Any]) -> None:
        check_slot(slot)
        self.slots[slot - 1] = preset
        self.save()


def check_slot(slot: int) -> None:
    if not 1 <= slot <= PRESET_SLOTS:
        raise HttpError(404, f"preset slots are 1 to {PRESET_SLOTS}; got {slot}")
