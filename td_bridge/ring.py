"""Shared-memory frame rings: one writer, any number of readers, no torn frames.

A ring is one ``multiprocessing.shared_memory`` segment (Windows, macOS, Linux) holding a fixed header, a
slot table and ``slot_count`` pixel slots. The bridge creates two: the input ring (TouchDesigner or any client
writes, the bridge reads) and the output ring (the bridge writes, clients read). The segment's layout (the
header's fields, the slot table) is drawn in ring_layout.py; opening segments by name is segment.py.

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

import logging
import os
import secrets
import time
import zlib
from multiprocessing import shared_memory

import numpy as np

from .ring_layout import (FLAG_CHECKSUM, FLAG_CLOSED, HEADER_FIXED, MAGIC, MAX_SIDE, MAX_SLOTS, SLOT_ENTRY,
                          VERSION, FrameInfo, PixelFormat, RingError, RingLayout, RingTruncated, RowOrder,
                          _ENTRY, _HEADER, _META, _OFF_FLAGS, _OFF_PID, _OFF_PUBLISHED, _OFF_SESSION, _SESSION,
                          describe_flags, parse_header)
from .segment import _CREATED, _attach, _open_untracked, _unlink_name, probe

log = logging.getLogger(__name__)

_RETRIES = 16
_FAILURES = ("lapped", "mid-write", "unwritten", "older", "crc")  # why an attempt of RingReader.read failed

__all__ = ["FLAG_CHECKSUM", "FLAG_CLOSED", "HEADER_FIXED", "MAGIC", "MAX_SIDE", "MAX_SLOTS", "SLOT_ENTRY",
           "VERSION", "FrameInfo", "PixelFormat", "RingError", "RingLayout", "RingReader", "RingTruncated",
           "RingWriter", "RowOrder", "describe_flags", "parse_header", "probe", "to_rgb", "_open_untracked"]


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
