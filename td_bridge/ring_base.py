"""The half of a ring that writers and readers share: one segment, its header words, its size check, and
(for the bridge that serves it) the header's upkeep and closing. The protocol is in ring.py, the layout in
ring_layout.py, how bytes are touched in segment_io.py.
"""

from __future__ import annotations

import logging
import os
import secrets
from multiprocessing import shared_memory

import numpy as np

from .ring_layout import (FLAG_CHECKSUM, FLAG_CLOSED, HEADER_FIXED, SLOT_ENTRY, RingError, RingLayout, RingTruncated,
                          _OFF_FLAGS, _OFF_HEARTBEAT, _OFF_PID, _OFF_PUBLISHED, _OFF_SESSION, describe_flags,
                          parse_header)
from .segment import _CREATED, _attach, _unlink_name, read_layout
from .segment_io import segment_io

log = logging.getLogger(__name__)


def _attach_checked(name: str, expect: "RingLayout | None"):
    """Attach to ring ``name`` and read its header; with ``expect``, its size and format must match.
    Returns (shm, io, layout)."""
    shm = _attach(name)
    try:
        io = segment_io(shm, name)
        layout, _ = read_layout(io, name)
        if expect is not None and (layout.width, layout.height, layout.pixel_format) != (
                expect.width, expect.height, expect.pixel_format):
            raise RingError(f"ring {name!r} is {layout.describe()}; expected {expect.describe()}")
    except RingError:
        shm.close()
        raise
    return shm, io, layout


def _seq_off(k: int) -> int:
    return HEADER_FIXED + k * SLOT_ENTRY  # slot k's table entry; its seq is the first u64


