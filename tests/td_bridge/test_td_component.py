"""The TouchDesigner component builder (td_bridge/touchdesigner/build_component.py) and what the component does,
run against td_standin.py: a stand-in for the part of TouchDesigner's Python API it uses, strict where
TouchDesigner is (TouchDesigner itself cannot run here). OSC goes over real loopback sockets, rings are real
shared memory, the launcher starts real processes.
"""

import json
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import td_standin as td
from osc_inbox import Inbox
from td_bridge.osc import ACTIONS, CONTROLS
from td_bridge.ring import PixelFormat, RingLayout, RingReader, RingWriter, RowOrder
from td_bridge.touchdesigner import build_component, component, launcher
from td_bridge.touchdesigner.build_component import build

REPO = Path(build_component.__file__).resolve().parents[2]


@pytest.fixture
def inbox():
    box = Inbox()
    yield box
    box.close()


def frames_until(project, cond, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        project.frame()
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError(f"{what} not reached within {timeout}s")


def test_builder_makes_every_operator_with_its_type_parameters_and_wires(project):
    comp = build(project.project1, python="/opt/rtd/.venv/bin/python", model="random:tiny")
    assert comp.path == "/project1/rtdiffusion" and comp.OPTYPE == "baseCOMP"
    assert {o.name: o.OPTYPE for o in comp.children} == {n: t for n, t, _, _ in build_component.OPERATORS}
    for src, dst, i in build_component.WIRES:
        assert comp.op(dst).inputConnectors[i].connections[0].owner is comp.op(src)
    assert [p.name for p in comp.customPages] == ["Engine", "Controls", "ControlNet", "IP-Adapter", "Status", "Channels"]
    names = {p.name for p in comp.customPars}
    assert {"Python", "Model", "Prompt", "Negative", "Seed", "Strength", "Steps", "Guidance", "Start", "Stop",
            "State", "Fps", "Error", "Inputname", "Outputname", "Controlport", "Statusport", "Swaprb",
            "Testred", "Checkorder"} <= names
    assert all(getattr(comp.par, n).readOnly for n in ("State", "Fps", "Frames", "Error", "Channelorder"))
    assert comp.par.Python.eval() == "/opt/rtd/.venv/bin/python" and comp.par.Model.eval() == "random:tiny"
    assert comp.par.Repo.eval() == str(REPO)
    # callbacks are our DATs (TouchDesigner's docked templates are gone), with the scripts' text
    assert comp.op("input_top").par.callbacks.eval() is comp.op("input_callbacks")
    assert comp.op("oscin1").par.callbacks.eval() is comp.op("oscin_callbacks")
    assert comp.op("input_top_callbacks") is None and comp.op("oscin1_callbacks") is None
    assert "onFrameStart" in comp.op("frame_exec").text and "def onCook" in comp.op("output_callbacks").text
    fe = comp.op("frame_exec").par
    assert fe.active.eval() and fe.framestart.eval() and fe.start.eval() and fe.exit.eval()
    pe = comp.op("par_exec").par
    assert pe.op.eval() == ".." and set(pe.pars.eval().split()) >= {"Prompt", "Strength", "Start", "Stop"}
    assert "State" not in pe.pars.eval().split()
    # parameters follow the component's by expression
    comp.par.Width, comp.par.Controlport, comp.par.Testred = 320, 9001, True
    assert comp.op("fit1").par.resolutionw.eval() == 320 and comp.op("check_red").par.resolutionw.eval() == 320
    assert comp.op("oscout1").par.port.eval() == 9001 and comp.op("source_switch").par.index.eval() == 1
    assert comp.op("input_top").par.Ringname.eval() == "" and comp.op("input_top").par.Delayed.eval()
    comp.op("input_top").par.Ringname = "rtd_in_7"
    assert comp.par.Inputring.eval() == "rtd_in_7"
    # rebuilding keeps what the user set, and never a live readout
    comp.par.Prompt, comp.par.State = "a city", "streaming"
    again = build(project.project1)
    assert again.par.Prompt.eval() == "a city" and again.par.Width.eval() == 320 and again.par.State.eval() == ""


def test_the_standin_refuses_what_touchdesigner_refuses(project):
    comp = project.project1.create("baseCOMP", "c")
    with pytest.raises(AttributeError):
        comp.create("scriptTOP", "s").par.callback = "x"  # the parameter is 'callbacks'
    with pytest.raises(td.tdError):
        comp.create("noSuchTOP", "n")
    with pytest.raises(td.tdError):
        comp.create("textDAT", "s")  # name taken
    with pytest.raises(td.tdError):
        comp.appendCustomPage("P").appendStr("prompt")  # custom names start upper case
    with pytest.raises(td.tdError):
        comp.op("s").par.outputresolution = "huge"  # not a menu entry
    with pytest.raises(AttributeError):
        comp.op("s").nodex = 3
    with pytest.raises(td.tdError):
        comp.create("nullTOP", "t").inputConnectors[0].connect(comp.create("textDAT", "d"))
    with pytest.raises(AttributeError):
        comp.create("textDAT", "e").appendCustomPage("P")


def test_parameters_send_what_the_bridge_accepts_over_real_osc(project, inbox):
    comp = build(project.project1)
    comp.par.Controlport = inbox.port
    project.frame()  # the values the builder set go out here too: the waits below look for exact values
    comp.par.Prompt, comp.par.Negative, comp.par.Seed = "a watercolor city", "blurry", 42
    comp.par.Strength, comp.par.Guidance, comp.par.Pause = 0.8, 1.5, True
    project.frame()
    comp.par.Steps, comp.par.Pause = 3, False
    comp.par.Step.pulse()
    project.frame()
    for address, args in (("/prompt", ("a watercolor city",)), ("/negative_prompt", ("blurry",)), ("/seed", (42,)),
                          ("/guidance_scale", (1.5,)), ("/strength", (pytest.approx(0.8),)),
                          ("/pause", ()), ("/steps", (3,)), ("/play", ()),
                          ("/process_frame", ())):
        inbox.wait(address, lambda p, args=args: p == args, timeout=30)
    for address, args in list(inbox.messages):  # every one passes the bridge's own validation
        if address in CONTROLS:
            CONTROLS[address].parse(args)
        else:
            assert address in ACTIONS
    mark = inbox.mark()
    comp.par.Sendall.pulse()
    for address, args in (("/seed", (42,)), ("/strength", (pytest.approx(0.8),)), ("/steps", (3,)), ("/play", ()),
                          ("/prompt", ("a watercolor city",))):
        inbox.wait(address, lambda p, args=args: p == args, after=mark, timeout=30)


@pytest.mark.parametrize("build_year", [2023, 2025])
def test_script_tops_cook_every_frame_and_move_real_frames(shm_name, build_year):
    project = td.Project(build=build_year)
    comp = build(project.project1)
    comp.par.Width, comp.par.Height = 32, 24
    src = project.project1.create("constantTOP", "green")
    src.par.colorg, src.par.outputresolution = 1.0, "custom"
    comp.inputConnectors[0].connect(src)
    bridge_in = RingReader.create(shm_name + "i", RingLayout(32, 24, PixelFormat.RGBA8, RowOrder.BOTTOM_UP))
    bridge_out = RingWriter.create(shm_name + "o", RingLayout(32, 24, PixelFormat.BGRA8, RowOrder.BOTTOM_UP))
    try:
        comp.op("input_top").par.Ringname = bridge_in.name
        comp.op("output_top").par.Ringname = bridge_out.name
        comp.op("frame_exec").par.active = False  # nothing else cooks them: no viewer, as in Perform mode
        for _ in range(3):
            project.frame()
        cooks = comp.op("input_top").cookCount
        assert cooks == (3 if build_year == 2025 else 0)  # 2025: CookLevel.ALWAYS from onGetCookLevel
        comp.op("frame_exec").par.active = True
        for _ in range(3):
            project.frame()
        assert comp.op("input_top").cookCount == cooks + 3 and comp.op("output_top").cookCount == cooks + 3
        raw = bridge_in.empty_frame()
        assert bridge_in.read(raw) is not None and bridge_in.published >= 2  # delayed readback: from frame 2
        assert (raw[..., :3] == [0, 255, 0]).all()
        picture = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        bridge_out.write(picture, rows=RowOrder.TOP_DOWN)
        project.frame()
        shown = comp.op("null_out").numpyArray()  # through output_top, bottom row first
        assert np.array_equal(np.rint(shown[::-1, :, :3] * 255).astype(np.uint8), picture)
        assert not comp.op("input_top").warnings()
    finally:
        project.exit()
        bridge_in.close()
        bridge_out.close()


def test_a_missing_ring_is_a_warning_not_an_exception(project):
    comp = build(project.project1)
    comp.op("input_top").par.Ringname = "rtd_no_such_ring"
    comp.op("output_top").par.Ringname = "rtd_no_such_ring_out"
    for _ in range(2):  # delayed readback: the input TOP has its first frame on frame 2
        project.frame()
    assert "no shared memory named" in comp.op("input_top").warnings()
    assert "no shared memory named" in comp.op("output_top").warnings()


@pytest.mark.parametrize("order", ["RGBA", "BGRA"])
def test_red_check_says_the_order_and_swap_makes_red_arrive_red(shm_name, order):
    project = td.Project(numpy_order=order)
    comp = build(project.project1)
    comp.par.Width, comp.par.Height, comp.par.Testred = 16, 8, True
    comp.par.Checkorder.pulse()
    assert comp.par.Channelorder.eval().startswith(f"numpyArray() returns {order}")
    bridge_in = RingReader.create(shm_name, RingLayout(16, 8, PixelFormat.BGRA8, RowOrder.BOTTOM_UP))
    bridge_out = RingWriter.create(shm_name + "o", RingLayout(16, 8, PixelFormat.RGBA8, RowOrder.BOTTOM_UP))
    try:
        comp.op("input_top").par.Ringname, comp.op("output_top").par.Ringname = bridge_in.name, bridge_out.name
        raw, rgb = bridge_in.empty_frame(), {}
        for swap in (False, True):
            comp.par.Swaprb = swap
            for _ in range(3):
                project.frame()
            assert bridge_in.read(raw) is not None
            rgb[swap] = tuple(raw[0, 0, [2, 1, 0]])  # the ring is BGRA8
        assert rgb[order == "BGRA"] == (255, 0, 0) and rgb[order != "BGRA"] == (0, 0, 255)
        red = np.zeros((8, 16, 4), np.uint8)
        red[..., 0] = red[..., 3] = 255
        bridge_out.write(red, rows=RowOrder.BOTTOM_UP)
        comp.par.Swaprb = order == "BGRA"
        project.frame()
        project.frame()
        assert tuple(np.rint(comp.op("output_top").numpyArray()[0, 0] * 255)) == ((255, 0, 0, 255) if order == "RGBA"
                                                                                  else (0, 0, 255, 255))
    finally:
        project.exit()
        bridge_in.close()
        bridge_out.close()


def test_status_shows_live_values_and_is_not_saved_stale(project, inbox):
    from pythonosc.udp_client import SimpleUDPClient

    comp = build(project.project1)
    comp.par.Controlport, comp.par.Statusport = td.free_udp_port(), td.free_udp_port()  # nobody listens yet
    comp.par.Prompt = "kept"
    project.start()
    project.frame()  # the parameter changes so far go to the port nobody listens on
    comp.par.Controlport = inbox.port  # from here on only the send-all on becoming live can send /prompt
    bridge = SimpleUDPClient("127.0.0.1", comp.par.Statusport.eval())
    mark = inbox.mark()
    for address, value in (("/stream-info/state", "loading"), ("/stream-info/input-name", "rtd_in_5"),
                           ("/stream-info/state", "streaming"), ("/stream-info/fps", 12.5), ("/framecount", 40),
                           ("/engine/stage", ["first frame", 3, 6, 0.5, 10.0, 20.0, "start", "recorded"]),
                           ("/error", ["/seed", "expected an integer"])):
        bridge.send_message(address, value)
    frames_until(project, lambda: comp.par.Frames.eval() == 40 and comp.par.Error.eval(), what="status")
    assert comp.par.State.eval() == "streaming" and comp.par.Fps.eval() == 12.5
    assert comp.par.Inputring.eval() == "rtd_in_5" and comp.fetch("/stream-info/fps") == 12.5
    assert comp.par.Error.eval() == "/seed: expected an integer"
    assert (comp.par.Buildstage.eval(), comp.par.Buildprogress.eval(), comp.par.Buildleft.eval()) == (
        "first frame (3/6)", 0.5, "about 20 s left (recorded)")
    assert inbox.wait("/prompt", after=mark, timeout=30) == ("kept",)  # became live: the panel was sent
    project.reopen()  # saved, closed, opened again: nothing of the last session shows
    assert comp.par.State.eval() == "" and comp.par.Fps.eval() == 0 and comp.par.Error.eval() == ""
    assert comp.par.Buildprogress.eval() == 0 and comp.par.Buildleft.eval() == ""
    assert comp.par.Inputring.eval() == "" and comp.fetch("/stream-info/fps") is None
    assert comp.par.Prompt.eval() == "kept"


def test_dropped_in_text_dat_builds_it(project):
    dat = project.project1.create("textDAT", "build_rtd")
    dat.text = ("from td_bridge.touchdesigner.build_component import build\n"
                "build(op('/project1'), model='random:tiny')\n")
    dat.run()
    assert project.op("/project1/rtdiffusion/input_top").OPTYPE == "scriptTOP"


@pytest.mark.parametrize("python, says", [("", "set Python"), ("TouchDesigner.exe", "never use it"),
                                          ("/no/such/python3", "does not exist")])
def test_launcher_refuses_a_python_that_is_not_the_engines(project, python, says):
    comp = build(project.project1, python=python)
    comp.par.Start.pulse()
    assert says in comp.par.Error.eval() and comp.par.State.eval() == "not started"
    assert launcher.get(comp.path) is None


STUB = r'''import json, os, signal, socket, sys
from pythonosc.osc_packet import OscPacket
argv = sys.argv[1:]
if os.environ.get("STUB_STUBBORN"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(argv[argv.index("--osc-in-port") + 1])))
with open(os.environ["STUB_OUT"], "w") as f:
    json.dump({"argv": argv, "pythonpath": os.environ.get("PYTHONPATH"), "home": os.environ.get("PYTHONHOME")}, f)
if os.environ.get("STUB_EXIT"):
    print("loading the model", flush=True)
    print("error: --model 'nope' is not a hub id, a folder or random:<arch>", flush=True)
    sys.exit(2)
while True:
    for m in OscPacket(s.recv(65536)).messages:
        if m.message.address == "/stop" and not os.environ.get("STUB_STUBBORN"):
            sys.exit(0)
'''


def make_python(tmp_path, monkeypatch, stubborn=False, exits=False):
    """An executable named 'python' that runs a stand-in engine: it records its arguments and environment,
    listens on the control port, and exits on /stop (or, stubborn, ignores /stop and SIGTERM)."""
    (tmp_path / "stub.py").write_text(STUB)
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "stub.py"}" "$@"\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("STUB_OUT", str(tmp_path / "out.json"))
    monkeypatch.setenv("PYTHONHOME", "/Applications/TouchDesigner.app/Contents/Frameworks/Python")
    if stubborn:
        monkeypatch.setenv("STUB_STUBBORN", "1")
    if exits:
        monkeypatch.setenv("STUB_EXIT", "1")
    return py


