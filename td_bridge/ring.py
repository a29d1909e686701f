"""Shared-memory frame rings: one writer, any number of readers, no torn frames.

A ring is one ``multiprocessing.shared_memory`` segment (Windows, macOS, Linux) holding a fixed header, a
slot table and ``slot_count`` pixel slots. The bridge creates two: the input ring (TouchDesigner or any client
writes, the bridge reads) and the output ring (the bridge writes, clients read). The segment's layout (the
header's fields, the slot table) is drawn in ring_layout.py; opening segments by name is segment.py; how
bytes are read and written (and who can truncate what) is segment_io.py; what writer and reader share (header
words, size checks, the serving bridge's upkeep) is ring_base.py.

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
      against what it made; flags and geometry      before every frame: the segment's size; a segment
      rewritten, a truncated segment recreated        truncated even during a copy -> RingTruncated, let go
    at exit: CLOSED set, unlinked (if it made it)   CLOSED seen -> let go, wait for the next bridge

Every byte goes through segment_io: on Linux, where any process that can open a ring's name may shrink it
at any moment, with pread / preadv / pwrite on the descriptor (a truncation, even in the middle of a frame, is
a short read: RingTruncated, never SIGBUS); on macOS and Windows, where a segment cannot shrink, through the
mapping. ``read`` copies a frame with one preadv straight into the caller's buffer; ``write`` / ``commit``
/ ``publish`` write it with one pwrite.

Everyone follows the CHECKSUM flag as it is now (the server keeps it right), so a writer that attached while
the flag was wrong recovers as soon as the server repairs it.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from multiprocessing import shared_memory

import numpy as np

from .ring_base import _Ring, _attach_checked, _new_session, _seq_off
from .ring_layout import (FLAG_CHECKSUM, FLAG_CLOSED, HEADER_FIXED, MAGIC, MAX_SIDE, MAX_SLOTS, SLOT_ENTRY,
                          VERSION, FrameInfo, PixelFormat, RingError, RingLayout, RingTruncated, RowOrder,
                          _HEADER, _META, _OFF_FLAGS, _OFF_PUBLISHED, _OFF_SESSION, _SESSION, describe_flags,
                          parse_header)
from .segment import _CREATED, _open_untracked, probe
from .segment_io import segment_io

log = logging.getLogger(__name__)

_RETRIES = 16
_FAILURES = ("lapped", "mid-write", "unwritten", "older", "crc")  # why an attempt of RingReader.read failed

__all__ = ["FLAG_CHECKSUM", "FLAG_CLOSED", "HEADER_FIXED", "MAGIC", "MAX_SIDE", "MAX_SLOTS", "SLOT_ENTRY",
           "VERSION", "FrameInfo", "PixelFormat", "RingError", "RingLayout", "RingReader", "RingTruncated",
           "RingWriter", "RowOrder", "describe_flags", "parse_header", "probe", "to_rgb", "_open_untracked"]


class RingWriter(_Ring):
    """The one writer of a ring. ``create`` makes a new segment; ``attach`` writes into one made elsewhere.

    Hot path: ``begin()`` gives a writable [H, W, C] uint8 buffer for the next slot, ``commit()`` publishes
    it (where the segment can shrink, Linux, the buffer is this writer's own and ``commit`` writes it with one
    pwrite; elsewhere it is the slot itself). ``publish(frame)`` does both for a frame already in the ring's
    layout, with one copy. ``write(frame)`` adds the conversions a client needs (float 0..1 in, other row
    order in). None of them allocates per frame once the first frame has set up the buffers.

    The writer keeps each slot's ``seq`` itself (it is the only writer), so writing reads nothing from the
    segment but the flags word (as 0 if it is gone) and cannot fail on a segment truncated under it: on Linux
    the pwrite grows it back (see segment_io), and the next size check reports it.
    """

    def __init__(self, shm, layout, owner, io=None) -> None:
        super().__init__(shm, layout, owner, io)
        self._k = -1
        self._next = self.published
        self._begun_ns = 0
        self._seqs = [self._word(_seq_off(k)) for k in range(layout.slot_count)]  # [S] what we last stored
        self._stage: np.ndarray | None = None  # [H, W, C] uint8 where begin() hands out pixels (FdIO only)
        self._meta = bytearray(_META.size)  # frame_index, timestamp_ns, source_index, crc32 of one slot
        self._scratch: np.ndarray | None = None  # [H, W, C_src] float32, made on the first float frame

    @classmethod
    def create(cls, name: str | None, layout: RingLayout) -> "RingWriter":
        """Create and initialise a segment. ``name=None`` lets the OS pick one (read it back from ``.name``)."""
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=layout.total_bytes)
        except FileExistsError:
            raise RingError(f"shared memory {name!r} already exists (another bridge running, or one that "
                            f"crashed on Linux/macOS left it in /dev/shm); choose another name") from None
        head = bytearray(layout.header_bytes)
        flags = FLAG_CHECKSUM if layout.checksum else 0
        _HEADER.pack_into(head, 0, MAGIC, VERSION, layout.header_bytes, layout.width, layout.height,
                          layout.channels, layout.pixel_format.code, layout.row_order.value, layout.slot_count,
                          flags, os.getpid() & 0xFFFFFFFF, layout.slot_stride, 0)
        _SESSION.pack_into(head, _OFF_SESSION, _new_session(), 0)  # every segment made has its own id
        io = segment_io(shm, shm.name)
        io.write_from(0, head)
        _CREATED.add(shm.name)
        log.debug("created ring %s: %s, %d bytes", shm.name, layout.describe(), layout.total_bytes)
        return cls(shm, layout, owner=True, io=io)

    @classmethod
    def attach(cls, name: str, expect: RingLayout | None = None) -> "RingWriter":
        """Write into a ring made by another process (the bridge's input ring).

        There is one writer per ring, so a slot left odd is one a previous writer died inside (between
        ``begin()`` and ``commit()``): it is made even again, else its seqlock would read inverted forever.
        The CLOSED flag is left as it is: it belongs to the ring's creator (see ``clear_closed``).
        """
        shm, io, layout = _attach_checked(name, expect)
        try:
            for k in range(layout.slot_count):
                s = io.u64(_seq_off(k))
                if s & 1:
                    log.debug("ring %s: slot %d was left mid-write by a previous writer; repaired", name, k)
                    io.set_u64(_seq_off(k), s + 1)
            return cls(shm, layout, owner=False, io=io)
        except RingError:  # truncated while attaching
            shm.close()
            raise

    def begin(self) -> np.ndarray:
        """Enter the next slot (its seq goes odd) and return [H, W, C] uint8 pixels to fill in place."""
        k = self._next % self.layout.slot_count
        self._seqs[k] += 1
        self._io.set_u64(_seq_off(k), self._seqs[k])
        self._k = k
        self._begun_ns = time.monotonic_ns()
        if self._io.mapped:
            return self._slots[k]
        if self._stage is None:
            self._stage = np.zeros(self.layout.shape, np.uint8)
        return self._stage

    def commit(self, source_index: int | None = None) -> int:
        """Publish the slot filled since ``begin()``; returns its frame index."""
        return self._commit(None if self._io.mapped else self._stage, source_index)

    def publish(self, frame: np.ndarray, source_index: int | None = None) -> int:
        """Publish ``frame``, already in the ring's layout ([H, W, C] uint8, C-contiguous), with one copy
        (Linux: one pwrite from ``frame`` itself, say a pinned readback buffer). Returns its frame index."""
        if frame.shape != self.layout.shape or frame.dtype != np.uint8 or not frame.flags.c_contiguous:
            raise RingError(f"ring {self.name!r}: publish() takes C-contiguous {list(self.layout.shape)} uint8 "
                            f"frames in the ring's layout; got {frame.dtype} {list(frame.shape)}")
        dst = self.begin()
        if self._io.mapped:
            np.copyto(dst, frame)
            return self._commit(None, source_index)
        return self._commit(frame, source_index)

    def _commit(self, pixels: np.ndarray | None, source_index: int | None) -> int:
        """pixels: [H, W, C] uint8 to write into the slot, or None when they are in it already (MapIO)."""
        k, n = self._k, self._next
        assert k >= 0, "commit() without begin()"
        io, off = self._io, _seq_off(k)
        src = self._slots[k] if pixels is None else pixels
        crc = zlib.crc32(src) if self._word(_OFF_FLAGS, 4) & FLAG_CHECKSUM else 0  # the flag as it is now
        if pixels is not None:
            io.write_from(self.layout.header_bytes + k * self.layout.slot_stride, pixels)
        _META.pack_into(self._meta, 0, n, self._begun_ns, n if source_index is None else source_index, crc)
        io.write_from(off + 8, self._meta)
        self._seqs[k] += 1
        io.set_u64(off, self._seqs[k])
        io.set_u64(_OFF_PUBLISHED, n + 1)
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
        self.check_size()  # a first check; begin() and commit() never read the segment, so never fail
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

    def __init__(self, shm, layout, owner, io=None) -> None:
        super().__init__(shm, layout, owner, io)
        self.last_index = -1
        self.retries = 0  # reads that had to start over because the writer was inside the slot
        self.checksum_failures = 0
        self._meta = bytearray(_META.size)  # frame_index, timestamp_ns, source_index, crc32 of the slot read
        self._stage: np.ndarray | None = None  # [H, W, C] uint8, only for an ``out`` that is not C-contiguous

    @classmethod
    def attach(cls, name: str, expect: RingLayout | None = None) -> "RingReader":
        shm, io, layout = _attach_checked(name, expect)
        return cls(shm, layout, owner=False, io=io)

    @classmethod
    def create(cls, name: str | None, layout: RingLayout) -> "RingReader":
        """Create a segment that another process writes (the bridge's input ring)."""
        w = RingWriter.create(name, layout)
        shm, io, w._shm = w._shm, w._io, None  # hand the segment over; the writer object is dropped
        return cls(shm, layout, owner=True, io=io)

    def new_frame(self) -> bool:
        """True when a frame newer than the last one read has been published (no copy)."""
        return self.published - 1 > self.last_index

    def _dst(self, out: np.ndarray) -> np.ndarray:
        """Where a read lands: ``out`` itself when it is C-contiguous (one preadv straight into it), else a
        staging buffer copied into ``out`` once the frame is known to be whole."""
        if out.shape != self.layout.shape or out.dtype != np.uint8:
            raise RingError(f"ring {self.name!r}: read() takes a {list(self.layout.shape)} uint8 array "
                            f"(empty_frame()); got {out.dtype} {list(out.shape)}")
        if out.flags.c_contiguous and out.flags.writeable:
            return out
        if self._stage is None:
            self._stage = np.zeros(self.layout.shape, np.uint8)
        return self._stage

    def read(self, out: np.ndarray) -> FrameInfo | None:
        """Copy the newest frame into ``out`` ([H, W, C] uint8 in the ring's layout) if it is newer than the
        last one read. Returns its FrameInfo, or None when there is nothing new. Never returns a torn frame.

        Raises RingTruncated when the segment shrank, whether before the read (its size is checked first) or
        during it (Linux: a short pread; see segment_io), and RingError when every one of ``_RETRIES``
        attempts failed, naming what was seen on them: the writer rewrote the slot during each copy (it laps
        this reader: more slots help), the slot stayed mid-write (its writer died or hangs inside a frame), the
        slot was never written or holds an older frame than ``published`` says (a corrupt ``published``
        counter), or the crc32 did not match a stable slot."""
        self.check_size()
        dst = self._dst(out)
        io, lay = self._io, self.layout
        slots = lay.slot_count
        seen = dict.fromkeys(_FAILURES, 0)
        p = k = s1 = index = 0
        stuck = None  # (published, seq) of the first odd slot seen; the same every time: a stuck writer
        for _ in range(_RETRIES):
            p = io.u64(_OFF_PUBLISHED)
            if p - 1 <= self.last_index:
                return None
            k = (p - 1) % slots
            s1 = io.u64(_seq_off(k))
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
            io.read_into(lay.header_bytes + k * lay.slot_stride, dst)  # [H, W, C] one preadv (Linux)
            io.read_into(_seq_off(k) + 8, self._meta)
            s2 = io.u64(_seq_off(k))
            if s1 != s2:
                seen["lapped"] += 1
                self.retries += 1
                continue
            index, ts, source, crc = _META.unpack_from(self._meta, 0)
            if io.u32(_OFF_FLAGS) & FLAG_CHECKSUM and zlib.crc32(dst) != crc:  # the flag as it is now
                seen["crc"] += 1
                self.checksum_failures += 1
                self.retries += 1
                continue
            if index <= self.last_index:  # a slot still holding an older frame: the writer is re-entering
                seen["older"] += 1
                self.retries += 1
                continue
            if dst is not out:
                np.copyto(out, dst)
            self.last_index = index
            return FrameInfo(index, ts, source)
        self.check_size()  # shrunk while we tried (zeros where it was cut): say that, not what it did to them
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
