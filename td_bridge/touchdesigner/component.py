"""What the built component's DATs do, kept in one importable module (so it is tested, and survives DAT
recompiles). Each function takes the component (the Base COMP that build_component.py makes) and uses only
TouchDesigner's documented Python: ``comp.op(name)``, ``comp.par.<Name>`` (``eval()``, assignment),
``OP.cook(force=True)``, ``TOP.numpyArray()``, ``oscoutDAT.sendOSC()``, ``store()`` / ``storeStartupValue()``.

Who calls what::

    frame_exec  (Execute DAT)            onStart/onCreate -> on_start
                                         (force_cook covers all four Script TOPs: input, output, control,
                                         style; the style TOP sends only after update_style or an attach)
                                         onFrameStart -> force_cook, show_links, watch_engine
                                         onExit -> stop(wait=True)
    par_exec    (Parameter Execute DAT)  onValueChange/onPulse -> on_parameter
    oscin1      (OSC In DAT, callbacks)  onReceiveOSC -> osc_in_callbacks.handle + on_osc

Live status (State, Fps, Frames, ...) is written to read-only parameters and cleared by ``on_start``:
parameter values are saved with the project, so without the clearing the next open would show the last
session's "streaming". Storage written by the OSC callbacks gets a startup value of None for the same reason.
The link readouts (Input Link, Output Link and their reconnect counts) are copied every frame from what the
Script TOPs stored on themselves (link_status.py) and the last ``/stream-info/ring-event`` the bridge sent
goes to Last Ring Event (Ringevent): the artist sees a bridge crash, the reconnect, and what the bridge said about it.
"""

from __future__ import annotations

import logging
import sys

from td_bridge.touchdesigner import controls, launcher, link_status
from td_bridge.touchdesigner.channel_order import check_red

log = logging.getLogger(__name__)

SCRIPT_TOPS = ("input_top", "output_top", "control_top", "style_top")
ACTIONS = ("Start", "Stop", "Sendall", "Checkorder", "Ipupdate")
LIVE_STATES = {"ready", "streaming", "paused"}
STOP_GRACE_S = 15.0  # Stop button: time to exit after /stop before terminate (waited on a thread)
EXIT_GRACE_S = 3.0  # quitting TouchDesigner: it waits this long, then terminates (the rings are gone by then)
# address -> status parameter
STATUS = {"/stream-info/state": "State", "/stream-info/fps": "Fps", "/framecount": "Frames",
          "/stream-info/build-stage": "Buildstage", "/server_active": "Active"}
# status parameter -> value it has when nothing is known (at start, and after clear_status)
CLEARED = {"State": "", "Fps": 0.0, "Frames": 0, "Buildstage": "", "Buildprogress": 0.0, "Buildleft": "",
           "Active": False, "Error": "",
           "Enginepid": 0, "Logfile": "", "Channelorder": "", "Inputlink": "", "Inputreconnects": 0,
           "Outputlink": "", "Outputreconnects": 0, "Ringevent": ""}
# Script TOP -> (its link readout, its reconnect count), on the Status page
LINKS = {"input_top": ("Inputlink", "Inputreconnects"), "output_top": ("Outputlink", "Outputreconnects")}
RING_EVENT = "/stream-info/ring-event"  # <what> <text>: the bridge made, adopted, re-made or repaired a ring
ENGINE_STAGE = "/engine/stage"  # name index count fraction elapsed_s estimate_s state source: a build stage


def _set(comp, name: str, value) -> None:
    par = getattr(comp.par, name, None)
    if par is not None and par.eval() != value:
        par.val = value


def add_repo_to_path(comp) -> None:
    """The repository root (parameter Repo) on TouchDesigner's sys.path: all td_bridge needs there."""
    repo = str(comp.par.Repo.eval()).strip() if hasattr(comp.par, "Repo") else ""
    if repo and repo not in sys.path:
        sys.path.insert(0, repo)


