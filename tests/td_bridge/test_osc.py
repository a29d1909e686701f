"""OSC control on real loopback sockets with python-osc's own client: validation, bursts, big packets."""

import json
import os
import socket
import time

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket
from pythonosc.udp_client import SimpleUDPClient

from td_bridge.osc import Action, Key, Mailbox, OscReceiver, OscSender, status_json


class Listener:
    """What TouchDesigner's OSC In DAT would see on the out port."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]

    def collect(self, address, n=1, timeout=5.0):
        got, end = [], time.monotonic() + timeout
        while len(got) < n and time.monotonic() < end:
            try:
                dgram = self.sock.recv(65536)
            except socket.timeout:
                continue
            got += [m.message for m in OscPacket(dgram).messages if m.message.address == address]
        return got


@pytest.fixture
def osc():
    listener = Listener()
    sender = OscSender("127.0.0.1", listener.port)
    box = Mailbox()
    rx = OscReceiver("127.0.0.1", 0, box, sender, lambda: json.dumps({"state": "ready"})).start()
    client = SimpleUDPClient("127.0.0.1", rx.port)
    yield box, rx, client, listener
    rx.close()
    sender.close()
    listener.sock.close()


def wait_for(box, pred, timeout=5.0):
    end = time.monotonic() + timeout
    seen = {}
    while time.monotonic() < end:
        values, actions = box.drain()
        seen.update(values)
        if pred(seen):
            return seen
        time.sleep(0.01)
    return seen


def test_prompt_seed_and_status(osc):
    box, rx, client, listener = osc
    client.send_message("/prompt", "a watercolor fox")
    client.send_message("/seed", 1234)
    client.send_message("/t_list", [10, 25])
    client.send_message("/similar_filter", 0.97)
    client.send_message("/get_status", [])
    seen = wait_for(box, lambda s: Key.SIMILAR_FILTER in s)
    assert seen[Key.PROMPT][1].parts == (("a watercolor fox", 1.0),)
    assert seen[Key.SEED][1].parts == ((1234, 1.0),)
    assert seen[Key.T_LIST][1] == (10, 25)
    assert seen[Key.SIMILAR_FILTER][1] == (True, pytest.approx(0.97))
    status = listener.collect("/status")
    assert json.loads(status[0].params[0]) == {"state": "ready"}


def test_burst_of_500_keeps_every_final_value(osc):
    box, rx, client, listener = osc
    for i in range(500):
        client.send_message(["/prompt", "/seed", "/guidance_scale", "/delta"][i % 4],
                            [f"prompt {i}", i, 1.0 + i / 1000, i / 100][i % 4])
    seen = wait_for(box, lambda s: rx.received >= 500 and len(s) == 4)
    assert rx.received == 500 and rx.rejected == 0
    assert seen[Key.PROMPT][1].parts[0][0] == "prompt 496"
    assert seen[Key.SEED][1].parts[0][0] == 497
    assert seen[Key.GUIDANCE_SCALE][1] == pytest.approx(1.498)
    assert seen[Key.DELTA][1] == pytest.approx(4.99)


def test_40_kib_prompt_list_is_accepted(osc):
    box, rx, client, listener = osc
    pairs = [[f"prompt number {i} " + "x" * 180, 1.0 + i % 3] for i in range(200)]
    text = json.dumps(pairs)
    assert 40 * 1024 <= len(text) < 60000
    client.send_message("/prompt_list", text)
    seen = wait_for(box, lambda s: Key.PROMPT in s)
    assert len(seen[Key.PROMPT][1].parts) == 200
    assert not listener.collect("/error", timeout=0.3)


@pytest.mark.parametrize("address, args, reason", [
    ("/seed", "forty-two", "expected an integer"),
    ("/seed", 1.5, "expected an integer"),
    ("/guidance_scale", float("nan"), "finite"),
    ("/delta", float("inf"), "finite"),
    ("/guidance_scale", 99.0, "from 0 to 30"),
    ("/prompt", 3, "expected a string"),
    ("/t_list", [30, 20], "strictly increasing"),
    ("/t_list", [], "1 to 16"),
    ("/prompt_list", "[[\"a\", NaN]]", "finite"),
    ("/prompt_list", "[[\"a\", 1.0]", "could not parse"),
    ("/prompt_list", "{\"a\": 1}", "JSON list"),
    ("/prompt_list", "[[\"a\", -1]]", "weights >= 0"),
    pytest.param("/prompt_list", "[" * 61000, "at most", id="too-long-json"),
    pytest.param("/prompt_list", "[" * 59000, "could not parse", id="deeply-nested-json"),
    ("/seed_list", "[[1, 0.5], [\"b\", 0.5]]", "seed list"),
    ("/cached_attention", "{\"enabled\": 1}", "true or false"),
    ("/cached_attention", "{\"frames\": 2}", "unknown keys"),
    ("/prompt_interpolation", "cubic", "'linear', 'slerp'"),
    ("/similar_filter", 2.0, "from 0 to 1"),
    ("/pause", "now", "no argument or one number"),
    ("/no/such/address", 1, "unknown address"),
])
def test_bad_messages_get_an_error_and_change_nothing(osc, address, args, reason):
    box, rx, client, listener = osc
    client.send_message(address, args)
    errors = listener.collect("/error")
    assert errors, f"no /error for {address} {args!r}"
    assert errors[0].params[0] == address and reason in errors[0].params[1]
    assert box.drain() == ([], [])


def test_random_bytes_and_truncated_packets(osc):
    box, rx, client, listener = osc
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        raw.sendto(os.urandom(300), ("127.0.0.1", rx.port))
        raw.sendto(b"/prompt\x00,s\x00\x00abc", ("127.0.0.1", rx.port))  # string without its terminator
        errors = listener.collect("/error", n=2)
        assert len(errors) == 2 and all("not a valid OSC packet" in e.params[1] for e in errors)
        client.send_message("/seed", 7)  # still listening
        assert wait_for(box, lambda s: Key.SEED in s)[Key.SEED][1].parts == ((7, 1.0),)
    finally:
        raw.close()


def test_actions_are_kept_in_order_and_pulse_release_ignored(osc):
    box, rx, client, listener = osc
    client.send_message("/process_frame", [])
    client.send_message("/process_frame", 1)
    client.send_message("/process_frame", 0)  # a TouchDesigner pulse's release
    client.send_message("/stop", [])
    assert box.stop.wait(5.0)
    _, actions = box.drain()  # /stop came last on the one receive thread: everything before it is in
    assert actions == [(Action.PROCESS_FRAME, 2), (Action.STOP, 1)]


def test_bundles_and_integral_floats_from_chops(osc):
    from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder

    box, rx, client, listener = osc
    bundle = OscBundleBuilder(IMMEDIATELY)
    for addr, v in (("/seed", 42.0), ("/delta", 0.5)):
        m = OscMessageBuilder(addr)
        m.add_arg(v, "f")
        bundle.add_content(m.build())
    client.send(bundle.build())
    seen = wait_for(box, lambda s: Key.DELTA in s and Key.SEED in s)
    assert seen[Key.SEED][1].parts == ((42, 1.0),) and seen[Key.DELTA][1] == 0.5


def test_port_in_use_is_a_clear_error():
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    sender = OscSender("127.0.0.1", 9)
    try:
        with pytest.raises(ValueError, match="cannot listen for OSC on 127.0.0.1:.*--osc-in-port"):
            OscReceiver("127.0.0.1", holder.getsockname()[1], Mailbox(), sender, lambda: "{}")
    finally:
        holder.close()
        sender.close()


def test_a_status_reply_too_big_for_udp_is_shortened_and_still_sent():
    """A /status whose JSON would pass one datagram's 65507 bytes (say a 60000-character prompt list) is sent
    shortened, saying so, instead of being dropped with a debug line."""
    listener = Listener()
    sender = OscSender("127.0.0.1", listener.port)
    big = {"state": "streaming", "fps": 12.5, "engine": {"prompt": [["x" * 30000, 1.0], ["y" * 30000, 1.0]],
                                                          "seed": [[i, 1.0] for i in range(5000)]}}
    box = Mailbox()
    rx = OscReceiver("127.0.0.1", 0, box, sender, lambda: status_json(big)).start()
    try:
        SimpleUDPClient("127.0.0.1", rx.port).send_message("/get_status", [])
        status = listener.collect("/status")
        assert status, "no /status reply"
        got = json.loads(status[0].params[0])
        assert got["state"] == "streaming" and "truncated" in got
        assert len(got["engine"]["prompt"][0][0]) < 300 and len(got["engine"]["seed"]) == 16
    finally:
        rx.close()
        sender.close()
        listener.sock.close()


def test_a_message_too_big_for_udp_is_reported_not_silently_dropped(caplog):
    listener = Listener()
    sender = OscSender("127.0.0.1", listener.port)
    try:
        with caplog.at_level("WARNING", logger="td_bridge.osc"):
            assert sender.send("/status", "z" * 70000) is False
        assert any("over the 65507-byte limit" in r.getMessage() for r in caplog.records)
        err = listener.collect("/error")
        assert err and err[0].params[0] == "/status" and "not sent" in err[0].params[1]
    finally:
        sender.close()
        listener.sock.close()


def test_long_addresses_are_cut_and_a_flood_of_bad_messages_logs_a_few_lines(osc, caplog):
    box, rx, client, listener = osc
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with caplog.at_level("WARNING", logger="td_bridge.osc"):
            raw.sendto(OscMessageBuilder("/" + "a" * 60000).build().dgram, ("127.0.0.1", rx.port))
            err = listener.collect("/error")
            assert err and len(err[0].params[0]) < 200 and "60001 characters" in err[0].params[0]
            for i in range(500):
                client.send_message("/no/such/address", i)
            end = time.monotonic() + 60
            while rx.rejected < 501 and time.monotonic() < end:
                time.sleep(0.01)
        assert rx.rejected == 501  # every bad message was handled (and answered with an /error)
        lines = [r.getMessage() for r in caplog.records if r.name == "td_bridge.osc"]
        assert all(len(m) < 2000 for m in lines)  # no 60 KB log line
        assert len(lines) <= 2 * 5 + 2, len(lines)  # at most a burst per 10 s window (the test takes < 20 s
        # unless the machine stalls; a stall only lowers the count per window), not 500 lines
        assert rx.reject_log.suppressed_total >= 500 - len(lines)
    finally:
        raw.close()
