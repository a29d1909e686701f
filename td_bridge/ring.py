"""Shared-memory frame rings: one writer, any number of readers, no torn frames.

A ring is one ``multiprocessing.shared_memory`` segment (Windows, macOS, Linux) holding a fixed header, a
slot table and ``slot_count`` pixel slots. The bridge creates two: the input ring (TouchDesigner or any client
writes, the bridge reads) and the output ring (the bridge writes, clients read). Every number is
little-endian.

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
        24     4  u32    flags          bit 0 CLOSED: its creator has gone; bit 1 CHECKSUM: slots carry crc32
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

Protocol (a seqlock per slot; one writer per ring)::

    writer, frame n into slot k = n % S          reader
    ---------------------------------------      ---------------------------------------------------------
    1. seq[k] += 1            (now odd)          1. p = published; nothing new if p == last seen
    2. pixels, frame_index, timestamp,           2. k = (p - 1) % S; s1 = seq[k]; retry if s1 is odd or 0
       source_index, crc32                       3. copy pixels and the slot entry out
    3. seq[k] += 1            (even again)       4. s2 = seq[k]; if s2 != s1 the writer lapped us: retry
    4. published = n + 1                         5. with CHECKSUM, crc32 of the copy must match: else retry

A reader therefore returns a complete frame or nothing; it may skip frames (the newest wins) but never
goes back, because ``published`` only grows. The ordering of the plain stores in the writer relies on the
hardware keeping stores in order (x86-64 does; Python exposes no fence). On weakly ordered CPUs (Apple
silicon, other ARM64) create rings with ``checksum=True``: the crc32 check then catches anything the
fence-less seqlock could miss, at about 0.3 ms a 512x512 RGBA frame.

The writer never waits for readers; readers never block the writer.

Who serves a ring, and how clients notice a new bridge::

    bridge (the server of both rings)               client (TouchDesigner's InputSender / OutputReceiver)
    ---------------------------------------------   -------------------------------------------------------
    create, or adopt a ring of the right geometry   attach by name; remember its session
      left by a bridge that crashed: new session,   once a second: heartbeat unchanged for STALE_S -> say
      owner_pid, CLOSED cleared                       "not responding"; the segment now under the name
    heartbeat += 1 four times a second                (``probe``) has another session, or is gone -> let go
    every loop: size, geometry and flags checked      and attach to what is there now
      against what it made; flags and geometry      before every frame: the segment's size (a truncated
      rewritten, a truncated segment recreated        segment would raise SIGBUS on access)
    at exit: CLOSED set, unlinked (if it made it)   CLOSED seen -> let go, wait for the next bridge

Everyone follows the CHECKSUM flag as it is now (the server keeps it right), so a writer that attached while
the flag was wrong recovers as soon as the server repairs it.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import struct
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

log = logging.getLogger(__name__)

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
# seq, frame_index, timestamp_ns, source_index, crc32 (one slot-table entry); _META is the same without seq
_ENTRY = struct.Struct("<QQQQI")
_META = struct.Struct("<QQQI")
_RETRIES = 16
_FAILURES = ("lapped", "mid-write", "unwritten", "older", "crc")  # why an attempt of RingReader.read failed


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


_CREATED: set[str] = set()  # segments this process created (and whose tracker registration it keeps)
_TRACKER_LOCK = threading.Lock()


def _open_untracked(name: str) -> shared_memory.SharedMemory:
    """``SharedMemory(name)`` without registering with multiprocessing's resource tracker.

    Python < 3.13 registers every attached segment on POSIX, which (a) starts a tracker process with
    ``sys.executable`` (inside TouchDesigner on macOS that is TouchDesigner itself) and (b) lets that tracker
    unlink the segment when this process exits. The registration call is skipped for this one segment.
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=False, track=False)
    if os.name != "posix":  # Windows has no resource tracker for shared memory
        return shared_memory.SharedMemory(name=name, create=False)
    from multiprocessing import resource_tracker

    with _TRACKER_LOCK:
        real = resource_tracker.register

        def register(rname, rtype):
            if rtype == "shared_memory" and rname.lstrip("/") == name:
                return None
            return real(rname, rtype)

        resource_tracker.register = register
        try:
            return shared_memory.SharedMemory(name=name, create=False)
        finally:
            resource_tracker.register = real


