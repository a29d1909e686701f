"""The component's ControlNet and IP-Adapter pages against the TouchDesigner stand-in (td_standin.py; TouchDesigner
itself cannot run here): the parameters, what they send over real OSC (and that the bridge accepts it), the
launch flags they become, the control TOP streaming into a real control ring and the style TOP sending only
when asked."""

import numpy as np
import pytest

import td_standin as td
from osc_inbox import Inbox
from td_bridge.osc import ACTIONS, lookup
from td_bridge.ring import PixelFormat, RingLayout, RingReader, RowOrder
from td_bridge.touchdesigner import build_component, component, controls
from td_bridge.touchdesigner.build_component import build
from td_bridge.touchdesigner.osc_in_callbacks import handle


@pytest.fixture
def inbox():
    box = Inbox()
    yield box
    box.close()


def test_pages_parameters_and_the_style_chain(project):
    comp = build(project.project1)
    pages = {p.name: [par.name for par in p.pars] for p in comp.customPages}
    assert pages["ControlNet"] == [f"Cn{u}{f}" for u in (1, 2)
                                   for f in ("model", "preprocessor", "scale", "start", "end", "enable")]
    assert pages["IP-Adapter"] == ["Ipmodel", "Ipscale", "Ipenable", "Ipupdate", "Ipstyletop"]
    assert comp.par.Cn1preprocessor.menuNames == ["canny", "tile", "depth", "external"]
    with pytest.raises(td.tdError):
        comp.par.Cn1preprocessor = "pose"  # not one of ours
    watched = set(comp.op("par_exec").par.pars.eval().split())
    assert {"Cn1scale", "Cn2enable", "Ipscale", "Ipenable", "Ipupdate"} <= watched
    # the Style TOP parameter drives the select -> fit -> style_top chain, at the engine's size
    src = project.project1.create("constantTOP", "style_src")
    src.par.colorb = 1.0
    comp.par.Ipstyletop = src
    comp.par.Width, comp.par.Height = 16, 8
    img = comp.op("style_fit").numpyArray()
    assert img.shape == (8, 16, 4) and (img[..., 2] == 1.0).all()


def test_live_controls_send_what_the_bridge_accepts_and_only_for_units_that_run(project, inbox):
    comp = build(project.project1)
    comp.par.Controlport = inbox.port
    project.frame()
    mark = inbox.mark()
    comp.par.Cn1scale = 0.3  # no model: this unit is not started, nothing is sent
    comp.par.Ipscale = 0.9  # no IP-Adapter model: nothing either
    project.frame()
    comp.par.Cn2model = "random:controlnet-tiny"
    comp.par.Cn2scale, comp.par.Cn2enable = 0.7, False  # Cn1 is empty: Cn2 is the engine's ControlNet 0
    project.frame()
    inbox.wait("/controlnet/0/scale", lambda p: p == (pytest.approx(0.7),), after=mark, timeout=30)
    inbox.wait("/controlnet/0/enabled", lambda p: p == (0,), after=mark, timeout=30)
    comp.par.Cn1model, comp.par.Ipmodel = "random:controlnet-tiny", "random:ip-adapter-tiny"
    comp.par.Cn2end, comp.par.Ipscale, comp.par.Ipenable = 0.5, 0.4, False
    project.frame()
    inbox.wait("/controlnet/1/end", lambda p: p == (0.5,), after=mark, timeout=30)
    inbox.wait("/ipadapter_scale", lambda p: p == (pytest.approx(0.4),), after=mark, timeout=30)
    inbox.wait("/ipadapter_enable", lambda p: p == (0,), after=mark, timeout=30)
    with inbox.lock:
        sent = list(inbox.messages[mark:])
    assert ("/controlnet/0/scale", (pytest.approx(0.3),)) not in sent and len(inbox.all("/ipadapter_scale", mark)) == 1
    for address, args in sent:  # every one passes the bridge's own validation
        if address in ACTIONS:
            continue
        lookup(address).parse(args)
    # the helpers for scripts send valid messages too
    out = comp.op("oscout1")
    m2 = inbox.mark()
    controls.controlnet(out, 1, scale=0.5, enabled=True, end=0.8)
    controls.ipadapter_update(out)
    got = inbox.wait("/controlnets", after=m2, timeout=30)
    assert lookup("/controlnets").parse(got) == {1: {"scale": 0.5, "enabled": True, "end": 0.8}}
    inbox.wait("/ipadapter_update", after=m2, timeout=30)


