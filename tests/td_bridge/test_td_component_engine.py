"""The built component driving the real engine: the launcher starts `rtdiffusion td` (random:tiny on the CPU)
with this environment's python, frames go through the real rings and status comes back over real OSC, all
through the TouchDesigner stand-in (td_standin.py; TouchDesigner itself cannot run here).
"""

import sys
import time
from pathlib import Path

import numpy as np

import td_standin as td
from td_bridge.touchdesigner import component, launcher
from td_bridge.touchdesigner.build_component import build


def test_component_starts_the_engine_streams_and_stops_it(monkeypatch):
    monkeypatch.setattr(component, "STOP_GRACE_S", 300.0)  # a loaded machine may take long to exit: never SIGTERM
    project = td.Project(build=2023)
    comp = build(project.project1, python=sys.executable, model="random:tiny")
    comp.par.Width, comp.par.Height = 64, 64
    comp.par.Controlport, comp.par.Statusport = td.free_udp_port(), td.free_udp_port()
    comp.par.Extraargs, comp.par.Prompt, comp.par.Seed = "--device cpu --dtype float32", "a red boat", 7
    src = project.project1.create("constantTOP", "camera")
    src.par.colorr, src.par.colorb, src.par.outputresolution = 0.8, 0.3, "custom"
    comp.inputConnectors[0].connect(src)
    project.start()
    comp.par.Start.pulse()
    engine = launcher.get(comp.path)
    try:
        assert engine is not None, comp.par.Error.eval()

        def wait(cond, what, timeout=240.0, alive=True):
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                project.frame()
                if cond():
                    return
                if alive:
                    assert engine.running(), f"engine exited: {Path(engine.log_file).read_text()[-3000:]}"
                time.sleep(0.01)
            raise AssertionError(f"{what} within {timeout}s; state {comp.par.State.eval()!r}, error "
                                 f"{comp.par.Error.eval()!r}; log: {Path(engine.log_file).read_text()[-3000:]}")

        wait(lambda: comp.par.State.eval() in ("ready", "streaming") and comp.par.Inputring.eval()
             and comp.par.Outputring.eval(), "the engine ready with both rings announced")
        assert comp.par.Active.eval() and comp.par.Enginepid.eval() == engine.pid
        # the build's stages came over /engine/stage (the warm-up frame ends it) before "ready"
        assert comp.par.Buildprogress.eval() == 1.0 and comp.par.Buildleft.eval() == ""
        wait(lambda: comp.par.Frames.eval() >= 2 and comp.op("null_out").numpyArray() is not None,
             "results back in TouchDesigner")
        shown = comp.op("null_out").numpyArray()
        assert shown.shape == (64, 64, 4) and np.isfinite(shown).all()
        assert not comp.op("input_top").warnings() and not comp.op("output_top").warnings()
        assert comp.par.Error.eval() == ""  # nothing the component sent was rejected
        # the Status page shows both links up, and what the bridge said when it made its rings
        assert comp.par.Inputlink.eval().startswith(f"connected to ring {comp.par.Inputring.eval()!r}")
        assert comp.par.Outputlink.eval().startswith(f"connected to ring {comp.par.Outputring.eval()!r}")
        assert comp.par.Inputreconnects.eval() == 0 and comp.par.Outputreconnects.eval() == 0
        assert "made ring" in comp.par.Ringevent.eval()
        out_ring = comp.par.Outputring.eval()
        comp.par.Stop.pulse()
        wait(lambda: comp.par.State.eval() == "stopped", "the bridge honouring /stop", timeout=120, alive=False)
        assert engine.wait_stopped(300), "the engine did not exit"
        assert engine.proc.returncode == 0 and not comp.par.Active.eval()
        if sys.platform == "linux":
            assert not Path("/dev/shm", out_ring).exists()  # the bridge unlinked its rings
    finally:
        launcher.stop_all(wait=True, grace_s=5.0)
        launcher.forget_stopped()
        project.exit()
