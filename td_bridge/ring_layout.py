"""Ring layout: the header's fields, the pixel formats, and the header parser. Stdlib + numpy only (this runs
inside TouchDesigner's Python too). The protocol that uses them is in ring.py.

A ring is one ``multiprocessing.shared_memory`` segment. Every number is little-endian.

Segment layout::

    offset  size  type   field
    ------  ----  -----  --------------------------------------------------------------------------
         0     8  bytes  magic          b"RTDFRAME"
         8     2  u16    version        1
        10     2  u16    header_bytes   offset of slot 0's pixels = 64 + 64 * slot_count
        12     4  u32    width          pixels, 1..16384
        16     4  u32    height         pixels, 1..16384
        20     1  u8     channels       4 for rgba8 / bgra8, 3 for rgb8
        21     1  u8     pixel_format   1 = rgba8, 2 = bgra8, 3 = rgb8
        22     1  u8     row_order      0 = top-down (row 0 is the top), 1 = bottom-up (TouchDesigner)
        23     1  u8     slot_count     1..16
        24     4  u32    flags          bit 0 CLOSED: its bridge has exited; bit 1 CHECKSUM: slots carry crc32
        28     4  u32    owner_pid      process that created the segment
        32     8  u64    slot_stride    bytes from one slot's pixels to the next (frame bytes rounded up to 64)
        40     8  u64    published      frames published so far; the newest is in slot (published - 1) % slot_count
        48     8  u64    session        random id of the bridge serving the ring, new on every create or adopt
                                        (0: nobody has served it yet)
        56     8  u64    heartbeat      the serving bridge adds 1 about four times a second, from a thread of
                                        its own (a slow frame does not stop it)
        64  64*S         slot table, one 64-byte entry per slot:
                           +0  u64 seq           seqlock: odd while the writer is inside the slot, even when
                                                 stable, 0 = never written
                           +8  u64 frame_index   0, 1, 2, ... in the order the writer published them
                          +16  u64 timestamp_ns  time.monotonic_ns() when the writer began the frame
                          +24  u64 source_index  output ring: the input frame it was made from; else frame_index
                          +32  u32 crc32         zlib.crc32 of the slot's pixels when CHECKSUM is set, else 0
                          +36  28  reserved
    header_bytes + k * slot_stride: slot k's pixels, height x width x channels uint8, rows in row_order
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

MAGIC = b"RTDFRAME"
VERSION = 1
HEADER_FIXED = 64
SLOT_ENTRY = 64
MAX_SLOTS = 16
MAX_SIDE = 16384

FLAG_CLOSED = 1
FLAG_CHECKSUM = 2

# magic, version, header_bytes, width, height, channels, pixel_format, row_order, slot_count, flags, owner_pid,
# slot_stride, published
_HEADER = struct.Struct("<8sHHIIBBBBIIQQ")
assert _HEADER.size == 48
_OFF_FLAGS = 24
_OFF_PID = 28
_OFF_PUBLISHED = 40
_OFF_SESSION = 48
_OFF_HEARTBEAT = 56
_KNOWN_FLAGS = FLAG_CLOSED | FLAG_CHECKSUM
_SESSION = struct.Struct("<QQ")  # session, heartbeat at _OFF_SESSION
# frame_index, timestamp_ns, source_index, crc32: a slot-table entry after its seq (at +8), read and written whole
_META = struct.Struct("<QQQI")


class RingError(ValueError):
    """A ring segment is missing, of the wrong size, or has a header that is not a valid ring header."""


class RingTruncated(RingError):
    """The segment is now smaller than its ring: touching the missing part would raise SIGBUS."""


class PixelFormat(enum.Enum):
    RGBA8 = "rgba8"
    BGRA8 = "bgra8"
    RGB8 = "rgb8"

    @property
    def code(self) -> int:
        return _FORMAT_CODES[self]

    @property
    def channels(self) -> int:
        return 3 if self is PixelFormat.RGB8 else 4

    @property
    def rgb_channels(self) -> tuple[int, int, int]:
        """Where red, green and blue sit in a pixel of this format."""
        return (2, 1, 0) if self is PixelFormat.BGRA8 else (0, 1, 2)

    @staticmethod
    def parse(value: "str | PixelFormat") -> "PixelFormat":
        if isinstance(value, PixelFormat):
            return value
        for f in PixelFormat:
            if isinstance(value, str) and f.value == value.lower():
                return f
        raise RingError(f"pixel format must be one of 'rgba8', 'bgra8', 'rgb8'; got {value!r}")


_FORMAT_CODES = {PixelFormat.RGBA8: 1, PixelFormat.BGRA8: 2, PixelFormat.RGB8: 3}
_FORMAT_BY_CODE = {v: k for k, v in _FORMAT_CODES.items()}


class RowOrder(enum.Enum):
    TOP_DOWN = 0  # row 0 is the top of the image (numpy, PIL, video files)
    BOTTOM_UP = 1  # row 0 is the bottom (OpenGL textures, TouchDesigner's TOP.numpyArray())


@dataclass(frozen=True)
class RingLayout:
    """Geometry of a ring; sizes derived once here."""

    width: int
    height: int
    pixel_format: PixelFormat = PixelFormat.RGBA8
    row_order: RowOrder = RowOrder.TOP_DOWN
    slot_count: int = 3
    checksum: bool = False

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SIDE:
                raise RingError(f"ring {name} must be an integer from 1 to {MAX_SIDE}; got {v!r}")
        if not isinstance(self.pixel_format, PixelFormat):
            raise RingError(f"pixel_format must be a PixelFormat; got {self.pixel_format!r}")
        if not isinstance(self.row_order, RowOrder):
            raise RingError(f"row_order must be a RowOrder; got {self.row_order!r}")
        if not isinstance(self.slot_count, int) or not 1 <= self.slot_count <= MAX_SLOTS:
            raise RingError(f"slot_count must be an integer from 1 to {MAX_SLOTS}; got {self.slot_count!r}")

    @property
    def channels(self) -> int:
        return self.pixel_format.channels

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def frame_bytes(self) -> int:
        return self.height * self.width * self.channels

    @property
    def slot_stride(self) -> int:
        return (self.frame_bytes + 63) // 64 * 64

    @property
    def header_bytes(self) -> int:
        return HEADER_FIXED + SLOT_ENTRY * self.slot_count

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + self.slot_count * self.slot_stride

    def describe(self) -> str:
        return (f"{self.width}x{self.height} {self.pixel_format.value} "
                f"{'bottom-up' if self.row_order is RowOrder.BOTTOM_UP else 'top-down'}, {self.slot_count} slots")


@dataclass(frozen=True)
class FrameInfo:
    """What a reader got: the frame's index, when the writer began it, and the input it came from."""

    index: int
    timestamp_ns: int
    source_index: int


