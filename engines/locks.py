"""An exclusive advisory file lock between processes, with a bounded wait.

The holder writes its pid into the lock file. The OS releases the lock when the holder exits or dies, so a
crashed builder never blocks the next one; a *stopped* one (SIGSTOP, Ctrl-Z) would, which is why a waiter
watches the holder's state and gives up, naming its pid, once it has stayed stopped for a while.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger("engines.cache")  # the cache's logger: users filter one name for cache messages

LOCK_TIMEOUT_S = 4 * 3600.0  # the longest wait for another builder (a TensorRT build of a big UNet is < 1 h)
STOPPED_GRACE_S = 30.0  # how long a stopped (SIGSTOP / Ctrl-Z) lock holder is waited for


class LockTimeout(TimeoutError):
    """Waiting for another process's build lock was given up; the message names the holder's pid."""


def lock_holder(path: Path) -> int | None:
    """The pid written into the lock file by its holder (None if unreadable or empty)."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def process_stopped(pid: int) -> bool:
    """True when ``pid`` is stopped by a signal (state T) or by a tracer (t). Linux only (/proc); elsewhere
    False, and only the overall lock timeout bounds the wait."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (comm) S ...": comm may hold spaces or parentheses, the state follows the last ')'
    fields = stat[stat.rfind(")") + 1:].split()
    return bool(fields) and fields[0] in ("T", "t")


@contextlib.contextmanager
def file_lock(path: Path, what: str, poll_s: float = 0.2, timeout_s: float | None = None,
              stopped_grace_s: float | None = None) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed); released when the holder exits or dies.

    The holder writes its pid into the file. A waiter gives up with :class:`LockTimeout` (naming that pid)
    after ``timeout_s`` (default LOCK_TIMEOUT_S) or once the holder has been seen stopped for
    ``stopped_grace_s`` (default STOPPED_GRACE_S): a stopped builder would otherwise block every other one
    forever, since its lock is released only when it exits.
    """
    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    stopped_grace_s = STOPPED_GRACE_S if stopped_grace_s is None else stopped_grace_s
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        said = False
        stopped_since: float | None = None
        while not _try_lock(fd):
            holder = lock_holder(path)
            now = time.monotonic()
            if not said:
                log.info("waiting for another process (pid %s) building %s (lock %s)", holder or "unknown",
                         what, path)
                said = True
            stopped = holder is not None and process_stopped(holder)
            stopped_since = (stopped_since or now) if stopped else None
            if stopped_since is not None and now - stopped_since >= stopped_grace_s:
                raise LockTimeout(f"the lock {path} ({what}) is held by pid {holder}, which is stopped (SIGSTOP or "
                                  f"Ctrl-Z); gave up after {now - start:.0f} s. Resume it (kill -CONT {holder}) "
                                  "or end it, then try again")
            if now - start > timeout_s:
                raise LockTimeout(f"gave up after {timeout_s:.0f} s waiting for the lock {path} ({what}), held by "
                                  f"pid {holder or 'unknown'}")
            time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


if os.name == "posix":
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
else:  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
