"""The built component shows the state of its ring links on the Status page (Input Link, Output Link, their
reconnect counts, Last Ring Event), run against the TouchDesigner stand-in (td_standin.py) with real shared-
memory rings and real OSC over loopback. A "bridge" here is a pair of rings made with RingReader.create /
RingWriter.create and closed as a bridge closes them when it exits; a new bridge makes them again under the
same names. Every wait is on a condition (frames are run until it holds), never on a pace.
"""

import time

import numpy as np
import pytest
from pythonosc.udp_client import SimpleUDPClient

import td_standin as td
from td_bridge.ring import PixelFormat, RingLayout, RingReader, RingWriter, RowOrder
from td_bridge.touchdesigner import launcher, link_status
from td_bridge.touchdesigner.build_component import build

TIMEOUT = 60.0
LINK_PARS = ("Inputlink", "Inputreconnects", "Outputlink", "Outputreconnects", "Ringevent")


@pytest.fixture
def project():
    p = td.Project(build=2023)
    yield p
    launcher.stop_all(wait=True, grace_s=0.5)
    launcher.forget_stopped()
    p.exit()


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
