"""ControlNet and IP-Adapter in the web app: the style-image file checks and message header (no server), then a
real `rtdiffusion demo` with two tiny ControlNets and a tiny IP-Adapter on loopback: websocket settings reach
the engine, bad ones are refused with a clear message and change nothing, style images upload (and bad files
are refused, the previous style kept), presets carry the settings."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from demo.conditioning import (MAX_STYLE_BYTES, STYLE_HEADER_SIZE, decode_style, pack_style, parse_style,
                               thumbnail_png)
from demo.controls import PresetBody
from demo.protocol import ProtocolError
from demo_helpers import Api, WsClient

def image_file(fmt: str = "PNG", size=(40, 24), seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


# ---- no server -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_png_or_jpeg_decodes_to_rgb(fmt):
    data = image_file(fmt, (40, 24))
    image = decode_style(data)
    assert image.shape == (24, 40, 3) and image.dtype == np.uint8
    if fmt == "PNG":
        np.testing.assert_array_equal(image, np.asarray(Image.open(io.BytesIO(data))))
    thumb = Image.open(io.BytesIO(thumbnail_png(image)))
    assert thumb.format == "PNG" and thumb.size == (40, 24)


@pytest.mark.parametrize("data, words", ids=["empty", "text", "truncated", "gif", "9MiB"], argvalues=[
    (b"", "is empty; expected a PNG or JPEG file"),
    (b"this is not an image at all", "could not be read as a PNG or JPEG file"),
    (image_file("PNG")[:60], "could not be read as a PNG or JPEG file"),  # truncated
    (image_file("GIF"), "must be a PNG or JPEG file; got GIF"),
    (b"\0" * (MAX_STYLE_BYTES + 1), "is at most 8 MiB"),
])
def test_bad_style_files_are_refused_with_what_was_expected(data, words):
    with pytest.raises(ProtocolError, match=words) as info:
        decode_style(data)
    assert len(str(info.value)) < 300


def test_too_many_pixels_are_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (5000, 3400)).save(buf, format="PNG")  # 17 M pixels, a few KB of file
    with pytest.raises(ProtocolError, match=r"at most 16,777,216 pixels .*got 5000x3400"):
        decode_style(buf.getvalue())


def test_style_message_header():
    msg = pack_style(b"abc", 7, "sunset.png")
    assert msg[:4] == b"RTDS" and msg[4] == 1 and len(msg) == STYLE_HEADER_SIZE + 10 + 3
    request_id, name, payload = parse_style(msg)
    assert (request_id, name, bytes(payload)) == (7, "sunset.png", b"abc")
    assert parse_style(pack_style(b"abc", 1, "a\nb\x1b.png"))[1] == "ab.png"  # no control characters
    with pytest.raises(ProtocolError, match="header says 10 name bytes and 4 payload bytes but the message carries 13"):
        parse_style(msg[:12] + (4).to_bytes(4, "little") + msg[16:])
    with pytest.raises(ProtocolError, match="version must be 1; got 2"):
        parse_style(msg[:4] + b"\x02" + msg[5:])


def test_presets_carry_the_conditioning_settings():
    body = PresetBody.model_validate({"controlnets": [{"scale": 0.4, "enabled": False}, {"start": 0.2}],
                                      "ip_adapter_scale": 0.9, "ip_adapter_enabled": False})
    assert body.model_dump(exclude_none=True) == {
        "controlnets": [{"scale": 0.4, "enabled": False}, {"start": 0.2}], "ip_adapter_scale": 0.9,
        "ip_adapter_enabled": False}
    with pytest.raises(ValueError, match="controlnets.0.scale"):
        PresetBody.model_validate({"controlnets": [{"scale": 9.0}]})


# ---- a real server with two ControlNets and an IP-Adapter ---------------------------------------------------------
@pytest.fixture
def page(control_demo):
    with WsClient(control_demo.ws_url, "control") as client:
        client.frame_id = 100
        yield client


def engine_after_a_frame(page, server) -> dict:
    """The engine's status once a frame has gone through (settings apply at the next frame boundary)."""
    page.frame_id += 1
    page.send_frame(page.frame_id)
    while page.next_output()[0].frame_id != page.frame_id:
        pass
    return Api(server.url).status()["engine"]


def ask(page, msg: dict) -> dict:
    """Send one conditioning message; its answer ('applied' or 'error')."""
    page.ws.send(json.dumps(msg))
    return page.recv_json(lambda m: m["t"] in ("applied", "error"), timeout=60)


