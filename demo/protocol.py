"""The demo's websocket protocol: binary frames both ways, small JSON text messages for acks and status.

Binary frame (both directions), little-endian, a 32-byte header then the payload::

    offset size type  field
    0      4    4s    magic        b"RTDF"
    4      1    u8    version      1
    5      1    u8    format       1 = raw RGB (H*W*3 bytes), 2 = raw RGBA (H*W*4, what a canvas gives),
                                   3 = JPEG
    6      2    u16   flags        0 (reserved; receivers ignore it)
    8      4    u32   frame id     client -> server: the client's own counter.
                                   server -> client: the id of the input frame the output was made from.
    12     8    f64   timestamp    client -> server: capture time in ms on the client's clock
                                   (performance.timeOrigin + performance.now() in the page).
                                   server -> client: the input's timestamp echoed unchanged (0 when the
                                   output was made from a frozen frame), so the page measures
                                   display time - capture time on its own clock.
    20     2    u16   width        pixels; must equal the engine's width (the page resizes before sending)
    22     2    u16   height       pixels; must equal the engine's height
    24     4    u32   process us   server -> client: time the worker spent on this frame; 0 from clients
    28     4    u32   payload len  bytes after the header; must equal the message length - 32
    32     ...        payload

Text messages are JSON objects with a type field ``t``:

    client -> server  {"t": "shown", "id": N}     the output frame N is on screen: the server may send the next
                      {"t": "ping"}               answered with {"t": "pong"}
                      {"t": "controlnet", ...}    control page only: live ControlNet / IP-Adapter settings,
                      {"t": "ip_adapter", ...}    answered {"t": "applied", ...} or an error (conditioning.py)
    client -> server  binary b"RTDS..."           control page only: a style image file (conditioning.py)
    server -> client  {"t": "hello", ...}         once, on connect: role, width, height, formats, max_bytes,
                                                  conditioning (the engine's ControlNets and IP-Adapter)
                      {"t": "ack", "id": N}       the input frame N is in the worker's mailbox: send the next
                      {"t": "status", ...}        a few times a second: fps, frames in/out, drops, busy_ms
                                                  (how long the engine has been on its current frame; 0 = idle),
                                                  errors, backend, controls, recording
                      {"t": "error", "code": C, "message": M}   a message was rejected; the socket stays open
                                                  ("what": W names a refused conditioning request)
                      {"t": "replaced"}           a newer control page took over; this socket is closed

At most one frame is in flight per direction: a client sends its next frame only after the ``ack`` of the
previous one, and the server sends the next output only after ``shown`` (or after ``ACK_TIMEOUT_S``). Between
those, newer frames replace older ones (see ``worker.py`` and ``server.py``), and each replaced frame is counted
as dropped.
"""

from __future__ import annotations

import enum
import io
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError  # Pillow comes with diffusers

MAGIC = b"RTDF"
VERSION = 1
HEADER = struct.Struct("<4sBBHIdHHII")  # 32 bytes, the layout above
HEADER_SIZE = HEADER.size
MAX_TEXT_BYTES = 4096  # a text message longer than this (UTF-8 bytes) is rejected unread
TEXT_TYPES = ("shown", "ping", "controlnet", "ip_adapter")  # the last two: conditioning.py

assert HEADER_SIZE == 32


class Format(enum.IntEnum):
    RGB = 1
    RGBA = 2
    JPEG = 3


