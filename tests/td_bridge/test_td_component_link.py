"""The built component shows the state of its ring links on the Status page (Input Link, Output Link, their
reconnect counts, Last Ring Event), run against the TouchDesigner stand-in (td_standin.py) with real shared-
memory rings and real OSC over loopback. A "bridge" here is a pair of rings made with RingReader.create /
RingWriter.create and closed as a bridge closes them when it exits; a new bridge makes them again under the
same names. Every wait is on a condition (frames are run until it holds), never on a pace.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pythonosc.udp_client import SimpleUDPClient

import td_standin as td
from td_bridge.ring import PixelFormat, RingLayout, RingReader, RingWriter, RowOrder
from td_bridge.touchdesigner import link_status
from td_bridge.touchdesigner.build_component import build

TIMEOUT = 60.0
LINK_PARS = ("Inputlink", "Inputreconnects", "Outputlink", "Outputreconnects", "Ringevent")


def frames_until(project, cond, what):
    end = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < end, f"{what} not shown within {TIMEOUT:.0f} s"
        project.frame()
        time.sleep(0.005)


def links(comp):
    return {n: getattr(comp.par, n).eval() for n in LINK_PARS}


class Bridge:
    """The two rings a bridge serves: made on start, marked CLOSED and unlinked on exit."""

    def __init__(self, name):
        self.input = RingReader.create(name + "i", RingLayout(16, 8, PixelFormat.RGBA8, RowOrder.BOTTOM_UP))
        self.output = RingWriter.create(name + "o", RingLayout(16, 8, PixelFormat.RGBA8, RowOrder.BOTTOM_UP))

    def close(self):
        self.input.close()
        self.output.close()


def test_readouts_are_read_only_on_the_status_page(project):
    comp = build(project.project1)
    status = next(p for p in comp.customPages if p.name == "Status")
    assert set(LINK_PARS) <= {p.name for p in status.pars}
    assert all(getattr(comp.par, n).readOnly for n in LINK_PARS)
    assert links(comp) == {"Inputlink": "", "Inputreconnects": 0, "Outputlink": "", "Outputreconnects": 0,
                           "Ringevent": ""}


def test_status_page_shows_connected_lost_and_the_reconnect_after_a_new_bridge(project, shm_name):
    comp = build(project.project1)
    comp.par.Width, comp.par.Height = 16, 8
    project.start()
    project.frame()
    assert comp.par.Inputlink.eval().startswith("not connected: no ring name yet")
    bridge = Bridge(shm_name)
    try:
        comp.op("input_top").par.Ringname = bridge.input.name
        comp.op("output_top").par.Ringname = bridge.output.name
        frames_until(project, lambda: comp.par.Inputlink.eval().startswith(f"connected to ring {bridge.input.name!r}")
                     and comp.par.Outputlink.eval().startswith(f"connected to ring {bridge.output.name!r}"),
                     "connected")
        assert comp.par.Inputreconnects.eval() == 0 and comp.par.Outputreconnects.eval() == 0
        frames_until(project, lambda: bridge.input.published >= 1, "a frame sent")

        bridge.close()  # the bridge exits (CLOSED, names unlinked); frames go nowhere meanwhile
        frames_until(project, lambda: comp.par.Inputlink.eval().startswith("lost ring")
                     and comp.par.Outputlink.eval().startswith("lost ring"), "the lost link")
        assert "its bridge exited" in comp.par.Inputlink.eval()
        assert "lost ring" in comp.op("input_top").warnings()

        bridge = Bridge(shm_name)  # a new bridge, the same names
        frames_until(project, lambda: comp.par.Inputlink.eval().startswith("reconnected")
                     and comp.par.Outputlink.eval().startswith("reconnected"), "the reconnect")
        for text_par, count_par in (("Inputlink", "Inputreconnects"), ("Outputlink", "Outputreconnects")):
            assert getattr(comp.par, count_par).eval() == 1
            assert "after its bridge exited" in getattr(comp.par, text_par).eval()
            assert "1 reconnect(s) so far" in getattr(comp.par, text_par).eval()
        frames_until(project, lambda: bridge.input.published >= 1, "frames flowing into the new bridge")
        picture = np.full((8, 16, 4), 255, np.uint8)
        picture[..., 1] = 40
        bridge.output.write(picture, rows=RowOrder.BOTTOM_UP)
        frames_until(project, lambda: comp.op("null_out").numpyArray() is not None and np.array_equal(
            np.rint(comp.op("null_out").numpyArray() * 255).astype(np.uint8), picture), "the new bridge's picture")
        assert not comp.op("input_top").warnings() and not comp.op("output_top").warnings()
    finally:
        bridge.close()
    project.reopen()  # saved and opened again: no stale link state, neither on the page nor in storage
    assert links(comp) == {"Inputlink": "", "Inputreconnects": 0, "Outputlink": "", "Outputreconnects": 0,
                           "Ringevent": ""}
    assert link_status.read(comp.op("input_top")) == ("", 0)
    assert comp.op("input_top").fetch(link_status.TEXT_KEY, "gone", search=False) is None


def test_a_ring_event_from_the_bridge_over_real_osc_reaches_the_readout(project):
    comp = build(project.project1)
    comp.par.Statusport = td.free_udp_port()
    project.start()
    project.frame()  # oscin1 listens from its first frame
    event = ("/ring/input", "adopted the existing ring 'rtd_in_5' (16x8 rgba8), left open by process 4242, a "
                            "bridge that did not exit cleanly (crashed or killed); session 00000000000000ab")
    SimpleUDPClient("127.0.0.1", comp.par.Statusport.eval()).send_message("/stream-info/ring-event", list(event))
    frames_until(project, lambda: comp.par.Ringevent.eval() == ": ".join(event), "the ring event")
    assert comp.fetch("/stream-info/ring-event") == list(event)
    project.reopen()
    assert comp.par.Ringevent.eval() == "" and comp.fetch("/stream-info/ring-event") is None


ECHO_BRIDGE = Path(__file__).with_name("_echo_bridge.py")


def start_echo_bridge(status_port, in_name, out_name, log):
    """A real bridge process (echo engine, 16x16) that reports to the component's Status Port, in a session
    of its own (it and its resource tracker form one process group)."""
    return subprocess.Popen([sys.executable, str(ECHO_BRIDGE), str(status_port), in_name, out_name],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and process groups are POSIX")
def test_sigkill_of_a_real_bridge_and_a_restart_show_on_the_status_page(project, shm_name, tmp_path):
    """The bridge process is killed with SIGKILL while the component streams; its resource tracker removes the
    segments; a new bridge starts with the same names. The artist sees it all on the Status page."""
    comp = build(project.project1)
    comp.par.Width, comp.par.Height, comp.par.Statusport = 16, 16, td.free_udp_port()
    project.start()
    project.frame()  # oscin1 listens from here on
    in_name, out_name = shm_name + "i", shm_name + "o"
    procs = []
    try:
        with open(tmp_path / "first.log", "w") as log:
            procs.append(start_echo_bridge(comp.par.Statusport.eval(), in_name, out_name, log))
        frames_until(project, lambda: comp.par.Inputlink.eval().startswith(f"connected to ring {in_name!r}")
                     and comp.par.Outputlink.eval().startswith(f"connected to ring {out_name!r}")
                     and comp.par.Frames.eval() >= 2, "both links up and frames through the first bridge")
        assert "made ring" in comp.par.Ringevent.eval() and comp.par.Inputreconnects.eval() == 0
        first_event = comp.par.Ringevent.eval()

        procs[0].kill()  # the bridge alone: its resource tracker removes the segments it made
        procs[0].wait(timeout=TIMEOUT)
        frames_until(project, lambda: comp.par.Inputlink.eval().startswith("lost ring")
                     and comp.par.Outputlink.eval().startswith("lost ring"), "the lost links")

        with open(tmp_path / "second.log", "w") as log:
            procs.append(start_echo_bridge(comp.par.Statusport.eval(), in_name, out_name, log))
        frames_until(project, lambda: comp.par.Inputreconnects.eval() == 1 and comp.par.Outputreconnects.eval() == 1,
                     "the reconnects")
        for par in (comp.par.Inputlink, comp.par.Outputlink):
            assert par.eval().startswith("reconnected to ring") and "1 reconnect(s) so far" in par.eval()
        frames_until(project, lambda: "made ring" in comp.par.Ringevent.eval()
                     and comp.par.Ringevent.eval() != first_event, "the new bridge's ring event")
        with RingReader.attach(out_name) as out:  # the new bridge's output ring: frames flow through it again
            published = out.published
            frames_until(project, lambda: out.published > published + 2, "frames through the new bridge")

        SimpleUDPClient("127.0.0.1", comp.fetch("/stream-info/osc-in-port")).send_message("/stop", [])
        assert procs[1].wait(timeout=TIMEOUT) == 0
        frames_until(project, lambda: "its bridge exited" in comp.par.Inputlink.eval()
                     and "its bridge exited" in comp.par.Outputlink.eval(), "the clean exit")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whatever is left of its group (a resource tracker)
            except ProcessLookupError:
                pass
            p.wait(timeout=TIMEOUT)
