"""ControlNet and IP-Adapter in the web app: the live settings, their messages, and the style image upload.

Live settings travel as websocket text messages from the control page (validated like every request body:
strict pydantic models, unknown fields and out-of-range values rejected with the field and what it expects;
the engine's own ConfigError is passed on; a rejected message changes nothing)::

    {"t": "controlnet", "index": 0, "scale": 0.8, "enabled": true, "start": 0.0, "end": 1.0}   any subset
    {"t": "ip_adapter", "scale": 0.6, "enabled": true}                                          any subset
    server -> client: {"t": "applied", "what": "controlnet" | "ip_adapter" | "style_image", "controls": {...}}
                      or {"t": "error", "code": ..., "message": ...}

The style image is a binary websocket message: the file's own bytes (PNG or JPEG, never a URL) after a
16-byte little-endian header::

    offset size type  field
    0      4    4s    magic        b"RTDS"
    4      1    u8    version      1
    5      1    x     reserved     0
    6      2    u16   name len     N, at most MAX_NAME_BYTES (0: no name)
    8      4    u32   request id   echoed in the reply ({"t": "applied", "what": "style_image", "id": N, ...})
    12     4    u32   payload len  the file's bytes; the message is 16 + N + payload len bytes long
    16     N          name         the file's name, UTF-8 (shown on the page; never opened as a path)
    16+N   ...        payload      a PNG or JPEG file, at most MAX_STYLE_BYTES, at most MAX_STYLE_PIXELS pixels

The server decodes it with Pillow off the event loop, hands [H, W, 3] uint8 to ``engine.set_style_image``
(encoded once, not per frame) and keeps a small PNG thumbnail for the page (GET /api/style.png). An
unreadable, oversized or non-PNG/JPEG file is rejected with a message and the engine keeps its previous style.
"""

from __future__ import annotations

import io
import math
import struct
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from .protocol import ProtocolError

STYLE_MAGIC = b"RTDS"
STYLE_VERSION = 1
STYLE_HEADER = struct.Struct("<4sBxHII")  # 16 bytes, the layout above
MAX_NAME_BYTES = 200
STYLE_HEADER_SIZE = STYLE_HEADER.size
MAX_STYLE_BYTES = 8 * 1024 * 1024
MAX_STYLE_PIXELS = 4096 * 4096
MAX_STYLE_SIDE = 8192
STYLE_FORMATS = ("PNG", "JPEG")
THUMB_SIDE = 160
MAX_CONTROLNETS = 8
MAX_CN_SCALE = 5.0
MAX_IP_SCALE = 5.0

assert STYLE_HEADER_SIZE == 16


# ---- live settings --------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ControlNetSettings(_Body):
    """One ControlNet's live settings; a field left out (None) keeps its value."""

    scale: float | None = Field(None, ge=0.0, le=MAX_CN_SCALE, allow_inf_nan=False)
    enabled: bool | None = None
    start: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    end: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)


class ControlNetBody(ControlNetSettings):
    t: str | None = None  # the websocket message type ("controlnet"), ignored here
    index: int = Field(ge=0, lt=MAX_CONTROLNETS)


class IpAdapterBody(_Body):
    t: str | None = None  # the websocket message type ("ip_adapter"), ignored here
    scale: float | None = Field(None, ge=0.0, le=MAX_IP_SCALE, allow_inf_nan=False)
    enabled: bool | None = None


CN_FIELDS = ("scale", "enabled", "start", "end")