def clear_status(comp) -> None:
    """Forget every live value (a saved project must not show a stale state); keep a running engine's pid."""
    for name, value in CLEARED.items():
        _set(comp, name, value)
    engine = launcher.get(comp.path)
    if engine is not None and engine.running():
        _set(comp, "Enginepid", engine.pid)
        _set(comp, "Logfile", engine.log_file)
        _set(comp, "State", "starting")
    for name in SCRIPT_TOPS:  # announced ring names are per run; a running bridge repeats them every second
        top = comp.op(name)
        if top is not None and hasattr(top.par, "Ringname"):
            top.par.Ringname = ""


def on_start(comp) -> None:
    add_repo_to_path(comp)
    stop_orphans(comp)
    clear_status(comp)


def stop_orphans(comp) -> None:
    """Another project was opened in this TouchDesigner process: engines whose component is gone (onExit never
    ran for them) are terminated (SIGTERM: the bridge unlinks its rings and exits)."""
    for key in launcher.running_keys():
        if comp.op(key) is None:
            log.warning("rtdiffusion: stopping the engine of %s, which is no longer in the project", key)
            launcher.stop(key, send_stop=None, wait=False, grace_s=0.0)


def force_cook(comp) -> None:
    """Cook both Script TOPs this frame. Without it the output TOP (no inputs) cooks once and freezes and the
    input TOP (a sink) cooks only while its viewer is visible: not in Perform mode, not in a closed COMP."""
    for name in SCRIPT_TOPS:
        top = comp.op(name)
        if top is not None:
            top.cook(force=True)


def show_links(comp) -> None:
    """Copy each Script TOP's link state (stored by its onCook, see link_status.py) into the Status page;
    a parameter is written only when its value changed."""
    for name, (text_par, count_par) in LINKS.items():
        top = comp.op(name)
        if top is not None:
            text, count = link_status.read(top)
            _set(comp, text_par, text)
            _set(comp, count_par, count)


def watch_engine(comp) -> None:
    """Show an engine that exited by itself (bad model, crash): State 'exited', its exit code and last
    output line in Error. One poll() a frame (a non-blocking waitpid), acted on once."""
    engine = launcher.get(comp.path)
    if engine is None or engine.exit_reported:
        return
    code = engine.proc.poll()
    if code is None:
        return
    engine.exit_reported = True
    if not engine.stop_requested and code != 0:  # not a Stop we asked for
        _set(comp, "State", "exited")
        _set(comp, "Error", f"the engine exited with code {code}: {engine.last_log_line()} "
                            f"(log: {engine.log_file})")
    _set(comp, "Enginepid", 0)
    _set(comp, "Active", False)


# --------------------------------------------------------------------------------------------- launcher
def settings(comp) -> launcher.LaunchSettings:
    p = comp.par
    return launcher.LaunchSettings(
        python=str(p.Python.eval()), model=str(p.Model.eval()), width=int(p.Width.eval()),
        height=int(p.Height.eval()), control_port=int(p.Controlport.eval()), status_port=int(p.Statusport.eval()),
        host=str(p.Host.eval()) or "127.0.0.1", input_name=str(p.Inputname.eval()),
        output_name=str(p.Outputname.eval()), prompt=str(p.Prompt.eval()), seed=int(p.Seed.eval()),
        extra_args=str(p.Extraargs.eval()), repo=str(p.Repo.eval()), log_file="",
        conditioning=tuple(controls.launch_args(p)))


def start(comp):
    """Start the engine process; a misconfiguration is shown in State/Error, never raised."""
    try:
        engine = launcher.start(comp.path, settings(comp))
    except (launcher.LaunchError, OSError) as exc:
        _set(comp, "State", "not started")
        _set(comp, "Error", str(exc))
        log.warning("rtdiffusion: %s", exc)
        return None
    _set(comp, "Error", "")
    _set(comp, "State", "starting")
    _set(comp, "Enginepid", engine.pid)
    _set(comp, "Logfile", engine.log_file)
    return engine