def live(units):
    return [{k: u[k] for k in ("scale", "enabled", "start", "end")} for u in units]


def test_hello_and_status_describe_the_conditioning(page, control_demo):
    cond = page.hello["conditioning"]
    assert [(u["index"], u["preprocessor"]) for u in cond["controlnets"]] == [(0, "canny"), (1, "tile")]
    assert cond["ip_adapter"] is not None and cond["max_style_bytes"] == MAX_STYLE_BYTES
    assert [u["scale"] for u in page.hello["controls"]["controlnets"]] == [1.0, 0.5]
    status = page.recv_json(lambda m: m["t"] == "status", timeout=30)
    assert len(status["conditioning"]["controlnets"]) == 2 and status["conditioning"]["ip_adapter"] is not None


def test_the_style_image_given_at_start_is_encoded_and_shown(control_demo):
    with WsClient(control_demo.ws_url, "view") as viewer:
        style = viewer.hello["conditioning"]["style"]
    assert style["name"] == "start-style.png" and (style["width"], style["height"]) == (24, 16)
    api = Api(control_demo.url, control_demo.ws_url)
    assert api.engine()["ip_adapter"]["encodes"] >= 1  # encoded at the first frame boundary
    assert api.status()["conditioning"]["style"]["name"] == "start-style.png"
    thumb = Api(control_demo.url).get("/api/style.png")
    assert thumb.status == 200 and Image.open(io.BytesIO(thumb.body)).getpixel((0, 0)) == (200, 40, 90)


def test_websocket_settings_change_the_engine(page, control_demo):
    assert ask(page, {"t": "controlnet", "index": 1, "scale": 0.25, "start": 0.1})["t"] == "applied"
    reply = ask(page, {"t": "controlnet", "index": 0, "enabled": False})
    assert reply["t"] == "applied" and reply["controls"]["controlnets"][0]["enabled"] is False
    assert ask(page, {"t": "ip_adapter", "scale": 0.8, "enabled": False})["t"] == "applied"
    engine = engine_after_a_frame(page, control_demo)
    units = live(engine["controlnets"])
    assert units[0]["enabled"] is False and math.isclose(units[1]["scale"], 0.25) and \
        math.isclose(units[1]["start"], 0.1)
    assert math.isclose(engine["ip_adapter"]["scale"], 0.8) and engine["ip_adapter"]["enabled"] is False
    # back to the start
    ask(page, {"t": "controlnet", "index": 0, "enabled": True})
    ask(page, {"t": "controlnet", "index": 1, "scale": 0.5, "start": 0.0})
    ask(page, {"t": "ip_adapter", "scale": 0.6, "enabled": True})


@pytest.mark.parametrize("msg, words", [
    ({"t": "controlnet", "index": 2, "scale": 0.3}, "index: expected a ControlNet index from 0 to 1; got 2"),
    ({"t": "controlnet", "index": 0, "scale": float("nan")}, "scale: Input should be a finite number"),
    ({"t": "controlnet", "index": 0, "scale": "0.5"}, "scale: Input should be a valid number"),
    ({"t": "controlnet", "index": 0, "scale": 7.0}, "scale: Input should be less than or equal to 5"),
    ({"t": "controlnet", "index": 0, "start": 0.8, "end": 0.2}, "start (0.8) must not be after end (0.2)"),
    ({"t": "controlnet", "index": 0, "gain": 1}, "gain: Extra inputs are not permitted"),
    ({"t": "controlnet", "scale": 0.3}, "index: Field required"),
    ({"t": "controlnet", "index": 0}, "give at least one of scale, enabled, start, end"),
    ({"t": "ip_adapter", "enabled": "yes"}, "enabled: Input should be a valid boolean"),
    ({"t": "ip_adapter", "scale": -1}, "scale: Input should be greater than or equal to 0"),
])
def test_bad_settings_get_a_clear_error_and_change_nothing(page, control_demo, msg, words):
    before = engine_after_a_frame(page, control_demo)
    reply = ask(page, msg)
    assert reply["t"] == "error" and reply["what"] == msg["t"] and words in reply["message"], reply
    after = engine_after_a_frame(page, control_demo)
    assert live(after["controlnets"]) == live(before["controlnets"])
    assert after["ip_adapter"]["scale"] == before["ip_adapter"]["scale"]
    assert Api(control_demo.url).status()["controls"]["controlnets"] == live(before["controlnets"])


