"""Builds the whole rtdiffusion component in TouchDesigner. Run once in the textport (Dialogs > Textport),
or put these lines in a Text DAT and right-click > Run Script::

    import sys; sys.path.insert(0, r"C:/rtd/rtdiffusion")   # the repository root, unless it is in Preferences
    from td_bridge.touchdesigner.build_component import build
    build(op('/project1'), python=r"C:/rtd/rtdiffusion/.venv/Scripts/python.exe")

It makes a Base COMP ``rtdiffusion`` (rebuilding one of that name keeps its parameter values)::

    in1 (In TOP) --\
                    source_switch (Switch TOP; index 1 while Testred) -> fit1 (Fit TOP, Width x Height)
    check_red ----/      (Constant TOP, pure red)                          -> input_top (Script TOP) -> ring in
    ring out -> output_top (Script TOP) -> null_out (Null TOP) -> out1 (Out TOP)
    in2 (In TOP: control image) -> control_fit (Fit TOP) -> control_top (Script TOP) -> control ring
    style_select (Select TOP: the IP-Adapter page's Style TOP) -> style_fit (Fit TOP) -> style_top (Script TOP)
        -> style ring (sent on the Update pulse and when a bridge attaches, not every frame)
    oscout1 (OSC Out DAT -> Host:Controlport)      oscin1 (OSC In DAT <- Statusport, oscin_callbacks)
    par_exec (Parameter Execute DAT: controls -> OSC; Start / Stop -> launcher)
    frame_exec (Execute DAT: onStart clears status, onFrameStart force-cooks both Script TOPs and shows their
                link state, onExit stops)
    input_callbacks, output_callbacks, oscin_callbacks (Text DATs: the scripts in this folder)

Custom pages: Engine (Python, Repo, Model, Width, Height, Host, Controlport, Statusport, Inputname,
Outputname, Extraargs, Start, Stop), Controls (controls.PARAMETERS, Sendall), ControlNet (controls.CONTROLNET:
Cn1model, Cn1preprocessor, Cn1scale, Cn1start, Cn1end, Cn1enable, the same for Cn2), IP-Adapter
(controls.IP_ADAPTER: Ipmodel, Ipscale, Ipenable; Ipupdate, Ipstyletop),
Status (read-only: State, Active, Fps, Frames, Buildstage, Buildprogress, Buildleft, Error, Inputring, Outputring, Enginepid, Logfile,
Inputlink, Inputreconnects, Outputlink, Outputreconnects, Ringevent),
Channels (Swaprb, Testred, Checkorder, Channelorder). The callback DATs hold copies of this folder's scripts:
after updating the repository, run build() again.
"""

from __future__ import annotations

from pathlib import Path

from td_bridge.touchdesigner import component, controls

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent.parent  # the folder that contains td_bridge
NAME = "rtdiffusion"

ENGINE = (  # name, label, kind, default
    ("Python", "Engine Python", "file", ""),
    ("Repo", "Repository Root", "folder", str(REPO)),
    ("Model", "Model", "str", "stabilityai/sd-turbo"),
    ("Width", "Width", "int", 512),
    ("Height", "Height", "int", 512),
    ("Host", "Engine Host", "str", "127.0.0.1"),
    ("Controlport", "Control Port (OSC out)", "int", 8247),
    ("Statusport", "Status Port (OSC in)", "int", 8248),
    ("Inputname", "Input Ring Name", "str", ""),
    ("Outputname", "Output Ring Name", "str", ""),
    ("Extraargs", "Extra Engine Arguments", "str", ""),
    ("Start", "Start Engine", "pulse", None),
    ("Stop", "Stop Engine", "pulse", None),
)
STATUS = (  # read-only readouts
    ("State", "State", "str"), ("Active", "Engine Active", "toggle"), ("Fps", "Frames per Second", "float"),
    ("Frames", "Frames Published", "int"), ("Buildstage", "Build Stage", "str"),
    ("Buildprogress", "Build Progress", "float"), ("Buildleft", "Build Time Left", "str"), ("Error", "Last Error", "str"),
    ("Inputring", "Input Ring", "str"), ("Outputring", "Output Ring", "str"), ("Enginepid", "Engine PID", "int"),
    ("Logfile", "Engine Log", "str"),
    ("Inputlink", "Input Link", "str"), ("Inputreconnects", "Input Reconnects", "int"),
    ("Outputlink", "Output Link", "str"), ("Outputreconnects", "Output Reconnects", "int"),
    ("Ringevent", "Last Ring Event", "str"),
)
READOUTS = {s[0] for s in STATUS} | {"Channelorder"}
CHANNELS = (
    ("Swaprb", "Swap R and B (BGRA)", "toggle", False),
    ("Testred", "Send Red Test Frame", "toggle", False),
    ("Checkorder", "Check Channel Order", "pulse", None),
)
# What par_exec watches: every control and action (not the readouts, which the OSC callbacks write).
WATCHED = " ".join([c.name for c in controls.ALL] + ["Sendall", *component.ACTIONS])
PAGES = (("Controls", controls.PARAMETERS), ("ControlNet", controls.CONTROLNET), ("IP-Adapter", controls.IP_ADAPTER))