def _attach(name: str) -> shared_memory.SharedMemory:
    """Open an existing segment, untracked; every failure is a RingError that says what was seen."""
    try:
        return _open_untracked(name)
    except FileNotFoundError:
        raise RingError(f"no shared memory named {name!r}; is the writer (the bridge) running?") from None
    except PermissionError as exc:
        raise RingError(f"no permission to open shared memory {name!r} ({exc.strerror or exc}): the bridge "
                        f"runs as another user or elevated (Windows: run both elevated or neither)") from None
    except (OSError, ValueError) as exc:  # e.g. an empty segment: "cannot mmap an empty file"
        raise RingError(f"cannot open shared memory {name!r}: {exc}") from None


def _unlink_name(name: str) -> None:
    """Remove a segment's name that this process did not create (no tracker registration to end)."""
    if os.name == "posix":
        import _posixshmem

        _posixshmem.shm_unlink("/" + name)
    # Windows: a section goes when its last handle closes; there is no name to remove


def probe(name: str) -> tuple[int, int]:
    """(session, heartbeat) of the ring now under ``name``; RingError if there is none or it is not a ring.

    Clients call it about once a second to find out whether the name still means the segment they hold."""
    shm = _attach(name)
    try:
        parse_header(shm.buf, shm.size, name)
        return _SESSION.unpack_from(shm.buf, _OFF_SESSION)
    finally:
        shm.close()


_SESSION = struct.Struct("<QQ")  # session, heartbeat


def _attach_checked(name: str, expect: "RingLayout | None"):
    """Attach to ring ``name`` and read its header; with ``expect``, its size and format must match."""
    shm = _attach(name)
    try:
        layout, _ = parse_header(shm.buf, shm.size, name)
        if expect is not None and (layout.width, layout.height, layout.pixel_format) != (
                expect.width, expect.height, expect.pixel_format):
            raise RingError(f"ring {name!r} is {layout.describe()}; expected {expect.describe()}")
    except RingError:
        shm.close()
        raise
    return shm, layout