def test_a_viewer_cannot_change_settings(control_demo):
    with WsClient(control_demo.ws_url, "view") as viewer:
        reply = ask(viewer, {"t": "controlnet", "index": 0, "scale": 0.1})
        assert reply["code"] == "not_controller" and "viewer" in reply["message"]
        viewer.ws.send(pack_style(image_file()))
        reply = viewer.recv_json(lambda m: m["t"] in ("applied", "error"), timeout=60)
        assert reply["code"] == "not_controller" and reply["what"] == "style_image"


def test_style_image_upload_reaches_the_engine_and_bad_files_keep_the_previous_style(page, control_demo):
    api = Api(control_demo.url)
    encodes = engine_after_a_frame(page, control_demo)["ip_adapter"]["encodes"]
    page.ws.send(pack_style(image_file("JPEG", (50, 30), seed=3), 5, "sunset.jpg"))
    reply = page.recv_json(lambda m: m["t"] in ("applied", "error"), timeout=60)
    assert reply["t"] == "applied" and reply["id"] == 5 and (reply["style"]["width"], reply["style"]["height"]) == (50, 30)
    version = reply["style"]["version"]
    assert reply["style"]["name"] == "sunset.jpg"
    after = engine_after_a_frame(page, control_demo)["ip_adapter"]
    assert after["encodes"] == encodes + 1
    thumb = api.get("/api/style.png")
    assert thumb.status == 200 and Image.open(io.BytesIO(thumb.body)).size == (50, 30)
    for bad, words in ((b"\x89PNG\r\n\x1a\n garbage", "could not be read as a PNG or JPEG file"),
                       (image_file("GIF"), "must be a PNG or JPEG file; got GIF")):
        page.ws.send(pack_style(bad, 6))
        reply = page.recv_json(lambda m: m["t"] in ("applied", "error"), timeout=60)
        assert reply["t"] == "error" and reply["what"] == "style_image" and words in reply["message"], reply
    assert engine_after_a_frame(page, control_demo)["ip_adapter"]["encodes"] == encodes + 1  # kept the old one
    assert api.status()["conditioning"]["style"]["version"] == version
    assert api.get("/api/style.png").body == thumb.body


def test_presets_store_and_apply_the_conditioning_settings(page, control_demo):
    api = Api(control_demo.url)
    stored = {"controlnets": [{"scale": 0.3, "enabled": False, "start": 0.0, "end": 0.5}, {"scale": 1.5}],
              "ip_adapter_scale": 1.1, "ip_adapter_enabled": True}
    assert api.put("/api/presets/9", stored).status == 200
    r = api.post("/api/presets/9/apply")
    assert r.status == 200, r.body
    engine = engine_after_a_frame(page, control_demo)
    units = live(engine["controlnets"])
    assert units[0] == {"scale": 0.3, "enabled": False, "start": 0.0, "end": 0.5} and math.isclose(units[1]["scale"], 1.5)
    assert math.isclose(engine["ip_adapter"]["scale"], 1.1)
    ask(page, {"t": "controlnet", "index": 0, "scale": 1.0, "enabled": True, "end": 1.0})
    ask(page, {"t": "controlnet", "index": 1, "scale": 0.5})
    ask(page, {"t": "ip_adapter", "scale": 0.6})


def test_an_engine_without_conditioning_refuses_its_messages_by_name(demo):
    """The plain server (random:tiny, no ControlNet, no IP-Adapter): the page gets no panel, the messages a reason."""
    with WsClient(demo.ws_url, "control") as page:
        cond = page.hello["conditioning"]
        assert cond["controlnets"] == [] and cond["ip_adapter"] is None and cond["style"] is None
        reply = ask(page, {"t": "controlnet", "index": 0, "scale": 0.5})
        assert reply["t"] == "error" and "this engine has no ControlNet" in reply["message"] and "--controlnet" in \
            reply["message"]
        reply = ask(page, {"t": "ip_adapter", "scale": 0.5})
        assert reply["t"] == "error" and "this engine has no IP-Adapter" in reply["message"]
        page.ws.send(pack_style(image_file()))
        reply = page.recv_json(lambda m: m["t"] in ("applied", "error"), timeout=60)
        assert reply["what"] == "style_image" and "--ip-adapter MODEL" in reply["message"]
    assert Api(demo.url).get("/api/style.png").status == 404