OPERATORS = (  # name, type, nodeX, nodeY
    ("in1", "inTOP", -600, 200), ("check_red", "constantTOP", -600, 0),
    ("source_switch", "switchTOP", -400, 100), ("fit1", "fitTOP", -200, 100), ("input_top", "scriptTOP", 0, 100),
    ("output_top", "scriptTOP", 0, -150), ("null_out", "nullTOP", 200, -150), ("out1", "outTOP", 400, -150),
    ("oscout1", "oscoutDAT", -400, -400), ("oscin1", "oscinDAT", -200, -400),
    ("par_exec", "parameterexecuteDAT", 0, -400), ("frame_exec", "executeDAT", 200, -400),
    ("input_callbacks", "textDAT", 0, 300), ("output_callbacks", "textDAT", 200, 300),
    ("oscin_callbacks", "textDAT", -200, -600),
    # in2 below in1: TouchDesigner numbers a COMP's In TOPs top to bottom, so in1 stays the first input
    ("in2", "inTOP", -600, -800), ("control_fit", "fitTOP", -200, -800), ("control_top", "scriptTOP", 0, -800),
    ("control_callbacks", "textDAT", 200, -800),
    ("style_select", "selectTOP", -400, -1000), ("style_fit", "fitTOP", -200, -1000),
    ("style_top", "scriptTOP", 0, -1000), ("style_callbacks", "textDAT", 200, -1000),
)
WIRES = (  # (source, destination, destination input)
    ("in1", "source_switch", 0), ("check_red", "source_switch", 1), ("source_switch", "fit1", 0),
    ("fit1", "input_top", 0), ("output_top", "null_out", 0), ("null_out", "out1", 0),
    ("in2", "control_fit", 0), ("control_fit", "control_top", 0), ("style_select", "style_fit", 0),
    ("style_fit", "style_top", 0),
)
TEXTS = {"input_callbacks": "input_top_callbacks.py", "output_callbacks": "output_top_callbacks.py",
         "oscin_callbacks": "osc_in_callbacks.py", "par_exec": "par_exec_callbacks.py",
         "frame_exec": "execute_callbacks.py", "control_callbacks": "input_top_callbacks.py",
         "style_callbacks": "style_top_callbacks.py"}


def build(parent, name: str = NAME, python: str = "", model: str | None = None, repo: str | None = None,
          x: int = 0, y: int = 0):
    """Build (or rebuild) the component inside COMP ``parent``; returns it."""
    kept = {}
    old = parent.op(name)
    if old is not None:  # rebuild: keep what the user set (not the live readouts)
        kept = {p.name: p.eval() for p in old.customPars if p.name not in READOUTS and not p.isPulse}
        old.destroy()
    comp = parent.create("baseCOMP", name)
    comp.nodeX, comp.nodeY = x, y
    _pages(comp)
    ops = {n: comp.create(t, n) for n, t, _, _ in OPERATORS}
    for n, _, nx, ny in OPERATORS:
        ops[n].nodeX, ops[n].nodeY = nx, ny
        for docked in list(ops[n].docked):  # TouchDesigner's template callbacks DATs: ours replace them
            docked.destroy()
    for n, file in TEXTS.items():
        ops[n].text = (SCRIPTS / file).read_text(encoding="utf-8")
    for src, dst, i in WIRES:
        ops[dst].inputConnectors[i].connect(ops[src])
    _wire_parameters(comp, ops)
    for value_name, value in {**kept, **({"Python": python} if python else {}),
                              **({"Model": model} if model else {}), **({"Repo": repo} if repo else {})}.items():
        par = getattr(comp.par, value_name, None)
        if par is not None:
            par.val = value
    component.clear_status(comp)
    return comp


