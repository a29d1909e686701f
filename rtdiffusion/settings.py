"""Per-stream live settings: what may change while frames run, validated when it arrives.

:class:`StreamSettings` (prompt, seed, guidance, steps, filter, cache, IP-Adapter, ControlNets) and the
frozen pieces it holds. Updates are validated on the caller's thread (:func:`apply_updates`,
:func:`update_settings`: a ConfigError names what was expected and changes nothing) and applied by the
engine at the next frame boundary. What is fixed for an engine's life is :class:`~rtdiffusion.config.EngineConfig`.

Nothing in the frame loop compares strings: modes are enums, and mode choices become objects and
precomputed tensors when settings change (see ``guidance.py`` and ``schedule.py``).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from .checks import finite as _finite
from .checks import is_int as _is_int
from .checks import is_number as _is_number
from .checks import parse_enum
from .errors import ConfigError
from .vocabulary import check_steps, check_strength, spell, strength_of, t_index_for


class CfgMode(enum.Enum):
    """Residual classifier-free guidance (StreamDiffusion's RCFG).

    NONE: no guidance, the UNet sees only the conditional prompt (fastest).
    SELF: uncond noise is estimated from the previous step's residual; no extra UNet rows.
    INITIALIZE: one extra uncond row per new frame seeds the residual; F extra rows.
    FULL: ordinary CFG, the stream batch doubled (slowest, twice the UNet work).
    """

    NONE = "none"
    SELF = "self"
    INITIALIZE = "initialize"
    FULL = "full"


class PromptBlend(enum.Enum):
    LINEAR = "linear"
    SLERP = "slerp"


@dataclass(frozen=True)
class PromptSpec:
    """A prompt, or a weighted blend of prompts. ``parts`` are (text, weight) with weights summing to > 0."""

    parts: tuple[tuple[str, float], ...]
    method: PromptBlend = PromptBlend.LINEAR
    negative: str = ""

    @staticmethod
    def parse(prompt: Any, method: Any = PromptBlend.LINEAR, negative: Any = "") -> "PromptSpec":
        method = parse_enum(PromptBlend, method, "prompt blend method")
        if not isinstance(negative, str):
            raise ConfigError(f"negative prompt must be a string; got {type(negative).__name__}")
        if isinstance(prompt, str):
            return PromptSpec(((prompt, 1.0),), method, negative)
        if isinstance(prompt, (list, tuple)) and prompt:
            parts = []
            for item in prompt:
                if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
                        or not _is_number(item[1]) or not _finite(item[1]) or item[1] < 0):
                    raise ConfigError("a prompt list must hold (text, weight) pairs with finite weights >= 0; "
                                      f"got {item!r}")
                parts.append((item[0], float(item[1])))
            if sum(w for _, w in parts) <= 0:
                raise ConfigError("a prompt list needs at least one weight > 0")
            return PromptSpec(tuple(parts), method, negative)
        raise ConfigError("prompt must be a string or a non-empty list of (text, weight) pairs; "
                          f"got {type(prompt).__name__}")


@dataclass(frozen=True)
class SeedSpec:
    """A seed, or a weighted blend of seeds (noise = normalised weighted sum of each seed's noise)."""

    parts: tuple[tuple[int, float], ...]

    @staticmethod
    def parse(seed: Any) -> "SeedSpec":
        if _is_int(seed):
            return SeedSpec(((_check_seed(seed), 1.0),))
        if isinstance(seed, (list, tuple)) and seed:
            parts = []
            for item in seed:
                if (not isinstance(item, (list, tuple)) or len(item) != 2 or not _is_int(item[0])
                        or not _is_number(item[1]) or not _finite(item[1]) or item[1] < 0):
                    raise ConfigError(f"a seed list must hold (seed, weight) pairs with finite weights >= 0; got {item!r}")
                parts.append((_check_seed(item[0]), float(item[1])))
            if sum(w for _, w in parts) <= 0:
                raise ConfigError("a seed list needs at least one weight > 0")
            return SeedSpec(tuple(parts))
        raise ConfigError(f"seed must be an integer from 0 to 2**63-1 or a list of (seed, weight) pairs; got {seed!r}")


@dataclass(frozen=True)
class FilterSettings:
    """Similar-frame filter: skip frames nearly equal to the last processed one.

    threshold: cosine similarity above which frames may be skipped (0..1; 0.98 is a usual value).
    max_skip: at most this many frames in a row are skipped, so a slow drift still comes through.
    """

    enabled: bool = False
    threshold: float = 0.98
    max_skip: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"similar_filter must be true or false; got {self.enabled!r}")
        if not (_is_number(self.threshold) and _finite(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise ConfigError(f"{spell('similar_threshold')} must be a number from 0 to 1; got {self.threshold!r}")
        if not _is_int(self.max_skip) or not 0 <= self.max_skip <= 1000:
            raise ConfigError(f"similar_max_skip must be an integer from 0 to 1000; got {self.max_skip!r}")


@dataclass(frozen=True)
class CacheSettings:
    """Temporal KV cache (cached self-attention over earlier frames).

    enabled: on/off. maxframes: how many earlier frames each self-attention layer may look at (<= the
    allocated maximum). interval: write the bank every N frames. reset_token: bump to empty the banks.
    """

    enabled: bool = False
    maxframes: int = 1
    interval: int = 1
    reset_token: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"cache_enabled must be true or false; got {self.enabled!r}")
        if not _is_int(self.maxframes) or not 1 <= self.maxframes <= 16:
            raise ConfigError(f"cache_maxframes must be an integer from 1 to 16; got {self.maxframes!r}")
        if not _is_int(self.interval) or not 1 <= self.interval <= 1000:
            raise ConfigError(f"cache_interval must be an integer from 1 to 1000; got {self.interval!r}")


@dataclass(frozen=True)
class ControlNetSettings:
    """One ControlNet's live settings (rtdiffusion/control): written into buffers between frames, never recaptured.

    scale: conditioning scale (0..10; 1.0 as trained). enabled: False is scale 0 (the ControlNet still runs, so
    enabling it again is one buffer write). start, end: the fraction of the denoising steps it acts on, as
    diffusers' control_guidance_start / _end: slot s of S is kept unless s/S < start or (s+1)/S > end.
    """

    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if not (_is_number(self.scale) and _finite(self.scale) and 0.0 <= self.scale <= 10.0):
            raise ConfigError(f"a ControlNet scale must be a number from 0 to 10; got {self.scale!r}")
        for name in ("start", "end"):
            v = getattr(self, name)
            if not (_is_number(v) and _finite(v) and 0.0 <= v <= 1.0):
                raise ConfigError(f"a ControlNet {name} must be a number from 0 to 1 (a fraction of the steps); "
                                  f"got {v!r}")
        if self.start > self.end:
            raise ConfigError(f"a ControlNet start must be <= its end; got start {self.start!r}, end {self.end!r}")
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"a ControlNet's enabled must be true or false; got {self.enabled!r}")

    def keep(self, slot: int, slots: int) -> float:
        """diffusers' controlnet_keep for denoising step ``slot`` of ``slots``: 1.0 or 0.0."""
        return 1.0 - float(slot / slots < self.start or (slot + 1) / slots > self.end)


CONTROLNET_KEYS = ("scale", "start", "end", "enabled")


def update_controlnets(current: tuple[ControlNetSettings, ...], value: Any) -> tuple[ControlNetSettings, ...]:
    """``update(controlnets=...)``: a list (by position) or a dict {index: {...}} of partial settings."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        raise ConfigError("controlnets must be a list of settings dicts (by index) or a dict {index: settings}; "
                          f"got {type(value).__name__}")
    new = list(current)
    if items and not new:
        raise ConfigError("this engine has no ControlNets to change; give them to from_pretrained(controlnets=...) "
                          "(CLI: --controlnet)")
    for index, change in items:
        if isinstance(index, str) and index.isdigit():
            index = int(index)  # JSON object keys (OSC, websocket)
        if not _is_int(index) or not 0 <= index < len(new):
            raise ConfigError(f"ControlNet index must be an integer from 0 to {len(new) - 1} (this engine has "
                              f"{len(new)} ControlNet(s)); got {index!r}")
        if not isinstance(change, dict) or set(change) - set(CONTROLNET_KEYS):
            raise ConfigError(f"ControlNet {index}: settings must be a dict with keys among "
                              f"{', '.join(CONTROLNET_KEYS)}; got {change!r}")
        try:
            new[index] = dataclasses.replace(new[index], **change)
        except ConfigError as exc:
            raise ConfigError(f"ControlNet {index}: {exc}") from None
    return tuple(new)


@dataclass(frozen=True)
class IPAdapterSettings:
    """The IP-Adapter's live settings (used only when the engine has one; rtdiffusion/control/ip_adapter.py).

    scale: how strongly the style image's tokens act (0..5; 1.0 as trained, 0.6 the default); a buffer
    written between frames, never a recapture. enabled: False is scale 0. style: the style image blend as
    ((image key, weight), ...): the images themselves are held by the adapter (control/style.py), keyed by
    content, so an unchanged image compares equal and is never encoded again.
    """

    scale: float = 0.6
    enabled: bool = True
    style: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not (_is_number(self.scale) and _finite(self.scale) and 0.0 <= self.scale <= 5.0):
            raise ConfigError(f"ip_adapter_scale must be a number from 0 to 5; got {self.scale!r}")
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"ip_adapter_enabled must be true or false; got {self.enabled!r}")


@dataclass(frozen=True)
class StreamSettings:
    """What may change between frames. Derived sizes come from :meth:`batch_rows`.

    t_index_list: indices into the scheduler's ``num_inference_steps`` timesteps, one per denoising step
      (S = len). Lower index = more noise = stronger restyle. More steps: better images, S x the UNet work.
    cfg / guidance_scale / delta: residual CFG (see :class:`CfgMode`); guidance <= 1 disables it.
    """

    t_index_list: tuple[int, ...] = (32,)
    cfg: CfgMode = CfgMode.NONE
    guidance_scale: float = 1.2
    delta: float = 1.0
    prompt: PromptSpec = field(default_factory=lambda: PromptSpec((("", 1.0),)))
    seed: SeedSpec = field(default_factory=lambda: SeedSpec(((2, 1.0),)))
    filter: FilterSettings = field(default_factory=FilterSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    ip_adapter: IPAdapterSettings = field(default_factory=IPAdapterSettings)  # with an IP-Adapter only
    controlnets: tuple[ControlNetSettings, ...] = ()  # one per ControlNet of the engine, in index order

    def validate(self, num_inference_steps: int) -> "StreamSettings":
        t, name = self.t_index_list, spell("t_index_list")
        if not isinstance(t, tuple) or not t:
            raise ConfigError(f"{name} must be a non-empty list of integers; got an empty list")
        if len(t) > 16:
            raise ConfigError(f"{name} may hold at most 16 steps; got {len(t)}")
        for i in t:
            if not _is_int(i) or not 0 <= i < num_inference_steps:
                raise ConfigError(f"{name} entries must be integers from 0 to {num_inference_steps - 1} "
                                  f"(num_inference_steps={num_inference_steps}); got {list(t)!r}")
        if list(t) != sorted(t) or len(set(t)) != len(t):
            raise ConfigError(f"{name} must be strictly increasing (noisiest step first); got {list(t)!r}")
        if not (_is_number(self.guidance_scale) and _finite(self.guidance_scale) and 0 <= self.guidance_scale <= 30):
            raise ConfigError(f"{spell('guidance_scale')} must be a number from 0 to 30; got {self.guidance_scale!r}")
        if not (_is_number(self.delta) and _finite(self.delta) and 0 <= self.delta <= 10):
            raise ConfigError(f"{spell('delta')} must be a number from 0 to 10; got {self.delta!r}")
        if not isinstance(self.cfg, CfgMode):
            raise ConfigError(f"cfg must be a CfgMode; got {self.cfg!r}")
        return self

    @property
    def effective_cfg(self) -> CfgMode:
        """Guidance <= 1 means no guidance at all, whatever the mode (as in StreamDiffusion)."""
        return self.cfg if self.guidance_scale > 1.0 else CfgMode.NONE

    def batch_rows(self, frames: int) -> tuple[int, int]:
        """(stream rows S*F, extra uncond rows) of the UNet batch for ``frames`` frames per call."""
        sf = len(self.t_index_list) * frames
        extra = {CfgMode.NONE: 0, CfgMode.SELF: 0, CfgMode.INITIALIZE: frames, CfgMode.FULL: sf}
        return sf, extra[self.effective_cfg]


def _check_seed(seed: int) -> int:
    if not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be an integer from 0 to 2**63-1; got {seed!r}")
    return int(seed)


# Names accepted by StreamEngine.update(); each maps a keyword to a function of (settings, value).
def _set_filter(s: StreamSettings, **kw: Any) -> StreamSettings:
    return dataclasses.replace(s, filter=dataclasses.replace(s.filter, **kw))


def _set_cache(s: StreamSettings, **kw: Any) -> StreamSettings:
    return dataclasses.replace(s, cache=dataclasses.replace(s.cache, **kw))


def _t_index(v: Any) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(v)
    raise ConfigError(f"t_index_list must be a list of integers; got {v!r}")


UPDATE_KEYS = {
    "t_index_list": lambda s, v: dataclasses.replace(s, t_index_list=_t_index(v)),
    "cfg": lambda s, v: dataclasses.replace(s, cfg=parse_enum(CfgMode, v, "cfg")),
    "guidance_scale": lambda s, v: dataclasses.replace(s, guidance_scale=v),
    "delta": lambda s, v: dataclasses.replace(s, delta=v),
    "similar_filter": lambda s, v: _set_filter(s, enabled=v),
    "similar_threshold": lambda s, v: _set_filter(s, threshold=v),
    "similar_max_skip": lambda s, v: _set_filter(s, max_skip=v),
    "cache_enabled": lambda s, v: _set_cache(s, enabled=v),
    "cache_maxframes": lambda s, v: _set_cache(s, maxframes=v),
    "cache_interval": lambda s, v: _set_cache(s, interval=v),
    "ip_adapter_scale": lambda s, v: dataclasses.replace(s, ip_adapter=dataclasses.replace(s.ip_adapter, scale=v)),
    "ip_adapter_enabled": lambda s, v: dataclasses.replace(s, ip_adapter=dataclasses.replace(s.ip_adapter,
                                                                                               enabled=v)),
    "controlnets": lambda s, v: dataclasses.replace(s, controlnets=update_controlnets(s.controlnets, v)),
}


def apply_updates(settings: StreamSettings, num_inference_steps: int, **kw: Any) -> StreamSettings:
    """Return new settings with ``kw`` applied, or raise ConfigError and change nothing.

    ``strength`` / ``steps`` (either or both; the other keeps its current value) set ``t_index_list``
    through :mod:`rtdiffusion.vocabulary`; giving ``t_index_list`` as well is an error.
    """
    if kw.get("strength") is not None or kw.get("steps") is not None:
        if kw.get("t_index_list") is not None:
            raise ConfigError(f"give either {spell('t_index_list')} or {spell('strength')} / {spell('steps')}, "
                              "not both")
        strength, steps = kw.pop("strength", None), kw.pop("steps", None)
        current = settings.t_index_list
        strength = strength_of(current, num_inference_steps) if strength is None else \
            check_strength(strength, spell("strength"))
        steps = len(current) if steps is None else check_steps(steps, num_inference_steps, spell("steps"))
        kw["t_index_list"] = t_index_for(strength, steps, num_inference_steps)
    for key in ("strength", "steps", "t_index_list"):  # None: keep (the API's defaults are None)
        if kw.get(key, 0) is None:
            del kw[key]
    for key, value in kw.items():
        if key not in UPDATE_KEYS:
            raise ConfigError(f"unknown setting {key!r}; expected one of "
                              f"{', '.join(sorted([*UPDATE_KEYS, 'strength', 'steps']))}")
        settings = UPDATE_KEYS[key](settings, value)
    return settings.validate(num_inference_steps)


def check_cache_frames(s: StreamSettings, kv_max_frames: int) -> None:
    """cache_maxframes may not exceed the banks' allocated size (EngineConfig.kv_max_frames)."""
    if s.cache.maxframes > kv_max_frames:
        raise ConfigError(f"cache_maxframes must be at most kv_max_frames={kv_max_frames} (the banks' allocated "
                          f"size, set when the engine is built); got {s.cache.maxframes}")


def pop_prompt_and_seed(base: StreamSettings, kw: dict[str, Any]) -> StreamSettings:
    """``base`` with prompt, negative_prompt, prompt_method and seed taken (popped) from ``kw``: a prompt
    update keeps the parts not given. Raises ConfigError for a bad value."""
    if "prompt" in kw or "negative_prompt" in kw or "prompt_method" in kw:
        neg = kw.pop("negative_prompt", base.prompt.negative)
        method = kw.pop("prompt_method", base.prompt.method)
        prompt = kw.pop("prompt", [list(p) for p in base.prompt.parts])
        base = dataclasses.replace(base, prompt=PromptSpec.parse(prompt, method, neg))
    if "seed" in kw:
        base = dataclasses.replace(base, seed=SeedSpec.parse(kw.pop("seed")))
    return base


def update_settings(base: StreamSettings, num_inference_steps: int, kv_max_frames: int, has_ip_adapter: bool,
                    **kw: Any) -> StreamSettings:
    """``StreamEngine.update(**kw)`` on top of ``base``: prompt, negative_prompt, prompt_method, seed and
    cache_reset, then :func:`apply_updates` for the rest. Raises ConfigError and changes nothing."""
    base = pop_prompt_and_seed(base, kw)
    if kw.pop("cache_reset", False):
        base = dataclasses.replace(base, cache=dataclasses.replace(
            base.cache, reset_token=base.cache.reset_token + 1))
    if not has_ip_adapter and ("ip_adapter_scale" in kw or "ip_adapter_enabled" in kw):
        raise ConfigError("ip_adapter_scale / ip_adapter_enabled need an IP-Adapter: pass ip_adapter=... "
                          "to from_pretrained")
    new = apply_updates(base, num_inference_steps, **kw)
    check_cache_frames(new, kv_max_frames)
    return new
