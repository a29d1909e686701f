"""Controls sent through an OSC Out DAT (the bridge's control port, 8247), and which component parameter
sends what.

Each helper takes the OSC Out DAT and calls its documented method ``sendOSC(address, [values])``, e.g.
``controls.prompt(op('oscout1'), 'a watercolor city')``. Works as an imported module or pasted into a Text
DAT named ``controls`` (``op('controls').module.prompt(...)``). Needs only the standard library (and no
dataclasses: a pasted DAT's module is not in sys.modules).

``PARAMETERS`` maps the built component's custom parameters to these messages (see build_component.py);
``send_parameter`` is what its Parameter Execute DAT calls on every change.

Extension point for ControlNet: the bridge has no ControlNet address yet. When it does, add one entry per
scale to ``CONTROLNET`` below, e.g. ``Control("Cnscale1", "ControlNet 1 Scale", "float", 1.0, (0.0, 2.0),
lambda v: ("/controlnet_scale", [0, float(v)]))``: the builder then adds the parameter to the Controls page
and the Parameter Execute DAT sends it, with no other change.
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

# ControlNet scales go here once the bridge has an address for them (see the module docstring).
CONTROLNET: tuple[Control, ...] = ()

BY_NAME: dict[str, Control] = {c.name: c for c in (*PARAMETERS, *CONTROLNET)}


def send_parameter(osc_out, pars, name: str) -> tuple[str, list] | None:
    """Send what parameter ``name`` means (None if it is not a control). Returns (address, values) sent."""
    control = BY_NAME.get(name)
    if control is None:
        return None
    value = None if control.kind == "pulse" else getattr(pars, name).eval()
    msg = control.message(value, pars)
    if msg is not None:
        osc_out.sendOSC(msg[0], msg[1])
    return msg


def send_all(osc_out, pars) -> list[tuple[str, list]]:
    """Send every control's current value (pulses excepted), e.g. when the engine has just become ready, so
    it matches the panel."""
    sent = []
    for control in (*PARAMETERS, *CONTROLNET):
        if control.kind == "pulse":
            continue
        msg = control.message(getattr(pars, control.name).eval(), pars)
        if msg is None:
            continue
        osc_out.sendOSC(msg[0], msg[1])
        sent.append(msg)
    return sent
