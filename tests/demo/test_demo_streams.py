"""`rtdiffusion demo --streams 2`: one MultiStreamEngine, one stream per control page, per-stream projector pages.

One real server (random:tiny, 64x64, CPU, raw RGB output so outputs compare exactly) for the module; real
websockets and HTTP on loopback.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from websockets.sync.client import connect

from browser_helpers import HAVE_CHROMIUM, SKIP_REASON, chromium, until
from demo import protocol
from demo_helpers import HEIGHT, WIDTH, Api, DemoProcess, WsClient, test_image
from rtdiffusion.cli import main

RANGE = "stream: must be an integer from 0 to 1 (this server runs 2 streams, --streams 2)"


@pytest.fixture(scope="module")
def group():
    server = DemoProcess("--streams", "2", "--output-format", "rgb", "--prompt", "ink")
    yield server
    code = server.stop()
    assert code in (0, 130) and "demo server stopped" in server.log(), server.log()[-3000:]


def page(server: DemoProcess, role: str, stream: int) -> WsClient:
    return WsClient(server.ws_url, f"{role}&stream={stream}")


def output_for(client: WsClient, frame_id: int, image: np.ndarray) -> np.ndarray:
    """Send ``image`` as frame ``frame_id`` and return the output made from it, uint8 [H, W, 3]."""
    client.send_frame(frame_id, image, fmt=protocol.Format.RGB)
    while True:
        head, msg, _ = client.next_output()
        if head.frame_id == frame_id:
            return np.frombuffer(msg, np.uint8, offset=protocol.HEADER_SIZE).reshape(HEIGHT, WIDTH, 3)


def test_two_performers_each_get_their_own_frames_back(group):
    with page(group, "control", 0) as a, page(group, "control", 1) as b:
        assert (a.hello["stream"], b.hello["stream"], a.hello["streams"]) == (0, 1, 2)
        a.send_frame(101, test_image(1), fmt=protocol.Format.RGB)  # both in flight at once
        b.send_frame(201, test_image(2), fmt=protocol.Format.RGB)
        assert a.next_output()[0].frame_id == 101
        assert b.next_output()[0].frame_id == 201
        for i in range(3):  # stream 1's performer sends nothing now: stream 0 is not held up by it
            assert output_for(a, 110 + i, test_image(10 + i)).shape == (HEIGHT, WIDTH, 3)
        streams = Api(group.url).get("/api/streams").json()["streams"]
        assert [s["controller"] for s in streams] == [True, True]
        assert streams[0]["frames_out"] >= 4 and streams[1]["frames_out"] >= 1
        status = Api(group.url).get("/api/status?stream=1").json()
        assert status["server"]["stream"] == 1 and status["server"]["frames_out"] == streams[1]["frames_out"]
        assert "fps" in status["server"] and [s["index"] for s in status["streams"]] == [0, 1]
    deadline = time.monotonic() + 30  # the server sees the sockets close on its own loop
    while any(s["controller"] for s in Api(group.url).get("/api/streams").json()["streams"]):
        assert time.monotonic() < deadline, "the streams still have controllers after both pages left"
        time.sleep(0.05)


def test_a_prompt_on_stream_1_leaves_stream_0_alone(group):
    api = Api(group.url)
    image = test_image(7)
    with page(group, "control", 0) as a, page(group, "control", 1) as b:
        before = output_for(a, 301, image)
        assert np.array_equal(output_for(b, 401, image), before)  # same settings, same input: same output
        r = api.post("/api/prompt?stream=1", {"prompt_a": "neon jellyfish"})
        assert r.status == 200 and r.json()["prompt_a"] == "neon jellyfish"
        output_for(b, 402, image)  # stream 1 runs with its new prompt (applied at this tick's boundary)
        after = output_for(a, 302, image)
        engine = api.get("/api/status").json()["engine"]["per_stream"]
    assert engine[1]["prompt"] == [["neon jellyfish", 1.0]] and engine[0]["prompt"] == [["ink", 1.0]]
    assert np.array_equal(after, before)
    assert api.get("/api/status?stream=0").json()["controls"]["prompt_a"] == "ink"
    assert api.post("/api/prompt?stream=1", {"prompt_a": "ink"}).status == 200


@pytest.mark.parametrize("query", ["stream=2", "stream=-1", "stream=one", "stream=0&stream=1"])
def test_a_stream_out_of_range_is_refused_naming_the_range(group, query):
    api = Api(group.url)
    for method, path in (("GET", "/api/status"), ("POST", "/api/prompt"), ("GET", "/output"), ("GET", "/")):
        r = api.request(method, f"{path}?{query}", {"prompt_a": "x"} if method == "POST" else None)
        assert r.status == 422 and RANGE in r.json()["error"], (path, r.status, r.body[:200])
    with connect(f"{group.ws_url}?role=control&{query}", open_timeout=10) as ws:
        err = ws.recv(timeout=10)
        assert '"code": "stream"' in err and RANGE in err
    assert api.get("/api/status").json()["controls"]["prompt_a"] == "ink"  # nothing changed


def test_output_page_viewers_get_only_their_stream(group):
    with page(group, "view", 0) as v0, page(group, "view", 1) as v1, \
            page(group, "control", 0) as a, page(group, "control", 1) as b:
        sent = output_for(b, 501, test_image(3))
        head, msg, _ = v1.next_output()
        assert head.frame_id == 501
        assert np.array_equal(np.frombuffer(msg, np.uint8, offset=protocol.HEADER_SIZE).reshape(sent.shape), sent)
        output_for(a, 601, test_image(4))
        assert v0.next_output()[0].frame_id == 601  # stream 1's frame 501, published first, never reached it
        assert Api(group.url).get("/api/streams").json()["streams"][1]["viewers"] == 1


def test_group_flags_are_checked_before_anything_loads(caplog):
    base = ["demo", "--model", "random:tiny", "--width", "64", "--height", "64", "--device", "cpu"]
    with caplog.at_level(logging.ERROR):
        assert main(base + ["--streams", "0"]) == 2
        assert main(base + ["--streams", "2", "--similar-filter", "0.9"]) == 2
    assert "--streams must be from 1 to 16" in caplog.text
    assert "--similar-filter cannot be used with --streams 2" in caplog.text


@pytest.mark.skipif(not HAVE_CHROMIUM, reason=SKIP_REASON)
def test_a_browser_page_drives_its_own_stream_and_its_projector_page_shows_it(group):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    api = Api(group.url)
    engine = lambda: api.get("/api/status").json()["engine"]["per_stream"]  # noqa: E731
    with chromium(1280, 900) as d:
        d.get(f"{group.url}/?stream=1&source=pattern")
        shown = "return window.rtdApp && window.rtdApp.view.stats.shown"
        until(d, lambda d: d.execute_script(shown) >= 3, what="3 outputs on stream 1's control page")
        until(d, lambda d: d.execute_script("return document.getElementById('streamPick') !== null"),
              what="the stream picker")
        assert d.execute_script("const p = document.getElementById('streamPick'); "
                                "return [p.value, p.options.length]") == ["1", 2]
        assert d.find_element(By.ID, "outputLink").get_attribute("href").endswith("/output?stream=1")
        prompt = d.find_element(By.ID, "promptA")  # the page's own request carries ?stream=1
        prompt.clear()
        prompt.send_keys("glass city", Keys.ENTER)
        until(d, lambda d: engine()[1]["prompt"] == [["glass city", 1.0]], what="stream 1's prompt")
        assert engine()[0]["prompt"] == [["ink", 1.0]]
        streams = api.get("/api/streams").json()["streams"]
        assert streams[1]["controller"] and not streams[0]["controller"]

        control = d.current_window_handle
        d.switch_to.new_window("tab")  # the control page keeps sending from its own tab
        d.get(f"{group.url}/output?stream=1")
        until(d, lambda d: d.execute_script("return window.rtdOutput && window.rtdOutput.view.stats.shown") >= 2,
              what="stream 1's frames on its projector page")
        d.switch_to.window(control)
    assert api.post("/api/prompt?stream=1", {"prompt_a": "ink"}).status == 200
