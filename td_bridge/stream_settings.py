"""One drained OSC value into the settings of what makes frames: the single bridge's engine or one stream of a
multi-stream group (both have ``update(**kw)`` and ``update_seed(seed)``). The keys here are the ones both
have; the single bridge handles its others (similar-frame filter, cached attention, ControlNets, IP-Adapter)
itself (bridge.py), and the multi-stream receiver refuses them (stream_osc.py).
"""

from __future__ import annotations

from typing import Any

from .osc_controls import Key

# what an engine and a multi-stream group's streams can both change (rtdiffusion.multistream_streams.STREAM_KEYS)
SETTING_KEYS = frozenset({Key.PROMPT, Key.NEGATIVE_PROMPT, Key.PROMPT_INTERPOLATION, Key.SEED, Key.GUIDANCE_SCALE,
                          Key.DELTA, Key.T_LIST, Key.STRENGTH, Key.STEPS})


def _blend(parts: tuple) -> Any:
    """A parsed prompt or seed list: the single item itself, else [[item, weight], ...]."""
    return parts[0][0] if len(parts) == 1 else [list(p) for p in parts]


def apply_setting(target: Any, key: Key, value: Any) -> None:
    """``value`` (parsed by osc_controls) for ``key`` (one of SETTING_KEYS) into ``target``; ConfigError when the
    target refuses it (its settings then unchanged)."""
    if key is Key.PROMPT:
        target.update(prompt=_blend(value.parts))
    elif key is Key.NEGATIVE_PROMPT:
        target.update(negative_prompt=value)
    elif key is Key.PROMPT_INTERPOLATION:
        target.update(prompt_method=value.value)
    elif key is Key.SEED:
        target.update_seed(_blend(value.parts))
    elif key is Key.GUIDANCE_SCALE:
        target.update(guidance_scale=value)
    elif key is Key.DELTA:
        target.update(delta=value)
    elif key is Key.T_LIST:
        target.update(t_index_list=list(value))
    elif key is Key.STRENGTH:
        target.update(strength=value)
    elif key is Key.STEPS:
        target.update(steps=value)
    else:
        raise ValueError(f"{key.value} is not one of the settings apply_setting handles")
