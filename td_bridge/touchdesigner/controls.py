"""Controls sent through an OSC Out DAT (the bridge's control port, 8247), and which component parameter
sends what.

Each helper takes the OSC Out DAT and calls its documented method ``sendOSC(address, [values])``, e.g.
``controls.prompt(op('oscout1'), 'a watercolor city')``. Works as an imported module or pasted into a Text
DAT named ``controls`` (``op('controls').module.prompt(...)``). Needs only the standard library (and no
dataclasses: a pasted DAT's module is not in sys.modules).

``PARAMETERS`` maps the built component's custom parameters to these messages (see build_component.py);
``send_parameter`` is what its Parameter Execute DAT calls on every change.

``CONTROLNET`` (the ControlNet page: two units, Cn1* and Cn2*) and ``IP_ADAPTER`` (the IP-Adapter page) are
built the same way. A unit's Model and Preprocessor, and the IP-Adapter's Model, are launch settings (the
launcher turns them into ``--controlnet MODEL:PREPROCESSOR:SCALE`` and ``--ip-adapter MODEL``; changing them
needs a restart, so they send nothing); scale, start, end and enable are live (``/controlnet/<i>/<field>``,
``/ipadapter_scale``, ``/ipadapter_enable``). A unit with an empty Model is not started and sends nothing,
and the engine numbers only the units that have one: with Cn1 empty, Cn2 is the engine's ControlNet 0.
"""

from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple


def prompt(osc_out, text):
    osc_out.sendOSC("/prompt", [str(text)])


def negative_prompt(osc_out, text):
    osc_out.sendOSC("/negative_prompt", [str(text)])


def prompt_list(osc_out, pairs):
    """pairs: [(text, weight), ...]; sent as JSON (the bridge accepts packets up to 64 KiB)."""
    osc_out.sendOSC("/prompt_list", [json.dumps([[str(t), float(w)] for t, w in pairs])])


def seed(osc_out, value):
    osc_out.sendOSC("/seed", [int(value)])


def guidance(osc_out, value):
    osc_out.sendOSC("/guidance_scale", [float(value)])


def t_list(osc_out, steps):
    osc_out.sendOSC("/t_list", [int(s) for s in steps])


def strength(osc_out, value):
    """0 keeps the input, 1 restyles fully; the engine maps strength and steps to its t_index_list."""
    osc_out.sendOSC("/strength", [float(value)])


def steps(osc_out, value):
    """Denoising steps per frame (1..4 is the useful range live)."""
    osc_out.sendOSC("/steps", [int(value)])


def controlnet(osc_out, index, scale=None, enabled=None, start=None, end=None):
    """Live settings of the engine's ControlNet ``index`` (0-based), e.g. ``controlnet(op('oscout1'), 0, scale=0.7)``;
    sent as one /controlnets JSON message (the fields not given stay as they are)."""
    fields = {k: v for k, v in (("scale", scale), ("enabled", None if enabled is None else bool(enabled)),
                                        ("start", start), ("end", end))
              if v is not None}
    osc_out.sendOSC("/controlnets", [json.dumps({str(int(index)): fields})])


def ipadapter_scale(osc_out, value):
    osc_out.sendOSC("/ipadapter_scale", [float(value)])


def ipadapter_enable(osc_out, on):
    osc_out.sendOSC("/ipadapter_enable", [int(bool(on))])


def ipadapter_update(osc_out):
    """Ask the bridge to read the style ring's picture again (encoded once)."""
    osc_out.sendOSC("/ipadapter_update", [])


def pause(osc_out):
    osc_out.sendOSC("/pause", [])


def play(osc_out):
    osc_out.sendOSC("/play", [])


def step(osc_out):
    osc_out.sendOSC("/process_frame", [])


def status(osc_out):
    osc_out.sendOSC("/get_status", [])


def stop(osc_out):
    osc_out.sendOSC("/stop", [])


# ------------------------------------------------------------------------- component parameters -> messages
class Control(NamedTuple):
    """One custom parameter on the component's Controls page and the OSC message it sends.

    kind: str | int | float | toggle | pulse.  message(value, pars) -> (address, [values]) or None; ``pars``
    is the component's parameter collection, for a control whose message needs other parameters too.
    """

    name: str
    label: str
    kind: str
    default: Any
    limits: tuple[float, float] | None
    message: Callable[[Any, Any], tuple[str, list] | None]


PARAMETERS: tuple[Control, ...] = (
    Control("Prompt", "Prompt", "str", "", None, lambda v, p: ("/prompt", [str(v)])),
    Control("Negative", "Negative Prompt", "str", "", None, lambda v, p: ("/negative_prompt", [str(v)])),
    Control("Seed", "Seed", "int", 2, (0, 2**31 - 1), lambda v, p: ("/seed", [int(v)])),
    Control("Strength", "Strength", "float", 0.35, (0.0, 1.0), lambda v, p: ("/strength", [float(v)])),
    Control("Steps", "Steps per Frame", "int", 1, (1, 4), lambda v, p: ("/steps", [int(v)])),
    Control("Guidance", "Guidance Scale", "float", 1.2, (0.0, 30.0), lambda v, p: ("/guidance_scale", [float(v)])),
    Control("Pause", "Pause", "toggle", False, None, lambda v, p: ("/pause" if v else "/play", [])),
    Control("Step", "Step One Frame", "pulse", None, None, lambda v, p: ("/process_frame", [])),
)

# ------------------------------------------------------------------------------- ControlNet, IP-Adapter
CN_UNITS = 2
PREPROCESSORS = ("canny", "tile", "depth", "external")
MENUS = {f"Cn{u}preprocessor": PREPROCESSORS for u in range(1, CN_UNITS + 1)}  # menu parameter -> its entries


