"""The binary frame format, the text messages, and the strength/steps mapping (no server)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from demo import protocol
from demo.protocol import Format, ProtocolError
from demo.server import prompt_argument, t_index_for, Controls
from demo_helpers import HEIGHT, WIDTH, test_image


@pytest.mark.parametrize("fmt", [Format.RGB, Format.RGBA, Format.JPEG])
def test_round_trip_each_format(fmt):
    img = test_image(3)
    msg = protocol.encode_input(img, fmt, 7, 1234.5)
    head, out = protocol.decode_input(msg, WIDTH, HEIGHT)
    assert (head.format, head.frame_id, head.timestamp_ms, head.width, head.height) == (fmt, 7, 1234.5, WIDTH, HEIGHT)
    assert out.shape == (HEIGHT, WIDTH, 3) and out.dtype == np.uint8
    if fmt is Format.JPEG:
        assert np.abs(out.astype(int) - img).mean() < 8  # lossy, but the same picture
    else:
        np.testing.assert_array_equal(out, img)


def test_header_is_32_bytes_little_endian():
    msg = protocol.pack_header(Format.RGB, 0x01020304, 2.0, 640, 480, 5, process_us=9) + b"12345"
    assert msg[:4] == b"RTDF" and msg[4] == 1 and msg[5] == 1
    assert msg[8:12] == bytes([4, 3, 2, 1])
    assert protocol.parse_header(msg).process_us == 9 and len(msg) == 37


def _png(w, h):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(w, h):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _raw(fmt, w, h, payload, magic=b"RTDF", version=1):
    head = bytearray(protocol.pack_header(fmt, 1, 0.0, w, h, len(payload)))
    head[:4] = magic
    head[4] = version
    return bytes(head) + payload


BAD = {
    "short": (b"RTDF\x01", "32-byte header"),
    "magic": (_raw(Format.RGB, WIDTH, HEIGHT, bytes(WIDTH * HEIGHT * 3), magic=b"NOPE"), "must start with"),
    "version": (_raw(Format.RGB, WIDTH, HEIGHT, bytes(WIDTH * HEIGHT * 3), version=9), "version must be 1"),
    "format": (_raw(Format.RGB, WIDTH, HEIGHT, bytes(10))[:5] + b"\x09" + _raw(Format.RGB, WIDTH, HEIGHT, bytes(10))[6:],
               "format must be one of"),
    "length": (_raw(Format.RGB, WIDTH, HEIGHT, bytes(WIDTH * HEIGHT * 3))[:-1], "header says"),
    "size": (_raw(Format.RGB, 32, 32, bytes(32 * 32 * 3)), f"must be {WIDTH}x{HEIGHT}"),
    "payload": (_raw(Format.RGBA, WIDTH, HEIGHT, bytes(WIDTH * HEIGHT * 3)), "RGBA frame of 64x64 needs 16384"),
    "png_as_jpeg": (_raw(Format.JPEG, WIDTH, HEIGHT, _png(WIDTH, HEIGHT)), "needs a JPEG payload; got PNG"),
    "jpeg_wrong_size": (_raw(Format.JPEG, WIDTH, HEIGHT, _jpeg(80, 48)), "the JPEG must be 64x64; got 80x48"),
    "garbage_jpeg": (_raw(Format.JPEG, WIDTH, HEIGHT, b"\xff\xd8" + bytes(100)), "could not decode"),
    "too_large": (_raw(Format.RGBA, WIDTH, HEIGHT, bytes(WIDTH * HEIGHT * 4 + 1)), "at most"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_frames_are_rejected_with_a_clear_message(name):
    msg, words = BAD[name]
    with pytest.raises(ProtocolError) as info:
        protocol.decode_input(msg, WIDTH, HEIGHT)
    assert words in str(info.value)
    assert info.value.to_message()["t"] == "error" and info.value.to_message()["code"]


@pytest.mark.parametrize("text, words", [
    ("not json", "must be JSON"),
    ("[1, 2]", "'t' is one of shown, ping"),
    ('{"t": "launch"}', "'t' is one of"),
    ('{"t": "shown", "id": "x"}', "integer 'id'"),
    ('{"t": "shown", "id": true}', "integer 'id'"),
    (json.dumps({"t": "ping", "pad": "x" * 5000}), "at most 4096"),
    (json.dumps({"t": "ping", "pad": "\u00e9" * 2100}, ensure_ascii=False), "at most 4096 bytes"),
    ("[" * 3000, "must be flat JSON objects"),
    ('[{"":' * 800, "nested too deeply"),
], ids=["not_json", "array", "unknown_type", "string_id", "bool_id", "too_long", "too_many_bytes", "deep_array",
        "deep_object"])
def test_bad_text_messages(text, words):
    with pytest.raises(ProtocolError) as info:
        protocol.parse_text(text)
    assert words in str(info.value)


def test_good_text_messages():
    assert protocol.parse_text('{"t": "shown", "id": 4}') == {"t": "shown", "id": 4}
    assert protocol.parse_text('{"t": "ping"}')["t"] == "ping"


@pytest.mark.parametrize("n", [4, 50, 1000])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("strength", [0.0, 0.1, 0.35, 0.5, 0.9, 1.0])
def test_t_index_for_is_valid_and_monotonic_in_strength(n, steps, strength):
    t = t_index_for(strength, steps, n)
    assert len(t) == min(steps, n) and t == sorted(set(t)) and 0 <= t[0] and t[-1] < n
    if strength < 1.0:
        assert t_index_for(min(1.0, strength + 0.1), steps, n)[0] <= t[0]  # stronger = noisier first step


def test_t_index_for_examples():
    assert t_index_for(0.35, 1, 50) == [32]
    assert t_index_for(0.35, 2, 50) == [32, 41]
    assert t_index_for(1.0, 1, 50) == [0]


def test_prompt_crossfade():
    c = Controls(prompt_a="a cat", prompt_b="a dog")
    assert prompt_argument(c) == "a cat"
    c.blend = 0.25
    assert prompt_argument(c) == [("a cat", 0.75), ("a dog", 0.25)]
    c.blend = 1.0
    assert prompt_argument(c) == "a dog"
    c.prompt_b, c.blend = "", 0.5
    assert prompt_argument(c) == "a cat"
