"""ControlNet and IP-Adapter OSC addresses on real loopback sockets (python-osc's own client): the addresses
StreamDiffusionTD users know (/controlnets JSON, /ipadapter_scale, /ipadapter_enable, /ipadapter_update) and
our per-unit form (/controlnet/<i>/<field>); bad messages get /error and change nothing. What the engine does
with them is in test_control_bridge.py."""

import json

import pytest
from pythonosc.udp_client import SimpleUDPClient

from td_bridge.osc import Action, Key, Mailbox, OscReceiver, OscSender
from test_osc import Listener  # noqa: E402


box_of = {}


@pytest.fixture
def osc(receiver):
    box, rx, client, listener = receiver
    drain_after(client, listener)  # nothing left from the test before
    return receiver


@pytest.fixture(scope="module")
def receiver():
    """One receiver for the file (closing one waits out its socket timeout)."""
    listener = Listener()
    sender = OscSender("127.0.0.1", listener.port)
    box = Mailbox()
    rx = OscReceiver("127.0.0.1", 0, box, sender, lambda: "{}").start()
    client = SimpleUDPClient("127.0.0.1", rx.port)
    box_of[client] = box
    yield box, rx, client, listener
    del box_of[client]
    rx.close()
    sender.close()
    listener.sock.close()


def drain_after(client, listener):
    """Everything drained once the receive thread has handled what was sent: it handles messages in order,
    so its /status reply to a last /get_status says the ones before are in the mailbox."""
    client.send_message("/get_status", [])
    assert listener.collect("/status", timeout=30.0), "no /status reply"
    return box_of[client].drain()


def test_controlnet_updates_merge_per_unit_and_field(osc):
    box, rx, client, listener = osc
    # StreamDiffusion's spellings, a skipped unit ({}), then our own per-unit form on top
    client.send_message("/controlnets", json.dumps([
        {"conditioning_scale": 0.5, "enabled": True, "control_guidance_start": 0.1, "preprocessor_params": {}},
        {}, {"scale": 1.5, "end": 0.75}]))
    client.send_message("/controlnet/0/scale", 0.25)  # replaces unit 0's scale only
    client.send_message("/controlnet/1/enabled", 0.0)  # a TouchDesigner toggle sends a float
    client.send_message("/controlnets", json.dumps({"2": {"start": 0.5}}))  # dict by index
    values, actions = drain_after(client, listener)
    assert actions == []
    assert [k for k, _ in values] == [Key.CONTROLNETS]
    address, units = values[0][1]
    assert units == {0: ("/controlnet/0/scale", {"scale": 0.25, "enabled": True, "start": 0.1}),
                     1: ("/controlnet/1/enabled", {"enabled": False}),
                     2: ("/controlnets", {"scale": 1.5, "end": 0.75, "start": 0.5})}
    assert not listener.collect("/error", timeout=0.2)


def test_ip_adapter_scale_enable_and_update(osc):
    box, rx, client, listener = osc
    client.send_message("/ipadapter_scale", 0.7)
    client.send_message("/ipadapter_enable", 1.0)
    client.send_message("/ipadapter_update", 1)
    client.send_message("/ipadapter_update", 0)  # the pulse's release: ignored
    values, actions = drain_after(client, listener)
    assert dict((k, v) for k, (_, v) in values) == {Key.IP_ADAPTER_SCALE: pytest.approx(0.7),
                                                     Key.IP_ADAPTER_ENABLED: True}
    assert actions == [(Action.IPADAPTER_UPDATE, 1)]


@pytest.mark.parametrize("address, args, reason", [
    ("/controlnets", "not json", "could not parse"),
    ("/controlnets", '[{"scale": NaN}]', "finite"),
    ("/controlnets", '[{"scale": 7}]', "ControlNet 0: scale: expected a number from 0 to 5"),
    ("/controlnets", '[{}, {"scale": "high"}]', "ControlNet 1: scale"),
    ("/controlnets", '[{"start": 0.9, "end": 0.2}]', "start must not be after end"),
    ("/controlnets", '[{"enabled": "yes"}]', "enabled must be true or false"),
    ("/controlnets", '{"12": {"scale": 1}}', "ControlNet index: expected an integer from 0 to 7"),
    ("/controlnets", '[{"gain": 1}]', "unknown key 'gain'"),
    ("/controlnets", '[{"preprocessor_params": {"low": 0.1}}]', "cannot change while streaming"),
    ("/controlnets", "[]", "1 to 8 items"),
    ("/controlnets", 3, "expected a string"),
    ("/controlnet/0/scale", float("nan"), "finite"),
    ("/controlnet/0/scale", "big", "expected a number"),
    ("/controlnet/9/scale", 1.0, "must be 0 to 7"),
    ("/controlnet/0/gain", 1.0, "/controlnet/<i>/scale|enabled|start|end"),
    ("/controlnet/0/enabled", 2, "true or false"),
    ("/ipadapter_scale", float("inf"), "finite"),
    ("/ipadapter_scale", -1.0, "from 0 to 5"),
    ("/ipadapter_enable", "on", "true or false"),
    ("/ipadapter_update", "now", "no argument or one number"),
])
def test_bad_control_messages_get_an_error_and_change_nothing(osc, address, args, reason):
    box, rx, client, listener = osc
    client.send_message(address, args)
    errors = listener.collect("/error")
    assert errors, f"no /error for {address} {args!r}"
    assert errors[0].params[0] == address and reason in errors[0].params[1], errors[0].params
    assert box.drain() == ([], [])


def test_a_bad_controlnet_message_leaves_the_pending_good_ones(osc):
    box, rx, client, listener = osc
    client.send_message("/controlnet/0/scale", 0.4)
    client.send_message("/controlnets", '[{"scale": 0.9}, {"scale": -1}]')  # rejected whole: unit 0 stays 0.4
    assert listener.collect("/error")[0].params[0] == "/controlnets"
    values, _ = drain_after(client, listener)
    assert values[0][1][1] == {0: ("/controlnet/0/scale", {"scale": pytest.approx(0.4)})}