class _Ring:
    """Views over one mapped segment. Subclasses add the writer's or the reader's half of the protocol.

    ``owner``: this process created the segment and unlinks it at close. ``serving`` (see ``serve``): this
    process is the bridge behind the ring; it keeps the header right and marks the ring CLOSED at close."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: RingLayout, owner: bool) -> None:
        self._shm = shm
        self.layout = layout
        self.name = shm.name
        self._owner = owner
        self.serving = False
        buf = shm.buf
        self._buf = buf
        self._fd = getattr(shm, "_fd", -1)  # POSIX: the segment's descriptor, for fstat; Windows: -1
        # [S] u64 views, one element per slot entry; each write is one aligned 8-byte store
        self._seq = np.ndarray((layout.slot_count,), dtype="<u8", buffer=buf, offset=HEADER_FIXED,
                               strides=(SLOT_ENTRY,))
        self._published = np.ndarray((1,), dtype="<u8", buffer=buf, offset=_OFF_PUBLISHED)
        self._flags = np.ndarray((1,), dtype="<u4", buffer=buf, offset=_OFF_FLAGS)
        self._session = np.ndarray((2,), dtype="<u8", buffer=buf, offset=_OFF_SESSION)  # [session, heartbeat]
        # [S, H, W, C] uint8 pixel views, one per slot
        self._slots = [np.ndarray(layout.shape, dtype=np.uint8, buffer=buf,
                                  offset=layout.header_bytes + k * layout.slot_stride)
                       for k in range(layout.slot_count)]
        # the geometry fields (magic .. slot_count, and slot_stride) as this process opened them
        self._geometry = (bytes(buf[:24]), bytes(buf[32:40]))
        self._want_flags = FLAG_CHECKSUM if layout.checksum else 0  # what a serving bridge keeps in `flags`

    @property
    def published(self) -> int:
        return int(self._published[0])

    @property
    def closed(self) -> bool:
        return bool(self._flags[0] & FLAG_CLOSED)

    @property
    def session(self) -> int:
        return int(self._session[0])

    @property
    def heartbeat(self) -> int:
        return int(self._session[1])

    @property
    def owner_pid(self) -> int:
        return int.from_bytes(bytes(self._buf[_OFF_PID:_OFF_PID + 4]), "little")

    def serve(self, checksum: bool | None = None) -> int:
        """Become the bridge behind this ring: a new session id, our pid, the flags as we want them (CLOSED
        cleared; CHECKSUM as ``checksum``, default as the ring has it). Returns the session id."""
        if checksum is not None:
            self._want_flags = FLAG_CHECKSUM if checksum else 0
        self._buf[_OFF_PID:_OFF_PID + 4] = (os.getpid() & 0xFFFFFFFF).to_bytes(4, "little")
        self._flags[0] = self._want_flags
        self._session[0] = _new_session()
        self._session[1] += 1  # a served ring's heartbeat is never 0 (0: nobody beats it; never called stale)
        self.serving = True
        return self.session

    def beat(self) -> None:
        """Server: one heartbeat (clients call the ring dead when it stops). Checks the size first."""
        self.check_size()
        self._session[1] += 1

    def segment_size(self) -> int:
        """The segment's size now (POSIX: fstat; it can shrink under us). Windows sections cannot shrink."""
        return os.fstat(self._fd).st_size if self._fd >= 0 else self._shm.size

    def check_size(self) -> None:
        """Raise RingTruncated if the segment is smaller than the ring now; call before touching it."""
        size = self.segment_size()
        if size < self.layout.total_bytes:
            raise RingTruncated(f"shared memory {self.name!r} was truncated to {size} bytes under this process "
                                f"(the {self.layout.describe()} ring needs {self.layout.total_bytes}); its pages "
                                f"are not touched again")

    def check_header(self) -> None:
        """Raise RingError naming what changed since this process opened the ring: the segment's size, its
        geometry, and (on the serving side) the flags. ``repair_header`` puts geometry and flags back."""
        self.check_size()
        if (bytes(self._buf[:24]), bytes(self._buf[32:40])) != self._geometry:
            try:
                now = parse_header(self._buf, self._shm.size, self.name)[0].describe()
            except RingError as exc:  # names the broken field
                raise RingError(f"corrupt header: {exc}") from None
            raise RingError(f"ring {self.name!r} header changed while in use: now {now}, opened as "
                            f"{self.layout.describe()}")
        if self.serving:
            flags = int(self._flags[0])
            if flags != self._want_flags:
                raise RingError(f"ring {self.name!r}: {describe_flags(flags, self._want_flags)}")

    def clear_closed(self) -> None:
        """Mark the ring open again (a bridge adopting a ring of the right geometry that it will serve)."""
        self._flags[0] &= ~np.uint32(FLAG_CLOSED)

    def repair_header(self) -> None:
        """Server only: write the geometry and the flags back after someone scribbled on them."""
        assert self._owner or self.serving, "only the ring's bridge may rewrite its header"
        self.check_size()
        self._buf[:24], self._buf[32:40] = self._geometry
        self._flags[0] = self._want_flags

    def close(self, unlink: bool | None = None) -> None:
        """Unmap; the server also marks the ring CLOSED, and (by default only its creator) unlinks it."""
        if self._shm is None:
            return
        unlink = self._owner if unlink is None else unlink
        if self._owner or self.serving:
            try:
                if self.segment_size() >= HEADER_FIXED:
                    self._flags[0] |= FLAG_CLOSED
            except (ValueError, TypeError, OSError):  # pragma: no cover
                pass
        self._seq = self._published = self._flags = self._session = None  # type: ignore[assignment]
        self._slots = []
        self._buf = None  # type: ignore[assignment]
        shm, self._shm = self._shm, None
        try:
            shm.close()
        except BufferError:  # a caller still holds a view; the mapping goes when it is collected
            log.warning("ring %s still has views in use; it stays mapped until they are released", self.name)
        if unlink:
            _CREATED.discard(self.name)
            try:
                if self._owner:
                    shm.unlink()  # also ends the resource tracker's registration
                else:
                    _unlink_name(self.name)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _new_session() -> int:
    return secrets.randbits(63) | 1  # never 0 (0: an old bridge that does not write sessions)


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