def stop(comp, wait: bool = False):
    """/stop, then terminate/kill if the engine does not exit (on a thread unless ``wait``: at exit)."""
    osc_out = comp.op("oscout1")
    engine = launcher.stop(comp.path, send_stop=(lambda: controls.stop(osc_out)) if osc_out is not None else None,
                           wait=wait, grace_s=EXIT_GRACE_S if wait else STOP_GRACE_S)
    if engine is not None:
        _set(comp, "State", "stopped" if not engine.running() else "stopping")
        _set(comp, "Enginepid", 0)
    return engine


# ----------------------------------------------------------------------------------------------- controls
def on_parameter(comp, par) -> None:
    """A custom parameter changed or was pulsed (the Parameter Execute DAT's callbacks)."""
    name = par.name
    if name == "Start":
        start(comp)
    elif name == "Stop":
        stop(comp)
    elif name == "Sendall":
        controls.send_all(comp.op("oscout1"), comp.par)
    elif name == "Checkorder":
        check_channels(comp)
    elif name == "Ipupdate":
        update_style(comp)
    else:
        controls.send_parameter(comp.op("oscout1"), comp.par, name)


def on_osc(comp, address: str, args: list) -> None:
    """Status from the bridge into the read-only parameters; on becoming ready, send every control."""
    if not args or not hasattr(comp.par, "State"):
        return
    if address == "/error":
        _set(comp, "Error", ": ".join(str(a) for a in args if str(a)) or "error")
        return
    if address == RING_EVENT:  # e.g. "/ring/input", "made ring 'rtd_in_7' (session ...)"
        _set(comp, "Ringevent", ": ".join(str(a) for a in args if str(a))[:1000])
        return
    if address == ENGINE_STAGE:
        show_stage(comp, args)
        return
    name = STATUS.get(address)
    if name is None:
        return
    value = args[0]
    if name == "State":
        previous = comp.par.State.eval()
        _set(comp, "State", str(value))
        if value in LIVE_STATES and previous not in LIVE_STATES:
            controls.send_all(comp.op("oscout1"), comp.par)  # the engine now matches the panel
        if value == "stopped":
            _set(comp, "Enginepid", 0)
    elif name == "Active":
        _set(comp, "Active", bool(value))
    elif name == "Fps":
        _set(comp, "Fps", float(value))
    elif name == "Frames":
        _set(comp, "Frames", int(value))
    else:
        _set(comp, name, str(value))


def show_stage(comp, args: list) -> None:
    """/engine/stage name index count fraction elapsed_s estimate_s state source -> Buildstage ("first frame
    (3/6)"), Buildprogress (0..1) and Buildleft ("about 20 s left (recorded)"; "" once the build is done)."""
    if len(args) < 6:
        return
    name, index, count, fraction, _elapsed, left = args[:6]
    state = str(args[6]) if len(args) > 6 else "start"
    done = state == "done"
    _set(comp, "Buildstage", "ready" if done else f"{name} ({index}/{count})")
    _set(comp, "Buildprogress", float(fraction))
    source = f" ({args[7]})" if len(args) > 7 else ""
    _set(comp, "Buildleft", "" if done else f"about {float(left):.0f} s left{source}")


def update_style(comp) -> None:
    """IP-Adapter Update: the style Script TOP sends the Style TOP's picture at its next cook (this frame's
    force-cook); the bridge sees the new frame in its style ring and encodes it once."""
    dat = comp.op("style_callbacks")
    if dat is not None and hasattr(dat.module, "request"):
        dat.module.request()


# ----------------------------------------------------------------------------------------- channel order
def check_channels(comp) -> str:
    """Read the red Constant TOP back with numpyArray() and say which channel order this machine returns."""
    red = comp.op("check_red")
    order, text = check_red(red.numpyArray() if red is not None else None)
    _set(comp, "Channelorder", text)
    return order
