"""Artifacts of the engine cache already hashed, so a cached start does not hash them again (cache.Verify).

``<cache root>/.verified.json`` maps ``<entry folder>/<artifact>`` to the artifact's stat signature when its
sha256 last matched the manifest: [size, mtime_ns, ctime_ns, inode, sha256]. Any write to the file, or a
new file in its place, changes the size, a time or the inode, and the next lookup hashes it again. A file
is remembered only when it has been left alone for :data:`SETTLED_S` at the time it was hashed: a write in
the same clock tick as the hash (file times are coarse on some file systems) would otherwise keep equal
times. The table is small JSON written atomically; an unreadable one is ignored (the worst case is one
hash more), and between processes the last write wins (every entry in it is right).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE = ".verified.json"  # dot-named: internal to the cache root, like .locks (not an entry)
SETTLED_S = 2.0
_lock = threading.Lock()


class VerifiedStamps:
    """One lookup's view of the table: read at the first question, written once at the end if it grew."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / FILE
        self._table: dict[str, Any] | None = None
        self._fresh: dict[str, list] = {}

    def known(self, entry: Path, name: str, sha256: Any) -> bool:
        """True when artifact ``name`` of ``entry`` matched ``sha256`` before and is unchanged since."""
        seen = _signature(entry / name, sha256)
        if seen is None:
            return False
        if self._table is None:
            self._table = read_table(self.path)
        return self._table.get(f"{entry.name}/{name}") == seen

    def hashed(self, entry: Path, name: str, sha256: str) -> None:
        """Artifact ``name`` of ``entry`` was just hashed and matched: remember it if it has settled."""
        seen = _signature(entry / name, sha256)
        if seen is not None and time.time_ns() - max(seen[1], seen[2]) > SETTLED_S * 1e9:
            self._fresh[f"{entry.name}/{name}"] = seen

    def save(self) -> None:
        if not self._fresh:
            return
        with _lock:
            table = read_table(self.path)
            table.update(self._fresh)
            try:
                from .cache import write_atomic

                write_atomic(self.path, json.dumps(table, sort_keys=True).encode())
            except OSError as exc:
                log.debug("could not remember verified artifacts in %s: %s", self.path, exc)
        self._fresh = {}


def _signature(artifact: Path, sha256: Any) -> list | None:
    if not isinstance(sha256, str):
        return None
    try:
        st = artifact.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, sha256]


def read_table(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when it is missing, unreadable or not an object."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}