class RingWriter(_Ring):
    """The one writer of a ring. ``create`` makes a new segment; ``attach`` writes into one made elsewhere.

    Hot path: ``begin()`` gives the next slot as a writable [H, W, C] uint8 view, ``commit()`` publishes it.
    ``write(frame)`` does both with the conversions a client needs (float 0..1 in, other row order in).
    Neither allocates per frame once the first float frame has set up its scratch buffer.
    """

    def __init__(self, shm, layout, owner) -> None:
        super().__init__(shm, layout, owner)
        self._k = -1
        self._next = self.published
        self._begun_ns = 0
        self._scratch: np.ndarray | None = None  # [H, W, C_src] float32, made on the first float frame

    @classmethod
    def create(cls, name: str | None, layout: RingLayout) -> "RingWriter":
        """Create and initialise a segment. ``name=None`` lets the OS pick one (read it back from ``.name``)."""
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=layout.total_bytes)
        except FileExistsError:
            raise RingError(f"shared memory {name!r} already exists (another bridge running, or one that "
                            f"crashed on Linux/macOS left it in /dev/shm); choose another name") from None
        buf = shm.buf
        buf[:layout.header_bytes] = bytes(layout.header_bytes)
        flags = FLAG_CHECKSUM if layout.checksum else 0
        _HEADER.pack_into(buf, 0, MAGIC, VERSION, layout.header_bytes, layout.width, layout.height,
                          layout.channels, layout.pixel_format.code, layout.row_order.value, layout.slot_count,
                          flags, os.getpid() & 0xFFFFFFFF, layout.slot_stride, 0)
        _SESSION.pack_into(buf, _OFF_SESSION, _new_session(), 0)  # every segment made has its own id
        _CREATED.add(shm.name)
        log.debug("created ring %s: %s, %d bytes", shm.name, layout.describe(), layout.total_bytes)
        return cls(shm, layout, owner=True)

    @classmethod
    def attach(cls, name: str, expect: RingLayout | None = None) -> "RingWriter":
        """Write into a ring made by another process (the bridge's input ring).

        There is one writer per ring, so a slot left odd is one a previous writer died inside (between
        ``begin()`` and ``commit()``): it is made even again, else its seqlock would read inverted forever.
        The CLOSED flag is left as it is: it belongs to the ring's creator (see ``clear_closed``).
        """
        shm, layout = _attach_checked(name, expect)
        w = cls(shm, layout, owner=False)
        for k in range(layout.slot_count):
            if int(w._seq[k]) & 1:
                log.debug("ring %s: slot %d was left mid-write by a previous writer; repaired", name, k)
                w._seq[k] += 1
        return w

    def begin(self) -> np.ndarray:
        """Enter the next slot (its seq goes odd) and return its [H, W, C] uint8 pixels to fill in place."""
        n = self._next
        k = n % self.layout.slot_count
        self._seq[k] += 1
        self._k = k
        self._begun_ns = time.monotonic_ns()
        return self._slots[k]

    def commit(self, source_index: int | None = None) -> int:
        """Publish the slot filled since ``begin()``; returns its frame index."""
        k, n = self._k, self._next
        assert k >= 0, "commit() without begin()"
        crc = zlib.crc32(self._slots[k].data) if self._flags[0] & FLAG_CHECKSUM else 0  # the flag as it is now
        _META.pack_into(self._buf, HEADER_FIXED + k * SLOT_ENTRY + 8, n, self._begun_ns,
                        n if source_index is None else source_index, crc)
        self._seq[k] += 1
        self._published[0] = n + 1
        self._next = n + 1
        self._k = -1
        return n

    def write(self, frame: np.ndarray, rows: RowOrder = RowOrder.TOP_DOWN,
              source_index: int | None = None) -> int:
        """Publish ``frame``: [H, W, 3|4] uint8 (0..255) or float32 (0..1, TouchDesigner's numpyArray()).

        Channels are taken as RGB(A) and reordered to the ring's format; alpha is 255 when the frame has
        none. ``rows`` is the frame's row order; it is flipped when the ring's differs.
        """
        self.check_frame(frame)  # after this nothing below can fail, so the slot is always left even
        self.check_size()  # a truncated segment would raise SIGBUS, not an exception
        dst = self.begin()
        src = frame if rows is self.layout.row_order else frame[::-1]
        if src.dtype != np.uint8:
            if self._scratch is None or self._scratch.shape != src.shape:
                self._scratch = np.empty(src.shape, np.float32)
            np.multiply(src, 255.0, out=self._scratch)
            np.add(self._scratch, 0.5, out=self._scratch)
            np.clip(self._scratch, 0.0, 255.0, out=self._scratch)
            src = self._scratch
        r, g, b = self.layout.pixel_format.rgb_channels
        np.copyto(dst[..., r], src[..., 0], casting="unsafe")
        np.copyto(dst[..., g], src[..., 1], casting="unsafe")
        np.copyto(dst[..., b], src[..., 2], casting="unsafe")
        if self.layout.channels == 4:
            if src.shape[2] == 4:
                np.copyto(dst[..., 3], src[..., 3], casting="unsafe")
            else:
                dst[..., 3] = 255
        return self.commit(source_index)

    def check_frame(self, frame: np.ndarray) -> None:
        h, w = self.layout.height, self.layout.width
        if (not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[:2] != (h, w)
                or frame.shape[2] not in (3, 4) or frame.dtype not in (np.uint8, np.float32)):
            got = (f"{type(frame).__name__} {getattr(frame, 'shape', '')} {getattr(frame, 'dtype', '')}").strip()
            raise RingError(f"ring {self.name!r} takes [{h}, {w}, 3|4] uint8 or float32 frames; got {got}")


