"""The OSC control vocabulary: every address the bridge accepts, with its validator. Bad values raise OscError
with a message that names what was expected.

Addresses (the names StreamDiffusionTD users know)::

    /prompt s                text
    /negative_prompt s       text
    /prompt_list s           JSON [[text, weight], ...], weights finite >= 0, sum > 0
    /prompt_interpolation s  "linear" | "slerp"
    /seed i                  0 .. 2**63-1 (an integral float such as 42.0 from a CHOP is accepted)
    /seed_list s             JSON [[seed, weight], ...]
    /guidance_scale f        0 .. 30
    /delta f                 0 .. 10
    /t_list i...             1 to 16 step indices, strictly increasing
    /similar_filter f        0 = off; 0 < threshold <= 1 = on with that cosine-similarity threshold
    /cached_attention s      JSON {"enabled": bool, "maxframes": 1..16, "interval": 1..1000}, any subset
    /controlnets s           JSON list by ControlNet index (or {"<index>": {...}}), partial: each item any of
                             scale | conditioning_scale 0..5, enabled bool, start | control_guidance_start
                             0..1, end | control_guidance_end 0..1; model | model_id, preprocessor (checked
                             against the running unit: they cannot change live); {} or null skips a unit
    /controlnet/<i>/scale f, /controlnet/<i>/enabled i, /controlnet/<i>/start f, /controlnet/<i>/end f
                             the same for ControlNet <i> (0-based), one field per message
    /ipadapter_scale f       0 .. 5
    /ipadapter_enable i      0 | 1 (a toggle's float 0.0 / 1.0 too)
    /pause /play /process_frame /get_status /stop /ipadapter_update
                             no argument, or one number (0 / false is ignored: a pulse's release);
                             /ipadapter_update re-reads the style image from the style ring
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from rtdiffusion.config import PromptBlend, PromptSpec, SeedSpec, parse_enum
from rtdiffusion.errors import ConfigError

MAX_TEXT = 60000
MAX_LIST_ITEMS = 1024


class OscError(ValueError):
    """A message that cannot be applied; the text says what was expected."""


class Key(enum.Enum):
    """What a control message sets. Messages with the same key overwrite each other (latest wins)."""

    PROMPT = "prompt"  # /prompt and /prompt_list
    NEGATIVE_PROMPT = "negative_prompt"
    PROMPT_INTERPOLATION = "prompt_interpolation"
    SEED = "seed"  # /seed and /seed_list
    GUIDANCE_SCALE = "guidance_scale"
    DELTA = "delta"
    T_LIST = "t_list"
    STRENGTH = "strength"  # /strength and /steps: the friendly pair, mapped to t_index_list by the engine
    STEPS = "steps"
    SIMILAR_FILTER = "similar_filter"
    CACHED_ATTENTION = "cached_attention"
    CONTROLNETS = "controlnets"  # /controlnets and /controlnet/<i>/<field>: merged per unit and field
    IP_ADAPTER_SCALE = "ip_adapter_scale"
    IP_ADAPTER_ENABLED = "ip_adapter_enabled"


class Action(enum.Enum):
    PAUSE = "/pause"
    PLAY = "/play"
    PROCESS_FRAME = "/process_frame"
    GET_STATUS = "/get_status"
    STOP = "/stop"
    IPADAPTER_UPDATE = "/ipadapter_update"


# ----------------------------------------------------------------------------------------------- validators
def _one(args: tuple, what: str) -> Any:
    if len(args) != 1:
        raise OscError(f"expected one {what} argument; got {len(args)}")
    return args[0]


def _text(args: tuple) -> str:
    v = _one(args, "string")
    if not isinstance(v, str):
        raise OscError(f"expected a string; got {_type(v)}")
    if len(v) > MAX_TEXT:
        raise OscError(f"text is {len(v)} characters; at most {MAX_TEXT}")
    return v


def _number(v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise OscError(f"expected a number from {lo:g} to {hi:g}; got {_type(v)}")
    if not math.isfinite(v):
        raise OscError(f"expected a finite number from {lo:g} to {hi:g}; got {v!r}")
    if not lo <= v <= hi:
        raise OscError(f"expected a number from {lo:g} to {hi:g}; got {v!r}")
    return float(v)


def _integer(v: Any, lo: int, hi: int) -> int:
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)  # OSC Out CHOPs send every channel as a float
    if isinstance(v, bool) or not isinstance(v, int):
        raise OscError(f"expected an integer from {lo} to {hi}; got {_type(v)}")
    if not lo <= v <= hi:
        raise OscError(f"expected an integer from {lo} to {hi}; got {v}")
    return v


def _type(v: Any) -> str:
    if isinstance(v, float):
        return f"float {v!r}"
    if isinstance(v, str):
        return f"string {v[:40]!r}" + ("..." if len(v) > 40 else "")
    if isinstance(v, (bytes, bytearray)):
        return f"blob of {len(v)} bytes"
    return f"{type(v).__name__} {v!r}"[:80]


def _reject_constant(name: str) -> Any:
    raise OscError(f"JSON may not hold {name}; numbers must be finite")


def _json(args: tuple, shape: str) -> Any:
    text = _text(args)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except OscError:
        raise
    except (ValueError, RecursionError) as exc:
        raise OscError(f"expected JSON {shape}; could not parse it: {str(exc)[:120]}") from None


def _pair_list(args: tuple, shape: str, parse):
    """A JSON list of [value, weight] pairs, parsed by the engine's own PromptSpec / SeedSpec rules."""
    v = _json(args, shape)
    if not isinstance(v, list) or not v or len(v) > MAX_LIST_ITEMS:
        raise OscError(f"expected a JSON list of 1 to {MAX_LIST_ITEMS} pairs {shape}; got {_type(v)}")
    try:
        return parse([tuple(p) if isinstance(p, list) else p for p in v])
    except ConfigError as exc:
        raise OscError(str(exc)) from None