def test_launch_settings_become_flags(project):
    comp = build(project.project1, python="/opt/rtd/.venv/bin/python", model="random:tiny")
    assert "--controlnet" not in component.settings(comp).command()  # nothing set: a plain engine
    comp.par.Cn1model, comp.par.Cn1preprocessor, comp.par.Cn1scale = "random:controlnet-tiny", "external", 0.8
    comp.par.Cn2model, comp.par.Cn2preprocessor = "lllyasviel/control_v11p_sd15_canny", "canny"
    comp.par.Ipmodel, comp.par.Ipscale = "random:ip-adapter-tiny", 0.5
    cmd = component.settings(comp).command()
    flags = [(a, b) for a, b in zip(cmd, cmd[1:]) if a in ("--controlnet", "--ip-adapter", "--ip-adapter-scale")]
    assert flags == [("--controlnet", "random:controlnet-tiny:external:0.8"),
                     ("--controlnet", "lllyasviel/control_v11p_sd15_canny:canny:1"),
                     ("--ip-adapter", "random:ip-adapter-tiny"), ("--ip-adapter-scale", "0.5")]
    from rtdiffusion.cli import build_parser  # the engine's own parser takes them as they are
    args = build_parser().parse_args(cmd[cmd.index("td"):])
    assert args.controlnet[0] == {"model": "random:controlnet-tiny", "preprocessor": "external", "scale": 0.8}
    assert args.ip_adapter == "random:ip-adapter-tiny" and args.ip_adapter_scale == 0.5


def test_control_top_streams_and_style_top_sends_only_when_asked(project, shm_name):
    comp = build(project.project1)
    comp.par.Width, comp.par.Height = 16, 8
    control_src = project.project1.create("constantTOP", "edges")
    control_src.par.colorr = 1.0
    comp.inputConnectors[1].connect(control_src)  # the component's second input: the control image
    style_src = project.project1.create("constantTOP", "painting")
    style_src.par.colorg = 1.0
    comp.par.Ipstyletop = style_src
    layout = RingLayout(16, 8, PixelFormat.RGBA8, RowOrder.BOTTOM_UP)
    control, style = RingReader.create(shm_name + "c", layout), RingReader.create(shm_name + "s", layout)
    try:
        # the bridge announces its rings over OSC; the callbacks put the names where the Script TOPs read them
        for address, ring in (("/stream-info/control-name", control), ("/stream-info/style-name", style)):
            handle(address, [ring.name], lambda k, v: None,
                   lambda path, par, value: setattr(getattr(comp.op(path).par, par), "val", value))
        for _ in range(4):
            project.frame()
        assert control.published >= 2  # every frame (delayed readback: from frame 2)
        assert style.published == 1  # once, when the ring was attached
        raw = style.empty_frame()
        assert style.read(raw) is not None and (raw[..., :3] == [0, 255, 0]).all()
        assert control.read(raw) is not None and (raw[..., :3] == [255, 0, 0]).all()
        style_src.par.colorg, style_src.par.colorb = 0.0, 1.0  # a new picture is not sent by itself...
        project.frame()
        assert style.published == 1
        comp.par.Ipupdate.pulse()  # ...but on the Update pulse
        project.frame()
        assert style.published == 2 and style.read(raw) is not None and (raw[..., :3] == [0, 0, 255]).all()
        project.frame()
        assert style.published == 2
        assert not comp.op("style_top").warnings() and not comp.op("control_top").warnings()
    finally:
        project.exit()
        control.close()
        style.close()


def test_operators_are_all_built():
    names = {n for n, *_ in build_component.OPERATORS}
    assert {"in2", "control_fit", "control_top", "style_select", "style_fit", "style_top"} <= names
    assert set(component.SCRIPT_TOPS) == {"input_top", "output_top", "control_top", "style_top"}
