"""The websocket protocol against a real server process: round trips, viewers, one frame in flight per
direction, newest-wins input, and bad input that is rejected while the other clients go on being served."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from demo import protocol
from demo.conditioning import MAX_STYLE_BYTES
from demo.protocol import Format
from demo_helpers import HEIGHT, WIDTH, WsClient, test_image


def test_hello_describes_the_engine(demo):
    with WsClient(demo.ws_url, "view") as viewer:
        h = viewer.hello
    assert (h["role"], h["width"], h["height"], h["output_format"]) == ("view", WIDTH, HEIGHT, "jpeg")
    assert h["max_bytes"] == protocol.max_frame_bytes(WIDTH, HEIGHT) and h["max_steps"] == 4
    assert set(h["input_formats"]) == {"rgb", "rgba", "jpeg"} and "prompt_a" in h["controls"]


@pytest.mark.parametrize("fmt", [Format.JPEG, Format.RGBA, Format.RGB])
def test_frame_round_trip(demo, fmt):
    with WsClient(demo.ws_url, "control") as page:
        ts = page.send_frame(11, fmt=fmt, ts=123456.75)
        assert page.recv_json(lambda m: m["t"] in ("ack", "error")) == {"t": "ack", "id": 11}
        while True:
            head, msg, _ = page.next_output()
            if head.frame_id == 11:
                break
    assert (head.format, head.width, head.height, head.timestamp_ms) == (Format.JPEG, WIDTH, HEIGHT, ts)
    assert head.process_us > 0
    img = Image.open(io.BytesIO(msg[protocol.HEADER_SIZE:]))
    assert img.format == "JPEG" and img.size == (WIDTH, HEIGHT)
    assert np.asarray(img).std() > 1.0  # a picture, not a blank


class Viewer(threading.Thread):
    """A viewer page on its own thread that acknowledges every frame and counts them."""

    def __init__(self, ws_url: str) -> None:
        super().__init__(daemon=True)
        self.client = WsClient(ws_url, "view")
        self.frames, self.errors, self.stop = [], [], threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    head, _, _ = self.client.next_output(timeout=0.3)
                    self.frames.append(head.frame_id)
                except TimeoutError:
                    continue
        except ConnectionClosed as exc:
            self.errors.append(exc)

    def count_after(self, seconds: float) -> int:
        n = len(self.frames)
        time.sleep(seconds)
        return len(self.frames) - n

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        self.client.close()


class Streamer(threading.Thread):
    """A control page that streams frames at ``fps`` with the ack protocol, acknowledging outputs."""

    def __init__(self, ws_url: str, fps: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.client = WsClient(ws_url, "control")
        self.fps, self.stop, self.sent, self.errors = fps, threading.Event(), 0, []

    def run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                i += 1
                self.client.send_frame(i)
                self.sent += 1
                deadline = time.monotonic() + 1.0 / self.fps
                acked = False
                while not acked or time.monotonic() < deadline:
                    try:
                        msg = self.client.recv(max(0.001, deadline - time.monotonic()) if acked else 5.0)
                    except TimeoutError:
                        break
                    if isinstance(msg, bytes):
                        self.client.ws.send(json.dumps({"t": "shown", "id": protocol.parse_header(msg).frame_id}))
                    elif json.loads(msg)["t"] == "ack":
                        acked = True
        except ConnectionClosed as exc:
            self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        self.client.close()


def test_several_viewers_watch_while_one_page_controls(demo):
    viewers = [Viewer(demo.ws_url) for _ in range(3)]
    for v in viewers:
        v.start()
    streamer = Streamer(demo.ws_url)
    streamer.start()
    try:
        time.sleep(2.5)
        assert all(len(v.frames) >= 3 for v in viewers), [len(v.frames) for v in viewers]
        assert all(v.frames == sorted(v.frames) for v in viewers)  # newest wins: ids only go up
    finally:
        streamer.close()
        for v in viewers:
            v.close()
    assert not streamer.errors and not any(v.errors for v in viewers)


def test_an_output_waits_for_shown(demo):
    """Server -> client: one frame in flight. A viewer that does not say 'shown' gets no second frame."""
    streamer = Streamer(demo.ws_url)
    streamer.start()
    try:
        with WsClient(demo.ws_url, "view") as lazy:
            first, _, _ = lazy.next_output(ack=False)
            with pytest.raises(TimeoutError):  # ack_timeout_s is 2 s; frames are made every ~0.1-0.3 s
                lazy.next_output(timeout=1.2, ack=False)
            lazy.ws.send(json.dumps({"t": "shown", "id": first.frame_id}))
            second, _, _ = lazy.next_output(timeout=5)
            assert second.frame_id > first.frame_id
            status = lazy.recv_json(lambda m: m["t"] == "status", timeout=3)
            assert status["dropped_out"] >= 1  # the outputs made while it was not looking
    finally:
        streamer.close()


def test_input_newest_wins_when_a_client_floods(demo, api):
    """Client -> server: frames sent without waiting for acks replace each other in the one-slot mailbox."""
    before = api.status()["server"]["dropped_in"]
    first, last = 5001, 5030
    with WsClient(demo.ws_url, "control") as page:
        for i in range(first, last + 1):
            page.send_frame(i, fmt=Format.RGBA)
        acks = []
        while len(acks) < last - first + 1:
            m = page.recv_json(lambda m: m["t"] in ("ack", "error"))
            acks.append(m["id"])
        ids = []
        while not ids or ids[-1] != last:
            frame_id = page.next_output()[0].frame_id
            if first <= frame_id <= last:  # not an output still being made for an earlier test's page
                ids.append(frame_id)
    assert acks == list(range(first, last + 1))
    assert len(ids) < 10 and ids == sorted(ids)  # most frames were dropped, never queued
    assert api.status()["server"]["dropped_in"] - before >= 20


def _bad_messages():
    def raw(fmt, w, h, payload, **kw):
        return protocol.pack_header(fmt, 1, 0.0, w, h, len(payload)) + payload

    png = io.BytesIO()
    Image.fromarray(test_image()).save(png, format="PNG")
    small = io.BytesIO()
    Image.fromarray(test_image()[:32, :32]).save(small, format="JPEG")
    return [
        (b"\x00" * 10, "short"),
        (b"XXXX" + raw(Format.RGB, WIDTH, HEIGHT, bytes(WIDTH * HEIGHT * 3))[4:], "magic"),
        (raw(Format.RGB, 32, 32, bytes(32 * 32 * 3)), "size"),
        (raw(Format.RGBA, WIDTH, HEIGHT, bytes(100)), "length"),
        (raw(Format.JPEG, WIDTH, HEIGHT, png.getvalue()), "jpeg"),
        (raw(Format.JPEG, WIDTH, HEIGHT, small.getvalue()), "size"),
        (raw(Format.JPEG, WIDTH, HEIGHT, b"\xff\xd8\xff" + bytes(500)), "jpeg"),
        (bytes(protocol.max_frame_bytes(WIDTH, HEIGHT) + 1), "too_large"),
        ("hello", "json"),
        ('{"t": "launch"}', "type"),
        ("x" * 5000, "too_large"),
    ]


def test_bad_messages_are_rejected_and_everyone_keeps_being_served(demo, api):
    viewer = Viewer(demo.ws_url)
    viewer.start()
    try:
        with WsClient(demo.ws_url, "view") as attacker:
            attacker.send_frame(1)  # a viewer may not send frames at all
            err = attacker.recv_json(lambda m: m["t"] == "error")
            assert err["code"] == "not_controller" and "role=control" in err["message"]
            for msg, code in _bad_messages():
                attacker.ws.send(msg)
                err = attacker.recv_json(lambda m: m["t"] == "error")
                assert err["code"] in (code, "not_controller"), err
        # the control page gets the detailed reason for each; its socket stays open for the good frames between
        before = api.status()["server"]["rejected_messages"]
        seen_before = len(viewer.frames)
        with WsClient(demo.ws_url, "control") as page:
            for i, (msg, code) in enumerate(_bad_messages()):
                page.ws.send(msg)
                err = page.recv_json(lambda m: m["t"] == "error")
                assert err["code"] == code and err["message"], (code, err)
                page.send_frame(100 + i)
                assert page.recv_json(lambda m: m["t"] in ("ack", "error")) == {"t": "ack", "id": 100 + i}
                time.sleep(0.15)
        assert api.status()["server"]["rejected_messages"] - before == len(_bad_messages())
        time.sleep(0.5)
        assert len(viewer.frames) - seen_before >= 3, "the viewer stopped getting frames"
    finally:
        viewer.close()
    assert not viewer.errors


def test_deeply_nested_json_is_an_error_and_the_socket_stays_open(demo):
    # '[' * 3000 is under the 4096-byte text limit but too deep for json's recursion: before the fix the
    # RecursionError (a RuntimeError) escaped and the server dropped the socket without a word
    with WsClient(demo.ws_url, "control") as page:
        for deep in ("[" * 3000, '[{"":' * 800):  # both under the 4096-byte limit
            page.ws.send(deep)
            err = page.recv_json(lambda m: m["t"] == "error")
            assert err["code"] == "json" and "JSON object" in err["message"], err
            page.send_frame(7)
            assert page.recv_json(lambda m: m["t"] in ("ack", "error")) == {"t": "ack", "id": 7}
        page.ws.send('{"t": "ping"}')
        assert page.recv_json(lambda m: m["t"] in ("pong", "error"))["t"] == "pong"


def test_a_message_over_the_hard_limit_closes_only_that_socket(demo):
    viewer = Viewer(demo.ws_url)
    viewer.start()
    streamer = Streamer(demo.ws_url, fps=10)
    streamer.start()
    try:
        with WsClient(demo.ws_url, "view") as big:
            # above uvicorn's ws_max_size (4x the largest frame, at least a style image + 1 MiB)
            big.ws.send(bytes(MAX_STYLE_BYTES + 2 * 1024 * 1024))
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    big.recv(10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009  # "message too big"
        time.sleep(0.3)
        assert viewer.count_after(1.5) >= 1
    finally:
        streamer.close()
        viewer.close()
    assert not viewer.errors and not streamer.errors


def test_a_newer_control_page_takes_over(demo):
    with WsClient(demo.ws_url, "control") as old, WsClient(demo.ws_url, "control") as new:
        assert old.recv_json(lambda m: m["t"] == "replaced")["message"]
        with pytest.raises(ConnectionClosed) as info:
            while True:
                old.recv(5)
        assert info.value.rcvd.code == 4000
        new.send_frame(5)
        assert new.recv_json(lambda m: m["t"] in ("ack", "error")) == {"t": "ack", "id": 5}


def test_bad_role_and_foreign_origin_are_refused(demo):
    with connect(f"{demo.ws_url}?role=admin", open_timeout=10) as ws:
        err = json.loads(ws.recv(5))
        assert err["code"] == "role" and "'control' or 'view'" in err["message"]
        with pytest.raises(ConnectionClosed):
            ws.recv(5)
    with pytest.raises(InvalidStatus) as info:
        with connect(f"{demo.ws_url}?role=control", origin="http://evil.example", open_timeout=10):
            pass
    assert info.value.response.status_code == 403
    with WsClient(demo.ws_url, "view", origin=f"http://127.0.0.1:{demo.port}") as same_origin:
        assert same_origin.hello["role"] == "view"


def test_ping(demo):
    with WsClient(demo.ws_url, "view") as page:
        page.ws.send('{"t": "ping"}')
        assert page.recv_json(lambda m: m["t"] == "pong") == {"t": "pong"}