class _Ring:
    """One segment, touched only through ``self._io`` (segment_io: pread / pwrite on Linux, the mapping on
    macOS and Windows). Subclasses add the writer's or the reader's half of the protocol.

    ``owner``: this process created the segment and unlinks it at close. ``serving`` (see ``serve``): this
    process is the bridge behind the ring; it keeps the header right and marks the ring CLOSED at close."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: RingLayout, owner: bool, io=None) -> None:
        self._shm = shm
        self.layout = layout
        self.name = shm.name
        self._owner = owner
        self.serving = False
        self._io = io if io is not None else segment_io(shm, shm.name)
        self._fd = getattr(shm, "_fd", -1)  # POSIX: the segment's descriptor; Windows: -1
        # Views over the mapping. The ring's own code uses them only where io is MapIO (``_slots`` of a writer,
        # filled in place); elsewhere they are for tests and debugging, which scribble on a ring through them.
        buf = shm.buf
        self._seq = np.ndarray((layout.slot_count,), dtype="<u8", buffer=buf, offset=HEADER_FIXED,
                               strides=(SLOT_ENTRY,))  # [S] u64, one per slot entry
        self._published = np.ndarray((1,), dtype="<u8", buffer=buf, offset=_OFF_PUBLISHED)
        self._flags = np.ndarray((1,), dtype="<u4", buffer=buf, offset=_OFF_FLAGS)
        self._session = np.ndarray((2,), dtype="<u8", buffer=buf, offset=_OFF_SESSION)  # [session, heartbeat]
        self._slots = [np.ndarray(layout.shape, dtype=np.uint8, buffer=buf,
                                  offset=layout.header_bytes + k * layout.slot_stride)
                       for k in range(layout.slot_count)]  # [S] x [H, W, C] uint8
        # the geometry fields (magic .. slot_count, and slot_stride) as this process opened them
        g = self._io.read_bytes(0, 40)
        self._geometry = (g[:24], g[32:40])
        self._want_flags = FLAG_CHECKSUM if layout.checksum else 0  # what a serving bridge keeps in `flags`

    def _word(self, off: int, size: int = 8) -> int:
        """A header word, or 0 if the segment no longer reaches it (what a mapping's last page reads as)."""
        try:
            return self._io.u64(off) if size == 8 else self._io.u32(off)
        except RingTruncated:
            return 0

    @property
    def published(self) -> int:
        return self._word(_OFF_PUBLISHED)

    @property
    def closed(self) -> bool:
        return bool(self._word(_OFF_FLAGS, 4) & FLAG_CLOSED)

    @property
    def session(self) -> int:
        return self._word(_OFF_SESSION)

    @property
    def heartbeat(self) -> int:
        return self._word(_OFF_HEARTBEAT)

    @property
    def owner_pid(self) -> int:
        return self._word(_OFF_PID, 4)

    def serve(self, checksum: bool | None = None) -> int:
        """Become the bridge behind this ring: a new session id, our pid, the flags as we want them (CLOSED
        cleared; CHECKSUM as ``checksum``, default as the ring has it). Returns the session id."""
        if checksum is not None:
            self._want_flags = FLAG_CHECKSUM if checksum else 0
        io = self._io
        io.set_u32(_OFF_PID, os.getpid())
        io.set_u32(_OFF_FLAGS, self._want_flags)
        io.set_u64(_OFF_SESSION, _new_session())
        # a served ring's heartbeat is never 0 (0: nobody beats it; never called stale)
        io.set_u64(_OFF_HEARTBEAT, self._word(_OFF_HEARTBEAT) + 1)
        self.serving = True
        return self.session

    def beat(self) -> None:
        """Server: one heartbeat (clients call the ring dead when it stops). Checks the size first."""
        self.check_size()
        self._io.set_u64(_OFF_HEARTBEAT, self._io.u64(_OFF_HEARTBEAT) + 1)

    def segment_size(self) -> int:
        """The segment's size now (POSIX: fstat; on Linux it can shrink under us). Windows sections cannot."""
        return self._io.size()

    def check_size(self) -> None:
        """Raise RingTruncated if the segment is smaller than the ring now (a first check; a truncation after
        it makes the read itself come back short on Linux, see segment_io)."""
        size = self.segment_size()
        if size < self.layout.total_bytes:
            raise RingTruncated(f"shared memory {self.name!r} was truncated to {size} bytes under this process "
                                f"(the {self.layout.describe()} ring needs {self.layout.total_bytes}); nothing "
                                f"is read from it again")

    def check_header(self) -> None:
        """Raise RingError naming what changed since this process opened the ring: the segment's size, its
        geometry, and (on the serving side) the flags. ``repair_header`` puts geometry and flags back."""
        self.check_size()
        head = self._io.read_bytes(0, HEADER_FIXED)
        if (head[:24], head[32:40]) != self._geometry:
            try:
                now = parse_header(head, self.segment_size(), self.name)[0].describe()
            except RingError as exc:  # names the broken field
                raise RingError(f"corrupt header: {exc}") from None
            raise RingError(f"ring {self.name!r} header changed while in use: now {now}, opened as "
                            f"{self.layout.describe()}")
        if self.serving:
            flags = int.from_bytes(head[_OFF_FLAGS:_OFF_FLAGS + 4], "little")
            if flags != self._want_flags:
                raise RingError(f"ring {self.name!r}: {describe_flags(flags, self._want_flags)}")

    def clear_closed(self) -> None:
        """Mark the ring open again (a bridge adopting a ring of the right geometry that it will serve)."""
        self._io.set_u32(_OFF_FLAGS, self._word(_OFF_FLAGS, 4) & ~FLAG_CLOSED)

    def repair_header(self) -> None:
        """Server only: write the geometry and the flags back after someone scribbled on them."""
        assert self._owner or self.serving, "only the ring's bridge may rewrite its header"
        self.check_size()
        self._io.write_from(0, self._geometry[0])
        self._io.write_from(32, self._geometry[1])
        self._io.set_u32(_OFF_FLAGS, self._want_flags)

    def close(self, unlink: bool | None = None) -> None:
        """Unmap; the server also marks the ring CLOSED, and (by default only its creator) unlinks it."""
        if self._shm is None:
            return
        unlink = self._owner if unlink is None else unlink
        if self._owner or self.serving:
            try:
                if self.segment_size() >= HEADER_FIXED:
                    self._io.set_u32(_OFF_FLAGS, self._io.u32(_OFF_FLAGS) | FLAG_CLOSED)
            except (ValueError, TypeError, OSError):  # RingTruncated is a ValueError  # pragma: no cover
                pass
        self._seq = self._published = self._flags = self._session = None  # type: ignore[assignment]
        self._slots = []
        self._io = None  # type: ignore[assignment]  (MapIO holds views of the mapping too)
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
