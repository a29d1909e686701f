"""`rtdiffusion td --streams 2` as a real process (random:tiny on the CPU): one engine, one ring pair and one
OSC namespace per stream, frames through real shared memory, control over loopback OSC.

One bridge process serves the module; the tests run in file order (the first compares the two streams
while they still have equal settings). Nothing waits on a pace: every wait is for a condition, with a
generous timeout.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from pythonosc.udp_client import SimpleUDPClient

from osc_inbox import Inbox  # noqa: E402
from td_bridge.ring import RingReader, RingWriter
from td_bridge.ring_layout import _OFF_PUBLISHED
from td_bridge.segment import _open_untracked

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
SIZE = 64


@pytest.fixture(scope="module")
def bridge():
    inbox = Inbox()
    tag = f"{os.getpid() % 100000}{int(time.time() * 1000) % 100000}"
    cmd = [sys.executable, "-c", "import sys; from rtdiffusion.cli import main; sys.exit(main(sys.argv[1:]))",
           "td", "--streams", "2", "--model", "random:tiny", "--width", str(SIZE), "--height", str(SIZE),
           "--device", "cpu", "--dtype", "float32", "--steps", "1", "--strength", "0.6", "--threads", "1",
           "--osc-in-port", "0", "--osc-out-port", str(inbox.port), "--input-name", f"rtmi{tag}",
           "--output-name", f"rtmo{tag}"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = {"proc": proc, "inbox": inbox, "tag": tag}
    try:
        inbox.wait("/stream-info/state", lambda p: p[0] == "ready", timeout=120)
        state["port"] = inbox.all("/stream-info/osc-in-port")[-1][0]
        state["client"] = SimpleUDPClient("127.0.0.1", state["port"])
        state["in"] = [inbox.all(f"/stream/{i}/stream-info/input-name")[-1][0] for i in range(2)]
        state["out"] = [inbox.all(f"/stream/{i}/stream-info/output-name")[-1][0] for i in range(2)]
        state["writers"] = [RingWriter.attach(n) for n in state["in"]]
        state["readers"] = [RingReader.attach(n) for n in state["out"]]
        yield state
    finally:
        for r in state.get("writers", []) + state.get("readers", []):
            r.close()
        if proc.poll() is None:
            if "client" in state:
                state["client"].send_message("/stop", [])
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(proc.communicate(timeout=30)[0][-3000:])
        inbox.close()


def frame(seed):
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def output_for(bridge, i, picture, timeout=60.0):
    """Write ``picture`` into stream i's input ring (again, until it is taken) and return stream i's output
    made from that very frame (its source_index says so)."""
    w, r = bridge["writers"][i], bridge["readers"][i]
    out = r.empty_frame()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        n = w.write(picture)
        while time.monotonic() < end:
            info = r.wait(out, 0.5)
            if info is None:
                break  # not taken yet (the bridge takes only the newest frame): write it again
            if info.source_index >= n:
                return out[..., :3].copy()
    raise AssertionError(f"stream {i}: no output for the frame written within {timeout} s")


def status(bridge, index=None):
    inbox, mark = bridge["inbox"], bridge["inbox"].mark()
    addr = "/get_status" if index is None else f"/stream/{index}/get_status"
    bridge["client"].send_message(addr, [])
    reply = "/status" if index is None else f"/stream/{index}/status"
    return json.loads(inbox.wait(reply, after=mark, timeout=30)[0])


def errors_for(inbox, address, mark):
    return [p[1] for p in inbox.all("/error", after=mark) if p[0] == address]


def wait_error(inbox, address, mark, timeout=30.0):
    return inbox.wait("/error", lambda p: p[0] == address, timeout=timeout, after=mark)[1]


def diff(a, b):
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def test_each_stream_gets_its_own_output_for_its_own_input(bridge):
    inbox = bridge["inbox"]
    assert inbox.all("/stream-info/streams")[-1] == (2,)
    tag = bridge["tag"]
    assert bridge["in"] == [f"rtmi{tag}-0", f"rtmi{tag}-1"] and bridge["out"] == [f"rtmo{tag}-0", f"rtmo{tag}-1"]
    a, b = np.zeros((SIZE, SIZE, 3), np.uint8), np.full((SIZE, SIZE, 3), 255, np.uint8)
    out0_a, out1_b = output_for(bridge, 0, a), output_for(bridge, 1, b)
    out0_b, out1_a = output_for(bridge, 0, b), output_for(bridge, 1, a)
    # equal settings: a picture gives the same output on either stream (1 grey level: rows of one batch)
    assert diff(out0_a, out1_a).max() <= 1 and diff(out0_b, out1_b).max() <= 1
    # and each stream's output is made from its own input (random weights: small, but exact, differences)
    assert (diff(out0_a, out0_b) > 0).mean() > 0.05 and (diff(out1_a, out1_b) > 0).mean() > 0.05
    inbox.wait("/stream/0/frame_ready", timeout=10)
    inbox.wait("/stream/1/frame_ready", timeout=10)
    st = status(bridge)
    assert st["streams"] == 2 and st["engine"]["streams"] == 2 and st["engine"]["unet_calls_per_tick"] == 1
    assert [s["input_name"] for s in st["per_stream"]] == bridge["in"]
    assert all(s["frames_out"] >= 2 for s in st["per_stream"])


def test_a_prompt_for_stream_1_changes_only_stream_1(bridge):
    a = frame(3)
    before0, before1 = output_for(bridge, 0, a), output_for(bridge, 1, a)
    bridge["client"].send_message("/stream/1/prompt", "a charcoal drawing of a lighthouse")
    end = time.monotonic() + 60
    while status(bridge, 1)["engine"]["prompt"] != [["a charcoal drawing of a lighthouse", 1.0]]:
        assert time.monotonic() < end, "stream 1's prompt was never applied"
        output_for(bridge, 1, a)  # a tick boundary applies it
    after0, after1 = output_for(bridge, 0, a), output_for(bridge, 1, a)
    assert diff(before0, after0).max() <= 1  # stream 0: the same picture, the same output
    assert (diff(before1, after1) > 0).any()  # stream 1: its new prompt (random weights: a small change)
    assert status(bridge, 0)["engine"]["prompt"] != status(bridge, 1)["engine"]["prompt"]


def test_a_bad_message_for_one_stream_is_answered_and_the_other_keeps_streaming(bridge):
    inbox, c = bridge["inbox"], bridge["client"]
    mark = inbox.mark()
    c.send_message("/stream/0/strength", "strong")  # refused by the OSC check on arrival
    c.send_message("/stream/0/t_list", [999])  # passes the OSC check, refused by the stream (>= 50 steps)
    assert "expected a number from 0 to 1" in wait_error(inbox, "/stream/0/strength", mark)
    output_for(bridge, 1, frame(4))  # the tick after the refusal: stream 1 is served
    assert "t_index_list" in wait_error(inbox, "/stream/0/t_list", mark)
    n1 = status(bridge, 1)["frames_out"]
    for k in range(2):
        output_for(bridge, 1, frame(5 + k))
    assert status(bridge, 1)["frames_out"] >= n1 + 2
    assert status(bridge, 0)["engine"]["steps"] == 1  # stream 0 unchanged, and it still streams
    output_for(bridge, 0, frame(7))
    assert not errors_for(inbox, "/stream/1/strength", mark) and not errors_for(inbox, "/stream/1/t_list", mark)


def test_an_unknown_stream_index_or_address_gets_an_error_naming_what_is_valid(bridge):
    inbox, c = bridge["inbox"], bridge["client"]
    mark = inbox.mark()
    c.send_message("/stream/2/prompt", "x")
    c.send_message("/stream/one/seed", 3)
    c.send_message("/stream/0/pause", [])
    c.send_message("/similar_filter", 0.9)
    assert "from 0 to 1" in wait_error(inbox, "/stream/2/prompt", mark) and "got '2'" in \
        wait_error(inbox, "/stream/2/prompt", mark)
    assert "from 0 to 1" in wait_error(inbox, "/stream/one/seed", mark)
    assert "send it as /pause" in wait_error(inbox, "/stream/0/pause", mark)
    assert "single-stream bridge" in wait_error(inbox, "/similar_filter", mark)
    # an un-prefixed address sets every stream
    c.send_message("/seed", 4242)
    end = time.monotonic() + 60
    while any(status(bridge, i)["engine"]["seed"] != [[4242, 1.0]] for i in range(2)):
        assert time.monotonic() < end, "/seed was not applied to both streams"
        output_for(bridge, 0, frame(8))
        output_for(bridge, 1, frame(8))


def test_a_broken_input_ring_is_reported_for_its_stream_and_the_other_is_served(bridge):
    inbox = bridge["inbox"]
    mark = inbox.mark()
    shm = _open_untracked(bridge["in"][0])  # untracked: this process never unlinks it
    try:
        published = int.from_bytes(shm.buf[_OFF_PUBLISHED:_OFF_PUBLISHED + 8], "little")
        # a corrupt `published` counter: it names a slot holding an older frame, on every read
        shm.buf[_OFF_PUBLISHED:_OFF_PUBLISHED + 8] = (published + 2).to_bytes(8, "little")
        assert "published counter" in wait_error(inbox, "/stream/0/ring/input", mark)
        for k in range(2):
            output_for(bridge, 1, frame(9 + k))  # stream 1 is served meanwhile
    finally:
        shm.close()
    output_for(bridge, 0, frame(11))  # the next frame written sets the counter right: stream 0 is back


def test_a_component_with_a_stream_parameter_drives_only_its_stream(bridge, project):
    """The component's controls (controls.send_parameter, what its Parameter Execute DAT calls) with a Stream
    custom parameter go to /stream/<Stream>/...: through the TouchDesigner stand-in's real OSC Out DAT."""
    from td_bridge.touchdesigner import controls

    comp = project.project1.create("baseCOMP", "stream1")
    page = comp.appendCustomPage("Controls")
    page.appendStr("Prompt")
    page.appendInt("Stream")
    comp.par.Prompt, comp.par.Stream = "glass harbour", 1
    out = comp.create("oscoutDAT", "oscout1")
    out.par.address, out.par.port = "127.0.0.1", bridge["port"]
    assert controls.send_parameter(out, comp.par, "Prompt") == ("/stream/1/prompt", ["glass harbour"])
    end = time.monotonic() + 60
    while status(bridge, 1)["engine"]["prompt"] != [["glass harbour", 1.0]]:
        assert time.monotonic() < end, "the component's prompt never reached stream 1"
        output_for(bridge, 1, frame(12))
    assert status(bridge, 0)["engine"]["prompt"] != [["glass harbour", 1.0]]