def start_stand_in_engine(comp, tmp_path):
    """Pulse Start and wait until the stand-in python (make_python) has written out.json; its launcher entry."""
    comp.par.Start.pulse()
    engine = launcher.get(comp.path)
    end = time.monotonic() + 60
    while not (tmp_path / "out.json").exists():
        assert time.monotonic() < end
        time.sleep(0.02)
    return engine


@pytest.mark.skipif(os.name == "nt", reason="the stand-in python is a shell script")
def test_launcher_runs_the_configured_python_and_stops_it(project, tmp_path, monkeypatch):
    monkeypatch.setattr(component, "STOP_GRACE_S", 120.0)  # a loaded machine never gets to SIGTERM
    comp = build(project.project1, python=str(make_python(tmp_path, monkeypatch)), model="random:tiny")
    comp.par.Controlport, comp.par.Width, comp.par.Extraargs = td.free_udp_port(), 64, "--device cpu"
    comp.par.Inputname, comp.par.Prompt = "rtd_in_x", "two words"
    comp.par.Start.pulse()
    engine = launcher.get(comp.path)
    assert engine is not None and comp.par.Enginepid.eval() == engine.pid and comp.par.State.eval() == "starting"
    out = tmp_path / "out.json"
    end = time.monotonic() + 60
    while not out.exists() or not out.read_text():
        assert time.monotonic() < end and engine.running(), "the engine python did not start"
        time.sleep(0.02)
    seen = json.loads(out.read_text())
    assert seen["argv"][:3] == ["-c", launcher.ENTRY, "td"]
    args = seen["argv"][3:]
    assert args[args.index("--model") + 1] == "random:tiny" and args[args.index("--width") + 1] == "64"
    assert args[args.index("--osc-in-port") + 1] == str(comp.par.Controlport.eval())
    assert args[args.index("--input-name") + 1] == "rtd_in_x" and args[args.index("--prompt") + 1] == "two words"
    assert "--flip-rows" in args and args[-2:] == ["--device", "cpu"]
    assert seen["home"] is None and seen["pythonpath"] == str(REPO)  # TouchDesigner's Python vars removed
    comp.par.Start.pulse()  # a second start while one runs is refused, not a second process
    assert "already running" in comp.par.Error.eval()
    comp.par.Stop.pulse()  # OSC /stop through oscout1; the stand-in engine exits on it
    assert engine.wait_stopped(60) and engine.proc.returncode == 0
    assert comp.par.Enginepid.eval() == 0