class ProtocolError(ValueError):
    """A websocket message was rejected. ``code`` is a short machine-readable reason sent to the client."""

    def __init__(self, code: str, message: str, what: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.what = what  # which request was refused, when not a frame: "controlnet", "ip_adapter", "style_image"

    def to_message(self) -> dict[str, Any]:
        msg = {"t": "error", "code": self.code, "message": str(self)}
        if self.what:
            msg["what"] = self.what
        return msg


@dataclass(frozen=True)
class FrameHeader:
    format: Format
    frame_id: int
    timestamp_ms: float
    width: int
    height: int
    process_us: int
    payload_len: int


def max_frame_bytes(width: int, height: int) -> int:
    """The largest binary frame a client may send for an engine of this size (raw RGBA)."""
    return HEADER_SIZE + width * height * 4


def pack_header(fmt: Format, frame_id: int, timestamp_ms: float, width: int, height: int,
                payload_len: int, process_us: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, int(fmt), 0, frame_id & 0xFFFFFFFF, float(timestamp_ms),
                       width, height, min(int(process_us), 0xFFFFFFFF), payload_len)


def parse_header(message: bytes) -> FrameHeader:
    """Parse and check the header of a binary frame; raise ProtocolError naming what was expected."""
    if len(message) < HEADER_SIZE:
        raise ProtocolError("short", f"a binary frame needs a {HEADER_SIZE}-byte header; got {len(message)} bytes")
    magic, version, fmt, _flags, frame_id, ts, width, height, process_us, payload_len = HEADER.unpack_from(message)
    if magic != MAGIC:
        raise ProtocolError("magic", f"a binary frame must start with {MAGIC!r}; got {magic!r}")
    if version != VERSION:
        raise ProtocolError("version", f"frame version must be {VERSION}; got {version}")
    try:
        fmt = Format(fmt)
    except ValueError:
        allowed = ", ".join(f"{f.value} ({f.name})" for f in Format)
        raise ProtocolError("format", f"frame format must be one of {allowed}; got {fmt}") from None
    if payload_len != len(message) - HEADER_SIZE:
        raise ProtocolError("length", f"header says {payload_len} payload bytes but the message carries "
                                      f"{len(message) - HEADER_SIZE}")
    if not math.isfinite(ts):
        raise ProtocolError("timestamp", f"timestamp must be a finite number of ms; got {ts!r}")
    return FrameHeader(fmt, frame_id, ts, width, height, process_us, payload_len)


def decode_input(message: bytes, width: int, height: int) -> tuple[FrameHeader, np.ndarray]:
    """Check a client's frame against the engine size and decode it to uint8 [H, W, 3] (a fresh array).

    Raises ProtocolError for a bad header, a size other than ``width`` x ``height``, a payload of the wrong
    length or a payload that is not a JPEG of that size. JPEG decoding needs Pillow.
    """
    if len(message) > max_frame_bytes(width, height):
        raise ProtocolError("too_large", f"a frame for a {width}x{height} engine is at most "
                                         f"{max_frame_bytes(width, height)} bytes; got {len(message)}")
    head = parse_header(message)
    if (head.width, head.height) != (width, height):
        raise ProtocolError("size", f"frames must be {width}x{height} (the engine's size; resize before "
                                    f"sending); got {head.width}x{head.height}")
    payload = memoryview(message)[HEADER_SIZE:]
    if head.format in (Format.RGB, Format.RGBA):
        channels = 3 if head.format is Format.RGB else 4
        want = width * height * channels
        if len(payload) != want:
            raise ProtocolError("length", f"a {head.format.name} frame of {width}x{height} needs {want} payload "
                                          f"bytes; got {len(payload)}")
        image = np.frombuffer(payload, np.uint8).reshape(height, width, channels)[:, :, :3]  # [H, W, 3] view
        return head, np.ascontiguousarray(image)
    return head, _decode_jpeg(payload, width, height)


def _decode_jpeg(payload: memoryview, width: int, height: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(payload)) as im:
            if im.format != "JPEG":
                raise ProtocolError("jpeg", f"format 3 needs a JPEG payload; got {im.format or 'unknown'} data")
            if im.size != (width, height):  # checked before decoding the pixels
                raise ProtocolError("size", f"the JPEG must be {width}x{height}; got {im.size[0]}x{im.size[1]}")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ProtocolError("jpeg", f"format 3 needs a JPEG payload; could not decode it ({exc})") from None


def encode_output(rgb: np.ndarray, fmt: Format, frame_id: int, timestamp_ms: float, process_us: int,
                  jpeg_quality: int = 90) -> bytes:
    """uint8 [H, W, 3] -> one binary frame (RGB or JPEG)."""
    h, w, _ = rgb.shape
    payload = encode_payload(rgb, fmt, jpeg_quality)
    return pack_header(fmt, frame_id, timestamp_ms, w, h, len(payload), process_us) + payload


def encode_payload(rgb: np.ndarray, fmt: Format, jpeg_quality: int = 90) -> bytes:
    """uint8 [H, W, 3] -> the payload bytes of an RGB or JPEG frame."""
    if fmt is Format.JPEG:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="JPEG",
                                                                              quality=jpeg_quality)
        return buf.getvalue()
    if fmt is Format.RGB:
        return np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    raise ValueError(f"output format must be RGB or JPEG; got {fmt!r}")


def encode_input(rgb: np.ndarray, fmt: Format, frame_id: int, timestamp_ms: float, jpeg_quality: int = 90) -> bytes:
    """uint8 [H, W, 3] -> one client frame (what the page does, for tests and scripted clients)."""
    h, w, _ = rgb.shape
    if fmt is Format.RGBA:
        rgba = np.concatenate([rgb, np.full((h, w, 1), 255, np.uint8)], axis=2)  # [H, W, 4]
        payload = rgba.tobytes()
        return pack_header(fmt, frame_id, timestamp_ms, w, h, len(payload)) + payload
    return encode_output(rgb, fmt, frame_id, timestamp_ms, 0, jpeg_quality)


def parse_text(message: str) -> dict[str, Any]:
    """Parse a client's text message; raise ProtocolError unless it is a known JSON object."""
    size = len(message.encode("utf-8", "surrogatepass"))  # bytes, not characters
    if size > MAX_TEXT_BYTES:
        raise ProtocolError("too_large", f"text messages are at most {MAX_TEXT_BYTES} bytes; got {size}")
    try:
        obj = json.loads(message)
    except ValueError as exc:
        raise ProtocolError("json", f"text messages must be JSON objects; could not parse ({exc})") from None
    except RecursionError:  # deeply nested arrays/objects: a RuntimeError that would otherwise drop the socket
        raise ProtocolError("json", "text messages must be flat JSON objects such as {\"t\": \"ping\"}; "
                                    "could not parse (nested too deeply)") from None
    if not isinstance(obj, dict) or obj.get("t") not in TEXT_TYPES:
        raise ProtocolError("type", f"a text message must be a JSON object whose 't' is one of "
                                    f"{', '.join(TEXT_TYPES)}; got {message[:80]!r}")
    if obj["t"] == "shown" and not (isinstance(obj.get("id"), int) and not isinstance(obj.get("id"), bool)):
        raise ProtocolError("type", f"'shown' needs an integer 'id'; got {obj.get('id')!r}")
    return obj