def test_stop_exits_cleanly_and_unlinks_every_ring(bridge):
    """Last of the process tests: /stop ends the process with 0 and every stream's rings are gone."""
    from td_bridge.ring import RingError

    inbox, mark = bridge["inbox"], bridge["inbox"].mark()
    for r in bridge.pop("writers") + bridge.pop("readers"):
        r.close()
    bridge["client"].send_message("/stop", [])
    assert bridge["proc"].wait(timeout=60) == 0
    inbox.wait("/server_active", lambda p: p[0] == 0, after=mark, timeout=10)
    for name in bridge["in"] + bridge["out"]:
        with pytest.raises(RingError, match="no shared memory named"):
            RingReader.attach(name)


@pytest.mark.parametrize("argv, message", [
    (["--streams", "0"], "--streams must be an integer from 1 to 64"),
    (["--streams", "65"], "--streams must be an integer from 1 to 64"),
    (["--streams", "3", "--input-name", "a,b"], "--input-name takes one name"),
    (["--streams", "2", "--input-name", "a,b", "--output-name", "b,c"], "would serve twice"),
    (["--streams", "2", "--output-name", "x" * 30], "--output-name must be 1 to 30 letters"),
    (["--streams", "2", "--controlnet", "random:controlnet-tiny"], "--controlnet is not available with --streams 2"),
    (["--streams", "2", "--similar-filter", "0.9"], "--similar-filter is not available with --streams 2"),
])
def test_bad_multi_stream_flags_fail_before_loading(argv, message, caplog):
    from rtdiffusion.cli import main

    assert main(["td", "--model", "random:tiny", *argv]) == 2
    assert message in caplog.text


def test_ring_names_per_stream():
    from td_bridge.multi_config import ring_names

    assert ring_names("cam", "rtd_in", 3, "--input-name") == ("cam-0", "cam-1", "cam-2")
    assert ring_names("in_a,in_b", "rtd_in", 2, "--input-name") == ("in_a", "in_b")
    assert ring_names(None, "rtd_out", 2, "--output-name") == (f"rtd_out_{os.getpid()}-0", f"rtd_out_{os.getpid()}-1")