@pytest.mark.skipif(os.name == "nt", reason="the stand-in python is a shell script")
def test_an_engine_that_ignores_stop_is_terminated_then_killed(project, tmp_path, monkeypatch):
    comp = build(project.project1, python=str(make_python(tmp_path, monkeypatch, stubborn=True)),
                 model="random:tiny")
    comp.par.Controlport = td.free_udp_port()
    engine = start_stand_in_engine(comp, tmp_path)
    engine.stop(lambda: None, grace_s=0.2, kill_after_s=0.5)  # what onExit does, with short waits
    assert not engine.running() and engine.proc.returncode != 0


@pytest.mark.skipif(os.name == "nt", reason="the stand-in python is a shell script")
def test_quitting_touchdesigner_stops_the_engine(project, tmp_path, monkeypatch):
    monkeypatch.setattr(component, "EXIT_GRACE_S", 120.0)
    comp = build(project.project1, python=str(make_python(tmp_path, monkeypatch)), model="random:tiny")
    comp.par.Controlport = td.free_udp_port()
    project.start()
    engine = start_stand_in_engine(comp, tmp_path)
    project.exit()  # frame_exec's onExit: /stop, and waits for the process
    assert not engine.running() and engine.proc.returncode == 0


def test_touchdesigner_side_needs_only_numpy_and_the_repository():
    """What TouchDesigner's Python imports (the builder, the DAT scripts' modules) never pulls in torch or the
    engine: only numpy and td_bridge from the repository root."""
    import subprocess

    code = ("import sys; from td_bridge.touchdesigner import build_component, component, td_frames, channel_order;"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'rtdiffusion', 'pythonosc', 'demo'));"
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.skipif(os.name == "nt", reason="the stand-in python is a shell script")
def test_an_engine_that_exits_by_itself_shows_why(project, tmp_path, monkeypatch):
    comp = build(project.project1, python=str(make_python(tmp_path, monkeypatch, exits=True)), model="nope")
    comp.par.Controlport = td.free_udp_port()
    project.start()
    comp.par.Start.pulse()
    frames_until(project, lambda: comp.par.State.eval() == "exited", what="the exit shown")
    err = comp.par.Error.eval()
    assert "exited with code 2" in err and "--model 'nope' is not a hub id" in err and "log:" in err
    assert comp.par.Enginepid.eval() == 0