class RingReader(_Ring):
    """A reader of a ring made by another process (or by this one: ``RingReader(writer_ring_name)``)."""

    def __init__(self, shm, layout, owner) -> None:
        super().__init__(shm, layout, owner)
        self.last_index = -1
        self.retries = 0  # reads that had to start over because the writer was inside the slot
        self.checksum_failures = 0
        self._entry = bytearray(_ENTRY.size)

    @classmethod
    def attach(cls, name: str, expect: RingLayout | None = None) -> "RingReader":
        shm, layout = _attach_checked(name, expect)
        return cls(shm, layout, owner=False)

    @classmethod
    def create(cls, name: str | None, layout: RingLayout) -> "RingReader":
        """Create a segment that another process writes (the bridge's input ring)."""
        w = RingWriter.create(name, layout)
        shm, w._shm = w._shm, None  # hand the mapping over; the writer object is dropped
        return cls(shm, layout, owner=True)

    def new_frame(self) -> bool:
        """True when a frame newer than the last one read has been published (no copy)."""
        return self.published - 1 > self.last_index

    def read(self, out: np.ndarray) -> FrameInfo | None:
        """Copy the newest frame into ``out`` ([H, W, C] uint8 in the ring's layout) if it is newer than the
        last one read. Returns its FrameInfo, or None when there is nothing new. Never returns a torn frame.

        Raises RingTruncated when the segment shrank (checked first: touching it would raise SIGBUS), and
        RingError when every one of ``_RETRIES`` attempts failed, naming what was seen on them: the writer
        rewrote the slot during each copy (it laps this reader: more slots help), the slot stayed mid-write
        (its writer died or hangs inside a frame), the slot was never written or holds an older frame than
        ``published`` says (a corrupt ``published`` counter), or the crc32 did not match a stable slot."""
        self.check_size()
        slots = self.layout.slot_count
        seen = dict.fromkeys(_FAILURES, 0)
        p = k = s1 = index = 0
        stuck = None  # (published, seq) of the first odd slot seen; the same every time: a stuck writer
        for _ in range(_RETRIES):
            p = int(self._published[0])
            if p - 1 <= self.last_index:
                return None
            k = (p - 1) % slots
            s1 = int(self._seq[k])
            if s1 == 0 or s1 & 1:
                if s1 == 0:
                    seen["unwritten"] += 1
                elif stuck is None or stuck == (p, s1):
                    stuck = (p, s1)
                    seen["mid-write"] += 1
                else:  # the writer moved on meanwhile: it is alive and lapping us, not stuck
                    seen["lapped"] += seen["mid-write"] + 1
                    seen["mid-write"] = 0
                    stuck = (-1, -1)
                self.retries += 1
                time.sleep(0)
                continue
            np.copyto(out, self._slots[k])
            self._entry[:] = self._buf[HEADER_FIXED + k * SLOT_ENTRY:HEADER_FIXED + k * SLOT_ENTRY + _ENTRY.size]
            s2 = int(self._seq[k])
            if s1 != s2:
                seen["lapped"] += 1
                self.retries += 1
                continue
            _, index, ts, source, crc = _ENTRY.unpack_from(self._entry, 0)
            if self._flags[0] & FLAG_CHECKSUM and zlib.crc32(out.data) != crc:  # the flag as it is now
                seen["crc"] += 1
                self.checksum_failures += 1
                self.retries += 1
                continue
            if index <= self.last_index:  # a slot still holding an older frame: the writer is re-entering
                seen["older"] += 1
                self.retries += 1
                continue
            self.last_index = index
            return FrameInfo(index, ts, source)
        raise RingError(self._failure(seen, p, k, s1, index))

    def _failure(self, seen: dict[str, int], p: int, k: int, seq: int, index: int) -> str:
        """The message for a read whose every attempt failed: the cause seen most, in words."""
        cause = max(_FAILURES, key=lambda c: seen[c])
        tally = ", ".join(f"{seen[c]} {c}" for c in _FAILURES if seen[c])
        head = f"ring {self.name!r}: {_RETRIES} reads of the newest slot failed ({tally}): "
        if cause == "lapped":
            return head + ("the writer rewrote the slot during every copy (it laps this reader); give the ring "
                           "more slots (--slots) or read more often")
        if cause == "mid-write":
            return head + (f"slot {k} stayed mid-write (seq {seq}, odd): its writer died or hangs inside a "
                           f"frame; a writer attaching again repairs the slot")
        if cause == "unwritten":
            return head + (f"the published counter says {p} frames, but slot {k} was never written: the "
                           f"published counter is corrupt; the next frame written sets it right")
        if cause == "older":
            return head + (f"the published counter says frame {p - 1} is in slot {k}, but the slot holds frame "
                           f"{index} (this reader already has frame {self.last_index}): the published counter "
                           f"is corrupt or a second writer reset it; the next frame written sets it right")
        return head + (f"slot {k} is stable but its crc32 does not match its pixels: its writer does not write "
                       f"checksums, or something outside the ring protocol overwrote the pixels")

    def wait(self, out: np.ndarray, timeout: float) -> FrameInfo | None:
        """``read`` with polling until a new frame arrives or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.read(out)
            if info is not None or time.monotonic() >= deadline:
                return info
            time.sleep(0.0005)

    def empty_frame(self) -> np.ndarray:
        """A [H, W, C] uint8 array shaped for ``read``; allocate it once, outside the frame loop."""
        return np.zeros(self.layout.shape, np.uint8)


def to_rgb(frame: np.ndarray, layout: RingLayout, out: np.ndarray) -> np.ndarray:
    """Ring-layout pixels -> top-down RGB in ``out`` ([H, W, 3] uint8), without allocating."""
    src = frame if layout.row_order is RowOrder.TOP_DOWN else frame[::-1]
    r, g, b = layout.pixel_format.rgb_channels
    np.copyto(out[..., 0], src[..., r])
    np.copyto(out[..., 1], src[..., g])
    np.copyto(out[..., 2], src[..., b])
    return out