def _text(pars, name: str) -> str:
    par = getattr(pars, name, None)
    return str(par.eval()).strip() if par is not None else ""


def engine_index(pars, unit: int):
    """The engine's index of ControlNet unit ``unit`` (1-based on the panel): the units before it that have a
    model; None when this unit has none (not started)."""
    if not _text(pars, f"Cn{unit}model"):
        return None
    return sum(1 for u in range(1, unit) if _text(pars, f"Cn{u}model"))


def _unit_message(unit: int, field: str, cast):
    def message(v, pars):
        i = engine_index(pars, unit)
        return None if i is None else (f"/controlnet/{i}/{field}", [cast(v)])
    return message


def _unit(u: int) -> tuple[Control, ...]:
    return (
        Control(f"Cn{u}model", f"ControlNet {u} Model", "str", "", None, lambda v, p: None),
        Control(f"Cn{u}preprocessor", f"ControlNet {u} Preprocessor", "menu", "canny", None, lambda v, p: None),
        Control(f"Cn{u}scale", f"ControlNet {u} Scale", "float", 1.0, (0.0, 2.0), _unit_message(u, "scale", float)),
        Control(f"Cn{u}start", f"ControlNet {u} Start", "float", 0.0, (0.0, 1.0), _unit_message(u, "start", float)),
        Control(f"Cn{u}end", f"ControlNet {u} End", "float", 1.0, (0.0, 1.0), _unit_message(u, "end", float)),
        Control(f"Cn{u}enable", f"ControlNet {u} Enable", "toggle", True, None, _unit_message(u, "enabled", int)),
    )


CONTROLNET: tuple[Control, ...] = tuple(c for u in range(1, CN_UNITS + 1) for c in _unit(u))


def _ip(address: str, cast):
    return lambda v, p: (address, [cast(v)]) if _text(p, "Ipmodel") else None


IP_ADAPTER: tuple[Control, ...] = (
    Control("Ipmodel", "IP-Adapter Model", "str", "", None, lambda v, p: None),
    Control("Ipscale", "IP-Adapter Scale", "float", 0.6, (0.0, 2.0), _ip("/ipadapter_scale", float)),
    Control("Ipenable", "IP-Adapter Enable", "toggle", True, None, _ip("/ipadapter_enable", int)),
)


def launch_args(pars) -> list[str]:
    """``rtdiffusion td`` flags for the ControlNet and IP-Adapter pages' launch settings."""
    args = []
    for u in range(1, CN_UNITS + 1):
        model = _text(pars, f"Cn{u}model")
        if model:
            scale = float(getattr(pars, f"Cn{u}scale").eval())
            args += ["--controlnet", f"{model}:{_text(pars, f'Cn{u}preprocessor') or 'canny'}:{scale:g}"]
    if _text(pars, "Ipmodel"):
        args += ["--ip-adapter", _text(pars, "Ipmodel"), "--ip-adapter-scale", f"{float(pars.Ipscale.eval()):g}"]
    return args


ALL: tuple[Control, ...] = (*PARAMETERS, *CONTROLNET, *IP_ADAPTER)
BY_NAME: dict[str, Control] = {c.name: c for c in ALL}


# ------------------------------------------------------------------------- a stream of a multi-stream bridge
# what `rtdiffusion td --streams N` accepts per stream, as /stream/<i><address> (td_bridge/stream_osc.py)
PER_STREAM = ("/prompt", "/negative_prompt", "/prompt_list", "/prompt_interpolation", "/seed", "/seed_list",
              "/guidance_scale", "/delta", "/t_list", "/strength", "/steps")


def stream_address(address: str, index: int) -> str:
    """``/stream/<index><address>`` for a per-stream control when ``index`` >= 0; else ``address`` unchanged
    (a single-stream bridge, every stream of a multi-stream one, or a bridge-wide action like /pause)."""
    return f"/stream/{int(index)}{address}" if index >= 0 and address in PER_STREAM else address


def stream_index(pars) -> int:
    """The stream this component drives on a multi-stream bridge: its ``Stream`` custom parameter (an Int
    parameter you add, 0-based), or -1 (none: un-prefixed addresses, which set every stream)."""
    par = getattr(pars, "Stream", None)
    if par is None:
        return -1
    try:
        return int(par.eval())
    except (TypeError, ValueError):
        return -1


def send_parameter(osc_out, pars, name: str) -> tuple[str, list] | None:
    """Send what parameter ``name`` means (None if it is not a control). Returns (address, values) sent;
    with a ``Stream`` parameter >= 0 the per-stream controls go to ``/stream/<Stream>/...``."""
    control = BY_NAME.get(name)
    if control is None:
        return None
    value = None if control.kind == "pulse" else getattr(pars, name).eval()
    msg = control.message(value, pars)
    if msg is not None:
        msg = (stream_address(msg[0], stream_index(pars)), msg[1])
        osc_out.sendOSC(msg[0], msg[1])
    return msg


def send_all(osc_out, pars) -> list[tuple[str, list]]:
    """Send every control's current value (pulses excepted), e.g. when the engine has just become ready, so
    it matches the panel."""
    sent = []
    for control in ALL:
        if control.kind == "pulse":
            continue
        msg = control.message(getattr(pars, control.name).eval(), pars)
        if msg is None:
            continue
        msg = (stream_address(msg[0], stream_index(pars)), msg[1])
        osc_out.sendOSC(msg[0], msg[1])
        sent.append(msg)
    return sent