def parse_header(buf: memoryview | bytes, size: int, name: str = "?") -> tuple[RingLayout, int]:
    """Validate a ring header against the segment's ``size``; return (layout, flags). Raises RingError."""
    if size < HEADER_FIXED:
        raise RingError(f"shared memory {name!r} is {size} bytes, too small for a ring header ({HEADER_FIXED} bytes)")
    (magic, version, header_bytes, width, height, channels, fmt, row, slots, flags, _pid, stride,
     _published) = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise RingError(f"shared memory {name!r} is not an rtdiffusion frame ring: magic {bytes(magic)!r}, "
                        f"expected {MAGIC!r}")
    if version != VERSION:
        raise RingError(f"ring {name!r} has layout version {version}; this client reads version {VERSION}")
    if fmt not in _FORMAT_BY_CODE:
        raise RingError(f"ring {name!r} has pixel format code {fmt}; expected 1 (rgba8), 2 (bgra8) or 3 (rgb8)")
    pf = _FORMAT_BY_CODE[fmt]
    if channels != pf.channels:
        raise RingError(f"ring {name!r} says {channels} channels for {pf.value}; expected {pf.channels}")
    if row not in (0, 1):
        raise RingError(f"ring {name!r} has row order {row}; expected 0 (top-down) or 1 (bottom-up)")
    try:
        layout = RingLayout(width, height, pf, RowOrder(row), slots, bool(flags & FLAG_CHECKSUM))
    except RingError as exc:
        raise RingError(f"ring {name!r} has a corrupt header: {exc}") from None
    if header_bytes != layout.header_bytes or stride != layout.slot_stride:
        raise RingError(f"ring {name!r} has a corrupt header: header_bytes {header_bytes} / slot_stride {stride}, "
                        f"expected {layout.header_bytes} / {layout.slot_stride} for {layout.describe()}")
    if size < layout.total_bytes:
        raise RingError(f"shared memory {name!r} is {size} bytes; a {layout.describe()} ring needs "
                        f"{layout.total_bytes}")
    return layout, flags


def describe_flags(flags: int, want: int) -> str:
    """What is wrong with a ``flags`` word whose server expects ``want``, and what it does to clients."""
    parts = []
    if flags & FLAG_CLOSED and not want & FLAG_CLOSED:
        parts.append("the CLOSED flag was set while the bridge serves it (clients stop writing into a ring "
                     "marked closed)")
    if want & FLAG_CHECKSUM and not flags & FLAG_CHECKSUM:
        parts.append("the CHECKSUM flag was cleared (writers stop adding crc32 and the bridge, which checks "
                     "it, rejects their frames)")
    if flags & FLAG_CHECKSUM and not want & FLAG_CHECKSUM:
        parts.append("the CHECKSUM flag was set on a ring without checksums (readers reject every frame)")
    if flags & ~_KNOWN_FLAGS:
        parts.append(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:x} were set")
    return "; ".join(parts) or f"flags are 0x{flags:x}, expected 0x{want:x}"