def controlnet_state(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The live part of ``engine.status()["controlnets"]``: [{scale, enabled, start, end}, ...] ([] without any)."""
    units = status.get("controlnets") or []
    return [{"scale": float(u.get("scale", 1.0)), "enabled": bool(u.get("enabled", True)),
             "start": float(u.get("start", 0.0)), "end": float(u.get("end", 1.0))} for u in units]


def controlnet_info(status: dict[str, Any]) -> list[dict[str, Any]]:
    """What the page labels each ControlNet row with: model and preprocessor (fixed while the engine runs)."""
    units = status.get("controlnets") or []
    return [{"index": i, "model": str(u.get("model", "?")), "preprocessor": _name(u.get("preprocessor", "?")),
             "family": _name(u.get("family", ""))} for i, u in enumerate(units)]


def _name(value: Any) -> str:
    value = getattr(value, "value", value)
    if isinstance(value, dict):  # a preprocessor's describe()
        value = value.get("kind", value.get("name", "?"))
        value = getattr(value, "value", value)
    return str(value)


def merge_controlnets(current: list[dict[str, Any]], index: int, change: dict[str, Any]) -> list[dict[str, Any]]:
    """``current`` with ``change`` applied to unit ``index`` (a new list; ``current`` is not touched)."""
    if not current:
        raise ValueError("this engine has no ControlNet (start the demo with --controlnet MODEL[:PREPROCESSOR"
                         "[:SCALE]])")
    if not 0 <= index < len(current):
        raise ValueError(f"index: expected a ControlNet index from 0 to {len(current) - 1}; got {index}")
    units = [dict(u) for u in current]
    units[index].update(change)
    if units[index]["start"] > units[index]["end"]:
        raise ValueError(f"controlnet {index}: start ({units[index]['start']}) must not be after end "
                         f"({units[index]['end']})")
    return units


def merge_preset_controlnets(current: list[dict[str, Any]], preset: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A preset's ControlNet settings over the current ones; entries beyond the engine's ControlNets are ignored
    (a preset stored with another set of ControlNets still loads)."""
    units = [dict(u) for u in current]
    for unit, stored in zip(units, preset):
        unit.update({k: v for k, v in stored.items() if k in CN_FIELDS and v is not None})
    return units


# ---- style image ---------------------------------------------------------------------------------------------
def pack_style(payload: bytes, request_id: int = 0, name: str = "") -> bytes:
    """The binary message that uploads ``payload`` (a PNG or JPEG file's bytes, named ``name``) as the style image."""
    raw = name.encode("utf-8")[:MAX_NAME_BYTES]
    return STYLE_HEADER.pack(STYLE_MAGIC, STYLE_VERSION, len(raw), request_id & 0xFFFFFFFF, len(payload)) + raw + payload


def is_style_message(message: bytes) -> bool:
    return message[:4] == STYLE_MAGIC


def parse_style(message: bytes) -> tuple[int, str, memoryview]:
    """Check a style-image message's header; (request id, file name, the file's bytes). Raises ProtocolError."""
    if len(message) > STYLE_HEADER_SIZE + MAX_NAME_BYTES + MAX_STYLE_BYTES:
        raise ProtocolError("too_large", f"a style image is at most {MAX_STYLE_BYTES // (1024 * 1024)} MiB; got "
                                         f"{(len(message) - STYLE_HEADER_SIZE) / (1024 * 1024):.1f} MiB")
    if len(message) < STYLE_HEADER_SIZE:
        raise ProtocolError("short", f"a style image message needs a {STYLE_HEADER_SIZE}-byte header; got "
                                     f"{len(message)} bytes")
    magic, version, name_len, request_id, payload_len = STYLE_HEADER.unpack_from(message)
    if magic != STYLE_MAGIC:
        raise ProtocolError("magic", f"a style image message must start with {STYLE_MAGIC!r}; got {magic!r}")
    if version != STYLE_VERSION:
        raise ProtocolError("version", f"style image message version must be {STYLE_VERSION}; got {version}")
    if name_len > MAX_NAME_BYTES:
        raise ProtocolError("length", f"a style image's name is at most {MAX_NAME_BYTES} bytes; got {name_len}")
    if STYLE_HEADER_SIZE + name_len + payload_len != len(message):
        raise ProtocolError("length", f"header says {name_len} name bytes and {payload_len} payload bytes but the "
                                      f"message carries {len(message) - STYLE_HEADER_SIZE} after the header")
    name = bytes(message[STYLE_HEADER_SIZE:STYLE_HEADER_SIZE + name_len]).decode("utf-8", "replace")
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return request_id, name, memoryview(message)[STYLE_HEADER_SIZE + name_len:]


def decode_style(data: bytes | memoryview, name: str = "the style image") -> np.ndarray:
    """A PNG or JPEG file's bytes -> uint8 [H, W, 3] (alpha dropped over black). Raises ProtocolError naming
    what was expected: an empty, oversized, unreadable or other-format file, or too many pixels."""
    if len(data) == 0:
        raise ProtocolError("style_image", f"{name} is empty; expected a PNG or JPEG file")
    if len(data) > MAX_STYLE_BYTES:
        raise ProtocolError("too_large", f"{name} is at most {MAX_STYLE_BYTES // (1024 * 1024)} MiB; got "
                                         f"{len(data) / (1024 * 1024):.1f} MiB")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in STYLE_FORMATS:
                raise ProtocolError("style_image", f"{name} must be a PNG or JPEG file; got "
                                                   f"{im.format or 'an unknown format'}")
            w, h = im.size
            if w < 1 or h < 1 or w > MAX_STYLE_SIDE or h > MAX_STYLE_SIDE or w * h > MAX_STYLE_PIXELS:
                raise ProtocolError("too_large", f"{name} may have at most {MAX_STYLE_PIXELS:,} pixels "
                                                 f"({int(math.sqrt(MAX_STYLE_PIXELS))}x"
                                                 f"{int(math.sqrt(MAX_STYLE_PIXELS))}); got {w}x{h}")
            im.load()  # reads every pixel: a truncated or corrupt file fails here
            rgb = im.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).copy()  # [H, W, 3]
    except ProtocolError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ProtocolError("style_image", f"{name} could not be read as a PNG or JPEG file ({exc})"[:300]) from None


def thumbnail_png(image: np.ndarray, side: int = THUMB_SIDE) -> bytes:
    """uint8 [H, W, 3] -> a PNG at most ``side`` pixels on its longer side (what the page shows)."""
    im = Image.fromarray(image, "RGB")
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