def _prompt_list(args: tuple) -> PromptSpec:
    return _pair_list(args, '[["text", weight], ...]', PromptSpec.parse)


def _seed(args: tuple) -> SeedSpec:
    return SeedSpec.parse(_integer(_one(args, "integer"), 0, 2**63 - 1))


def _seed_list(args: tuple) -> SeedSpec:
    return _pair_list(args, "[[seed, weight], ...]", SeedSpec.parse)


def _interpolation(args: tuple) -> PromptBlend:
    try:
        return parse_enum(PromptBlend, _text(args), "prompt interpolation")
    except ConfigError as exc:
        raise OscError(str(exc)) from None


def _t_list(args: tuple) -> tuple[int, ...]:
    if not 1 <= len(args) <= 16:
        raise OscError(f"expected 1 to 16 integer step indices; got {len(args)} arguments")
    t = tuple(_integer(a, 0, 999) for a in args)
    if any(b <= a for a, b in zip(t, t[1:])):
        raise OscError(f"step indices must be strictly increasing (noisiest first); got {list(t)}")
    return t


def _similar_filter(args: tuple) -> tuple[bool, float | None]:
    v = _one(args, "number")
    if isinstance(v, bool):
        return v, None
    threshold = _number(v, 0.0, 1.0)
    return threshold > 0.0, (threshold if threshold > 0.0 else None)


_CACHE_KEYS = {"enabled": "cache_enabled", "maxframes": "cache_maxframes", "interval": "cache_interval"}


def _cached_attention(args: tuple) -> dict[str, Any]:
    shape = '{"enabled": true, "maxframes": 1..16, "interval": 1..1000}'
    v = _json(args, shape)
    if not isinstance(v, dict) or not v:
        raise OscError(f"expected a JSON object {shape}; got {_type(v)}")
    unknown = sorted(set(v) - set(_CACHE_KEYS))
    if unknown:
        raise OscError(f"unknown keys {unknown}; expected any of {sorted(_CACHE_KEYS)}")
    out: dict[str, Any] = {}
    if "enabled" in v:
        if not isinstance(v["enabled"], bool):
            raise OscError(f"'enabled' must be true or false; got {_type(v['enabled'])}")
        out["cache_enabled"] = v["enabled"]
    if "maxframes" in v:
        out["cache_maxframes"] = _integer(v["maxframes"], 1, 16)
    if "interval" in v:
        out["cache_interval"] = _integer(v["interval"], 1, 1000)
    return out


