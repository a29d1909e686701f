"""How this process touches a ring segment's bytes: through its file descriptor (Linux) or its mapping.

Stdlib + numpy only (TouchDesigner's Python runs it too). ring.py and segment.py go through one of these two
objects for every byte they read or write; which one is picked once per platform (``FD_IO``).

Who can shrink a segment under us, and how this process touches it there::

    platform  segment                 can it shrink once made?                      access here
    --------  ----------------------  --------------------------------------------  -------------------------
    Linux     a file in /dev/shm      yes: every process that can open the name     FdIO: pread / preadv /
              (tmpfs)                 (the same user; or anyone, if its mode        pwrite on the descriptor
                                      allows) may ftruncate it at any moment,
                                      both rings alike: the input ring TouchDesigner
                                      writes, the output ring clients read
    macOS     a shm_open object       no: one ftruncate per object's life (xnu      MapIO: the mapping (its
                                      pshm_truncate refuses a second)               descriptor cannot be read
                                                                                    or written: fo_no_read)
    Windows   a named section         no: a section's size is fixed                 MapIO: the mapping

Why: a load or store through a mapping whose page now lies past the end of the file raises SIGBUS, which
kills the process (Python cannot return from it), and no size check before the access closes the window: the
truncation can land between the check and the copy. A pread past the end returns fewer bytes instead;
FdIO turns that into RingTruncated, which every caller already reports and recovers from. So on Linux no
code path of the rings touches the mapping (it stays mapped for tests and debugging only); on macOS and
Windows nothing can shrink it, and the mapping is the fast path.

What FdIO cannot prevent: a pwrite past the end of a shrunk file grows it again (writes past the end do);
nothing faults, the bytes cut off read as zeros, and the next size check (made before every frame and by the
bridge every loop) reports a segment that is still short. Only a truncation that lands in the microseconds
before the pwrite of the ring's last slot can be grown back to full size unseen.

Atomicity: header words are aligned 8- (or 4-) byte preads and pwrites, which Linux copies with one aligned
move on x86-64 and arm64 (not promised by POSIX). The seqlock needs no more: ``seq`` only grows by 1 per
store, so a load that mixed the bytes of two neighbouring values would match the reader's second load only
after ~128 laps of the writer during one frame copy, and with CHECKSUM the crc32 catches even that.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from .ring_layout import HEADER_FIXED, MAX_SLOTS, SLOT_ENTRY, RingTruncated

FD_IO = sys.platform.startswith("linux")  # the one platform where a segment can shrink (see the table above)
_HEADER_MAX = HEADER_FIXED + SLOT_ENTRY * MAX_SLOTS  # the largest header: header words never lie past it


class FdIO:
    """A segment read and written with pread / preadv / pwrite on its descriptor: a truncated segment gives a
    short read (RingTruncated), never SIGBUS. Thread-safe (no shared scratch buffers)."""

    mapped = False  # ring.py: a writer fills its own [H, W, C] staging buffer, then one pwrite

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def _short(self, off: int, n: int, got: int) -> RingTruncated:
        return RingTruncated(f"shared memory {self.name!r} was truncated under this process (now {self.size()} "
                             f"bytes): reading {n} bytes at offset {off} came back with {got}; nothing was "
                             f"returned from it")

    def read_into(self, off: int, dst) -> None:
        """Fill ``dst`` (a writable C-contiguous buffer: a numpy array, a bytearray) from ``off``; one preadv
        unless the kernel splits it. Raises RingTruncated when the segment ends first."""
        n = memoryview(dst).nbytes
        got = os.preadv(self.fd, [dst], off)
        while got < n:  # a regular file reads short only at its end; retry once to tell that apart
            view = memoryview(dst).cast("B")[got:]
            more = os.preadv(self.fd, [view], off + got)
            if more == 0:
                raise self._short(off, n, got)
            got += more

    def write_from(self, off: int, src) -> None:
        """Write ``src`` (a C-contiguous buffer) at ``off``. Never faults; past the end it grows the file."""
        done = os.pwrite(self.fd, src, off)
        n = memoryview(src).nbytes
        while done < n:
            done += os.pwrite(self.fd, memoryview(src).cast("B")[done:], off + done)

    def read_bytes(self, off: int, n: int) -> bytes:
        b = os.pread(self.fd, n, off)
        if len(b) != n:
            raise self._short(off, n, len(b))
        return b

    def u64(self, off: int) -> int:
        return int.from_bytes(self.read_bytes(off, 8), "little")

    def u32(self, off: int) -> int:
        return int.from_bytes(self.read_bytes(off, 4), "little")

    def set_u64(self, off: int, value: int) -> None:
        os.pwrite(self.fd, (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"), off)

    def set_u32(self, off: int, value: int) -> None:
        os.pwrite(self.fd, (value & 0xFFFFFFFF).to_bytes(4, "little"), off)


class MapIO:
    """A segment read and written through its mapping (macOS, Windows: it cannot shrink there). Header words
    are aligned numpy loads and stores (one instruction each); frames are one memcpy."""

    mapped = True  # ring.py: a writer fills the slot in place

    def __init__(self, buf: memoryview, fd: int, name: str) -> None:
        self.fd, self.name = fd, name
        self._buf = buf
        words = min(len(buf), _HEADER_MAX) // 8
        self._w64 = np.ndarray((words,), dtype="<u8", buffer=buf)  # [words] the header as u64
        self._w32 = np.ndarray((2 * words,), dtype="<u4", buffer=buf)  # [2 * words] the header as u32

    def size(self) -> int:
        return os.fstat(self.fd).st_size if self.fd >= 0 else len(self._buf)

    def read_into(self, off: int, dst) -> None:
        view = memoryview(dst).cast("B")
        view[:] = self._buf[off:off + view.nbytes]

    def write_from(self, off: int, src) -> None:
        view = memoryview(src).cast("B")
        self._buf[off:off + view.nbytes] = view

    def read_bytes(self, off: int, n: int) -> bytes:
        return bytes(self._buf[off:off + n])

    def u64(self, off: int) -> int:
        return int(self._w64[off >> 3])

    def u32(self, off: int) -> int:
        return int(self._w32[off >> 2])

    def set_u64(self, off: int, value: int) -> None:
        self._w64[off >> 3] = value & 0xFFFFFFFFFFFFFFFF

    def set_u32(self, off: int, value: int) -> None:
        self._w32[off >> 2] = value & 0xFFFFFFFF


def segment_io(shm, name: str) -> "FdIO | MapIO":
    """The way to touch ``shm`` (a SharedMemory) on this platform; see the module docstring."""
    fd = getattr(shm, "_fd", -1)  # POSIX: the segment's descriptor; Windows: -1
    if FD_IO and fd >= 0:
        return FdIO(fd, name)
    return MapIO(shm.buf, fd, name)
