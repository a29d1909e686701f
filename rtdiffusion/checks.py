"""Small checks shared by the engine config (config.py) and the live settings (settings.py)."""

from __future__ import annotations

import enum
import math
from typing import Any

from .errors import ConfigError
from .vocabulary import spell


def parse_enum(kind: type[enum.Enum], value: Any, what: str) -> Any:
    """Turn a string (or the enum itself) into ``kind``; unknown values name the allowed ones."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        for member in kind:
            if member.value == value.lower():
                return member
    allowed = ", ".join(repr(m.value) for m in kind)
    raise ConfigError(f"{spell(what)} must be one of {allowed}; got {value!r}")


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def finite(v: Any) -> bool:
    return is_number(v) and math.isfinite(v)
