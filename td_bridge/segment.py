"""Opening shared-memory segments by name for the rings: untracked, with every failure a RingError.

Stdlib + numpy. ``probe`` reads who serves the ring under a name without keeping it open. Headers are read
through segment_io (on Linux with pread, so a segment truncated meanwhile is an error, never SIGBUS).
"""

from __future__ import annotations

import os
import sys
import threading
from multiprocessing import shared_memory

from .ring_layout import _OFF_HEARTBEAT, _OFF_SESSION, HEADER_FIXED, RingError, RingLayout, parse_header
from .segment_io import segment_io


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


def read_layout(io, name: str) -> tuple[RingLayout, int]:
    """Parse the header of the segment behind ``io`` (segment_io); (layout, flags) or RingError."""
    size = io.size()
    return parse_header(io.read_bytes(0, HEADER_FIXED) if size >= HEADER_FIXED else b"", size, name)


def probe(name: str) -> tuple[int, int]:
    """(session, heartbeat) of the ring now under ``name``; RingError if there is none or it is not a ring.

    Clients call it about once a second to find out whether the name still means the segment they hold."""
    shm = _attach(name)
    try:
        io = segment_io(shm, name)
        read_layout(io, name)
        return io.u64(_OFF_SESSION), io.u64(_OFF_HEARTBEAT)
    finally:
        shm.close()