def test_two_cooks_in_one_frame_send_the_picture_once(shm_name):
    project = td.Project(build=2025)
    comp = build(project.project1)
    comp.par.Width, comp.par.Height = 8, 8
    with RingReader.create(shm_name, RingLayout(8, 8, PixelFormat.RGBA8, RowOrder.BOTTOM_UP)) as bridge_in:
        comp.op("input_top").par.Ringname = bridge_in.name
        for _ in range(4):
            project.frame()
            comp.op("input_top").cook(force=True)  # e.g. a second force-cook, or ALWAYS plus a forced cook
        assert bridge_in.published == 4  # one send a frame, never two (frame 1's from its second cook)
    project.exit()


@pytest.mark.skipif(os.name == "nt", reason="the stand-in python is a shell script")
def test_opening_a_project_without_the_component_stops_its_engine(project, tmp_path, monkeypatch):
    comp = build(project.project1, python=str(make_python(tmp_path, monkeypatch)), model="random:tiny")
    comp.par.Controlport = td.free_udp_port()
    engine = start_stand_in_engine(comp, tmp_path)
    comp.destroy()  # the next project in this TouchDesigner process has its component elsewhere
    other = build(project.project1, name="rtd2")
    project.reopen()  # its frame_exec's onStart
    assert engine.wait_stopped(60) and not engine.running()
    assert launcher.get(other.path) is None