# ------------------------------------------------------------------------------------------- ControlNets
MAX_CONTROLNETS = 8
MAX_CONTROL_SCALE = 5.0
# JSON field -> the API's name (StreamDiffusion's own spellings are accepted beside ours)
_CN_FIELDS = {"scale": "scale", "conditioning_scale": "scale", "enabled": "enabled", "start": "start",
              "control_guidance_start": "start", "end": "end", "control_guidance_end": "end",
              "model": "model", "model_id": "model", "preprocessor": "preprocessor"}
_CN_SHAPE = ('[{"scale": 0..5, "enabled": true, "start": 0..1, "end": 0..1}, ...] by ControlNet index '
             '(or {"<index>": {...}})')
LIVE_CN_FIELDS = ("scale", "enabled", "start", "end")  # what engine.update(controlnets=...) changes live


def _flag(v: Any, what: str) -> bool:
    """true/false, or 0/1 as a number (TouchDesigner toggles send 0.0 / 1.0)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v in (0, 1):
        return bool(v)
    raise OscError(f"{what} must be true or false (or 0 / 1); got {_type(v)}")


def _cn_field(field: str, v: Any, where: str) -> Any:
    if field == "scale":
        try:
            return _number(v, 0.0, MAX_CONTROL_SCALE)
        except OscError as exc:
            raise OscError(f"{where}scale: {exc}") from None
    if field in ("start", "end"):
        try:
            return _number(v, 0.0, 1.0)
        except OscError as exc:
            raise OscError(f"{where}{field}: {exc}") from None
    if field == "enabled":
        return _flag(v, f"{where}enabled")
    if not isinstance(v, str) or not v or len(v) > 1000:
        raise OscError(f"{where}{field} must be a non-empty string; got {_type(v)}")
    return v


def _cn_item(index: Any, item: Any) -> tuple[int, dict[str, Any]] | None:
    i = _cn_index(index)
    if item is None:
        return None
    where = f"ControlNet {i}: "
    if not isinstance(item, dict):
        raise OscError(f"{where}expected an object like {{\"scale\": 0.8}}; got {_type(item)}")
    fields: dict[str, Any] = {}
    for key, v in item.items():
        if key == "index":
            continue
        if key in ("preprocessor_params", "preprocessor_options"):
            if v in (None, {}):
                continue
            raise OscError(f"{where}{key} cannot change while streaming (restart the engine with them)")
        field = _CN_FIELDS.get(key)
        if field is None:
            raise OscError(f"{where}unknown key {key!r}; expected any of {sorted(_CN_FIELDS)}")
        fields[field] = _cn_field(field, v, where)
    if "start" in fields and "end" in fields and fields["start"] > fields["end"]:
        raise OscError(f"{where}start must not be after end; got start {fields['start']:g}, end {fields['end']:g}")
    return (i, fields) if fields else None


def _cn_index(v: Any) -> int:
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    try:
        return _integer(v, 0, MAX_CONTROLNETS - 1)
    except OscError as exc:
        raise OscError(f"ControlNet index: {exc}") from None


def _controlnets(args: tuple) -> dict[int, dict[str, Any]]:
    """/controlnets JSON -> {index: {field: value}}, every item checked before anything is kept."""
    v = _json(args, _CN_SHAPE)
    if isinstance(v, dict) and any(k in _CN_FIELDS for k in v):
        v = [v]  # one bare object: ControlNet 0 (or its "index")
    if isinstance(v, list):
        if not 1 <= len(v) <= MAX_CONTROLNETS:
            raise OscError(f"expected JSON {_CN_SHAPE} with 1 to {MAX_CONTROLNETS} items; got {len(v)} items")
        pairs = [(item.get("index", n) if isinstance(item, dict) else n, item) for n, item in enumerate(v)]
    elif isinstance(v, dict) and v:
        pairs = list(v.items())
    else:
        raise OscError(f"expected JSON {_CN_SHAPE}; got {_type(v)}")
    out: dict[int, dict[str, Any]] = {}
    for index, item in pairs:
        got = _cn_item(index, item)
        if got is not None:
            out.setdefault(got[0], {}).update(got[1])
    return out


def _cn_unit(index: int, field: str) -> Callable[[tuple], dict[int, dict[str, Any]]]:
    def parse(args: tuple) -> dict[int, dict[str, Any]]:
        v = _one(args, "boolean" if field == "enabled" else "number")
        return {index: {field: _cn_field(field, v, "")}}
    return parse


def _ip_enable(args: tuple) -> bool:
    return _flag(_one(args, "number"), "/ipadapter_enable")


@dataclass(frozen=True)
class Control:
    key: Key
    parse: Callable[[tuple], Any]
    signature: str
    merge: bool = False  # the value is {index: {field: value}}, merged with what is pending (not replaced)


CONTROLS: dict[str, Control] = {
    "/prompt": Control(Key.PROMPT, lambda a: PromptSpec.parse(_text(a)), "s"),
    "/negative_prompt": Control(Key.NEGATIVE_PROMPT, _text, "s"),
    "/prompt_list": Control(Key.PROMPT, _prompt_list, "s (JSON)"),
    "/prompt_interpolation": Control(Key.PROMPT_INTERPOLATION, _interpolation, "s"),
    "/seed": Control(Key.SEED, _seed, "i"),
    "/seed_list": Control(Key.SEED, _seed_list, "s (JSON)"),
    "/guidance_scale": Control(Key.GUIDANCE_SCALE, lambda a: _number(_one(a, "number"), 0.0, 30.0), "f"),
    "/delta": Control(Key.DELTA, lambda a: _number(_one(a, "number"), 0.0, 10.0), "f"),
    "/t_list": Control(Key.T_LIST, _t_list, "i..."),
    "/strength": Control(Key.STRENGTH, lambda a: _number(_one(a, "number"), 0.0, 1.0), "f"),
    "/steps": Control(Key.STEPS, lambda a: _integer(_one(a, "integer"), 1, 16), "i"),
    "/similar_filter": Control(Key.SIMILAR_FILTER, _similar_filter, "f"),
    "/cached_attention": Control(Key.CACHED_ATTENTION, _cached_attention, "s (JSON)"),
    "/controlnets": Control(Key.CONTROLNETS, _controlnets, "s (JSON)", merge=True),
    "/ipadapter_scale": Control(Key.IP_ADAPTER_SCALE, lambda a: _number(_one(a, "number"), 0.0, 5.0), "f"),
    "/ipadapter_enable": Control(Key.IP_ADAPTER_ENABLED, _ip_enable, "i"),
}
ACTIONS = {a.value: a for a in Action}
UNIT_ADDRESS = "/controlnet/<i>/scale|enabled|start|end"
ADDRESSES = sorted([*CONTROLS, *ACTIONS, UNIT_ADDRESS])


def lookup(address: str) -> Control | None:
    """The control for ``address``: one of CONTROLS, or a per-unit /controlnet/<i>/<field> address."""
    control = CONTROLS.get(address)
    if control is not None or not address.startswith("/controlnet/"):
        return control
    parts = address.split("/")  # ['', 'controlnet', i, field]
    if len(parts) != 4 or parts[3] not in LIVE_CN_FIELDS:
        raise OscError(f"expected {UNIT_ADDRESS} (i from 0, one field per message); got {address[:120]!r}")
    if not parts[2].isdigit() or not 0 <= int(parts[2]) < MAX_CONTROLNETS:
        raise OscError(f"ControlNet index in the address must be 0 to {MAX_CONTROLNETS - 1}; got {parts[2][:20]!r}")
    sig = "i" if parts[3] == "enabled" else "f"
    return Control(Key.CONTROLNETS, _cn_unit(int(parts[2]), parts[3]), sig, merge=True)


def _action_fires(args: tuple) -> bool:
    if not args:
        return True
    if len(args) > 1:
        raise OscError(f"expected no argument or one number; got {len(args)} arguments")
    v = args[0]
    if isinstance(v, (bool, int, float)) and not (isinstance(v, float) and not math.isfinite(v)):
        return bool(v)
    raise OscError(f"expected no argument or one number; got {_type(v)}")
