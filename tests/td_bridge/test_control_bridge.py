"""ControlNet and IP-Adapter through the bridge, with the real engine (tiny random models on the CPU): OSC
control messages change the engine's settings at the next frame, bad ones get /error and change nothing, the
control ring's image reaches the 'external' ControlNet, the style ring's picture is encoded once per change.

The ControlNet bridge is a real `rtdiffusion td` process; the IP-Adapter one runs in this process (its engine
is the real one, built by the bridge's factory), so the file starts one model load's worth of processes.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from pythonosc.udp_client import SimpleUDPClient

from td_bridge.ring import RingReader, RingWriter, RowOrder
from osc_inbox import Inbox  # noqa: E402
from test_bridge_loop import Running  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
CLI = [sys.executable, "-c", "import sys; from rtdiffusion.cli import main; sys.exit(main(sys.argv[1:]))"]


def frame(value, size=64):
    """[H, W, 3] uint8, a left-to-right ramp offset by ``value`` (different values: different pictures)."""
    ramp = (np.arange(size, dtype=np.int32)[None, :, None] * 4 + value) % 256
    return np.broadcast_to(ramp, (size, size, 3)).astype(np.uint8)


def one_output(input_name, output_name, picture, timeout=120.0):
    """Write ``picture`` into the input ring and return the [H, W, C] output it became (waits for it)."""
    with RingWriter.attach(input_name) as w, RingReader.attach(output_name) as r:
        r.last_index = r.published - 1
        out = r.empty_frame()
        w.write(picture)
        info = r.wait(out, timeout)
        assert info is not None, "no output frame"
        return out.copy()


def settle(b, inbox, client):
    """After OSC messages: once the receive thread has answered a /get_status sent after them they are in the
    bridge's mailbox (it handles messages in order); the frame loop applies them before the frame after the
    one it may be starting now, so two frames later they are in effect."""
    status(inbox, client)
    for n in range(2):
        one_output(b["in"], b["out"], frame(n))


def status(inbox, client):
    mark = inbox.mark()
    client.send_message("/get_status", [])
    return json.loads(inbox.wait("/status", after=mark, timeout=30)[0])


def errors_after(inbox, mark):
    """address -> every /error reason for it since ``mark``, joined with " | "."""
    errors = {}
    with inbox.lock:
        for a, p in inbox.messages[mark:]:
            if a == "/error":
                errors[p[0]] = f"{errors[p[0]]} | {p[1]}" if p[0] in errors else p[1]
    return errors


@pytest.fixture(scope="module")
def cn_bridge():
    inbox = Inbox()
    tag = f"{os.getpid() % 100000}{int(time.time() * 1000) % 100000}"
    names = {"in": f"rtdci{tag}", "out": f"rtdco{tag}", "ctl": f"rtdcc{tag}"}
    proc = subprocess.Popen([*CLI, "td", "--model", "random:tiny", "--device", "cpu", "--dtype", "float32",
                             "--threads", "1", "--osc-in-port", "0", "--osc-out-port", str(inbox.port),
                             "--input-name", names["in"], "--output-name", names["out"], "--control-ring", names["ctl"],
                             "--controlnet", "random:controlnet-tiny:external:0.8",
                             "--controlnet", "random:controlnet-tiny:canny"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        inbox.wait("/stream-info/state", lambda p: p[0] == "ready", timeout=240)
        client = SimpleUDPClient("127.0.0.1", inbox.all("/stream-info/osc-in-port")[-1][0])
        yield {"proc": proc, "inbox": inbox, "client": client, **names}
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.communicate(timeout=30)[0]
        inbox.close()
        if sys.exc_info()[0] is not None:
            print(log[-3000:])


def test_the_control_rings_image_reaches_the_external_controlnet(cn_bridge):
    b, inbox = cn_bridge, cn_bridge["inbox"]
    assert inbox.all("/stream-info/control-name")[-1] == (b["ctl"],)
    picture = frame(0)
    outputs = []
    with RingWriter.attach(b["ctl"]) as ctl:
        for control in (frame(90), frame(200), frame(90)):  # A, B, A again: same input each time
            ctl.write(control)
            outputs.append(one_output(b["in"], b["out"], picture))
    a, other, a_again = outputs
    assert np.array_equal(a, a_again)  # the same control image: the same picture
    assert not np.array_equal(a, other)  # another control image: another picture
    st = status(inbox, b["client"])
    assert st["conditioning"]["control_ring"] == b["ctl"] and st["conditioning"]["control_frames"] == 3
    assert st["conditioning"]["external_controlnets"] == [0] and st["conditioning"]["control_error"] is None


def test_controlnet_messages_apply_at_the_next_frame_and_bad_ones_change_nothing(cn_bridge):
    b, inbox, c = cn_bridge, cn_bridge["inbox"], cn_bridge["client"]
    c.send_message("/controlnets", json.dumps([{"enabled": False, "control_guidance_start": 0.25}]))
    c.send_message("/controlnet/1/scale", 0.5)
    settle(b, inbox, c)
    units = status(inbox, c)["engine"]["controlnets"]
    assert (units[0]["enabled"], units[0]["start"], units[0]["scale"]) == (False, 0.25, pytest.approx(0.8))
    assert (units[1]["scale"], units[1]["enabled"]) == (0.5, True)
    mark = inbox.mark()
    c.send_message("/controlnet/5/scale", 0.5)  # this engine has 2
    c.send_message("/controlnets", json.dumps([{"model_id": "lllyasviel/sd-controlnet-depth"}]))
    c.send_message("/controlnets", json.dumps({"1": {"start": 0.9, "end": 0.1}}))
    c.send_message("/controlnet/1/scale", float("nan"))
    c.send_message("/ipadapter_scale", 0.5)  # no IP-Adapter in this engine
    c.send_message("/ipadapter_update", [])
    settle(b, inbox, c)
    st = status(inbox, c)
    errors = errors_after(inbox, mark)
    assert "out of range" in errors["/controlnet/5/scale"] and "has ControlNets 0 to 1" in errors["/controlnet/5/scale"]
    assert "cannot change while streaming" in errors["/controlnets"] and "start must not be after end" in errors[
        "/controlnets"]
    assert "finite" in errors["/controlnet/1/scale"]
    assert "/ipadapter_scale" in errors and "no IP-Adapter" in errors["/ipadapter_update"]
    assert st["engine"]["controlnets"] == units  # nothing changed
    assert st["state"] == "streaming"
    info = json.loads(inbox.wait("/stream-info/controlnets", after=mark, timeout=30)[0])
    assert [u["preprocessor"] for u in info] == ["external", "canny"]


def test_stop(cn_bridge):
    cn_bridge["client"].send_message("/stop", [])
    assert cn_bridge["proc"].wait(timeout=60) == 0


def test_the_style_ring_is_encoded_once_per_new_picture(shm_name):
    from rtdiffusion import StreamEngine

    ip = {"model": "random:ip-adapter-tiny", "scale": 0.5}
    rings = {"in": shm_name + "i", "out": shm_name + "o"}
    b = Running(lambda bridge: StreamEngine.from_pretrained("random:tiny-sd15", device="cpu", threads=1,
                                                            ip_adapter=ip),
                input_name=shm_name + "i", output_name=shm_name + "o", style_name=shm_name + "s",
                engine_options={"ip_adapter": ip}).ready()
    try:
        inbox, c = b.inbox, b.client
        assert inbox.all("/stream-info/style-name")[-1] == (shm_name + "s",)
        encodes = lambda: status(inbox, c)["engine"]["ip_adapter"]["encodes"]  # noqa: E731
        assert encodes() == 0
        with RingWriter.attach(shm_name + "s") as style:
            style.write(frame(10), rows=RowOrder.TOP_DOWN)
            one_output(shm_name + "i", shm_name + "o", frame(0))
            assert encodes() == 1
            for _ in range(3):  # TouchDesigner may send the same picture again: not encoded again
                style.write(frame(10))
                one_output(shm_name + "i", shm_name + "o", frame(0))
            assert encodes() == 1
            style.write(frame(60))
            one_output(shm_name + "i", shm_name + "o", frame(0))
            assert encodes() == 2
        c.send_message("/ipadapter_update", 1)  # asked for: read again and handed to the engine, which encodes
        c.send_message("/ipadapter_scale", 0.9)  # only a picture it has not encoded (this one it has)
        c.send_message("/ipadapter_enable", 0.0)
        settle(rings, inbox, c)
        st = status(inbox, c)
        assert st["conditioning"]["style_updates"] == 3 and st["engine"]["ip_adapter"]["encodes"] == 2
        assert st["engine"]["ip_adapter"]["scale"] == pytest.approx(0.9)
        assert st["engine"]["ip_adapter"]["enabled"] is False
        mark = inbox.mark()
        c.send_message("/ipadapter_scale", float("nan"))
        c.send_message("/controlnet/0/scale", 0.5)  # no ControlNet in this engine
        settle(rings, inbox, c)
        errors = errors_after(inbox, mark)
        assert "finite" in errors["/ipadapter_scale"] and "no ControlNet" in errors["/controlnet/0/scale"]
        assert status(inbox, c)["engine"]["ip_adapter"]["scale"] == pytest.approx(0.9)
    finally:
        assert b.stop() == 0