def _append(page, name, label, kind, default=None, limits=None):
    add = {"str": page.appendStr, "int": page.appendInt, "float": page.appendFloat, "toggle": page.appendToggle,
           "pulse": page.appendPulse, "file": page.appendFile, "folder": page.appendFolder,
           "menu": page.appendMenu, "top": page.appendTOP}[kind]
    par = add(name, label=label)[0]
    if kind == "menu":
        par.menuNames = par.menuLabels = list(controls.MENUS[name])
    if default is not None:
        par.default = default
        par.val = default
    if limits is not None:
        par.normMin, par.normMax = limits
        par.min, par.max = limits
        par.clampMin = par.clampMax = True
    return par


def _pages(comp) -> None:
    engine = comp.appendCustomPage("Engine")
    for n, label, kind, default in ENGINE:
        _append(engine, n, label, kind, default)
    for title, page_controls in PAGES:
        page = comp.appendCustomPage(title)
        for c in page_controls:
            _append(page, c.name, c.label, c.kind, c.default, c.limits)
        if title == "Controls":
            _append(page, "Sendall", "Send All Controls", "pulse")
        elif title == "IP-Adapter":
            _append(page, "Ipupdate", "Update Style Image", "pulse")
            _append(page, "Ipstyletop", "Style TOP", "top")
    status = comp.appendCustomPage("Status")
    for n, label, kind in STATUS:
        _append(status, n, label, kind).readOnly = True
    channels = comp.appendCustomPage("Channels")
    for n, label, kind, default in CHANNELS:
        _append(channels, n, label, kind, default)
    _append(channels, "Channelorder", "Channel Order", "str").readOnly = True


def _wire_parameters(comp, ops) -> None:
    res = ("parent().par.Width", "parent().par.Height")
    for n in ("fit1", "check_red", "control_fit", "style_fit"):
        ops[n].par.outputresolution = "custom"
        ops[n].par.resolutionw.expr, ops[n].par.resolutionh.expr = res
    for n in ("fit1", "control_fit", "style_fit"):
        ops[n].par.fit = "fitbest"
    ops["style_select"].par.top.expr = "parent().par.Ipstyletop"
    red = ops["check_red"].par
    red.colorr, red.colorg, red.colorb, red.alpha = 1.0, 0.0, 0.0, 1.0
    ops["source_switch"].par.index.expr = "1 if parent().par.Testred else 0"

    for top, cb in (("input_top", "input_callbacks"), ("output_top", "output_callbacks"),
                    ("control_top", "control_callbacks"), ("style_top", "style_callbacks")):
        ops[top].par.callbacks = cb
        ops[cb].module.onSetupParameters(ops[top])  # adds Ringname (and Delayed), Swaprb
        ops[top].par.Swaprb.expr = "parent().par.Swaprb"
    comp.par.Inputring.expr = "me.op('input_top').par.Ringname"
    comp.par.Outputring.expr = "me.op('output_top').par.Ringname"

    out = ops["oscout1"].par
    out.protocol, out.active = "msging", True
    out.address.expr, out.port.expr = "parent().par.Host", "parent().par.Controlport"
    inn = ops["oscin1"].par
    inn.protocol, inn.active, inn.callbacks = "msging", True, "oscin_callbacks"
    inn.port.expr = "parent().par.Statusport"

    pe = ops["par_exec"].par
    pe.op, pe.pars, pe.custom, pe.builtin = "..", WATCHED, True, False
    pe.valuechange, pe.onpulse, pe.active = True, True, True
    fe = ops["frame_exec"].par
    fe.start, fe.create, fe.exit, fe.framestart, fe.frameend = True, True, True, True, False
    fe.active = True
