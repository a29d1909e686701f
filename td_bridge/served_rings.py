"""The bridge's rings, served (input and output; a control ring and a style ring when ControlNets / an
IP-Adapter read images from TouchDesigner): opened (made, or adopted after a crash), kept right, recreated, closed.

Who calls what::

    frame loop (bridge.Bridge.run)             heartbeat thread (bridge.Bridge._beat)
    ---------------------------------------    ---------------------------------------
    open(width, height) once, after warm-up    beat() four times a second: heartbeat += 1 on both rings
    check() before every read / publish:         (skips a ring whose segment shrank; check() handles it)
      size, geometry, flags of both rings
      - shrunk (truncated): the mapping is
        dropped untouched, the name unlinked
        and a new ring made under it (new
        session); returns True: re-point
        the transfer
      - geometry / flags scribbled on:
        rewritten; reported at most once a
        second per ring
    close() at exit: CLOSED set, unlinked when made here

``lock`` guards replacing and closing the rings against the heartbeat thread. Every event is logged, sent as
``/stream-info/ring-event <what> <text>`` (problems also as ``/error <what> <text>``) and kept (the last few)
for ``/status``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

from .ring import RingError, RingLayout, RingReader, RingTruncated, RingWriter, probe

log = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0  # a problem that stays (a header rewritten every loop) is reported at most this often
NAME_CHECK_S = 1.0  # how often the bridge looks its rings' names up (someone may have removed them)


# what -> (BridgeConfig field naming it, default name prefix): the optional rings the bridge reads besides its input
EXTRA_RINGS = {"/ring/control": ("control_name", "rtd_ctl"), "/ring/style": ("style_name", "rtd_sty")}


class ServedRings:
    """The input ring (the bridge reads) and the output ring (the bridge writes) of one bridge, and the extra
    rings it reads (``extras``: "/ring/control" for external ControlNet images, "/ring/style" for the
    IP-Adapter's style image), all of the engine's frame size."""

    def __init__(self, config, sender, extras: tuple[str, ...] = ()) -> None:
        self.config = config  # bridge.BridgeConfig
        self.sender = sender  # osc.OscSender
        self.reader: RingReader | None = None
        self.writer: RingWriter | None = None
        self.extra_wanted = extras
        self.extras: dict[str, RingReader] = {}
        self.layout: RingLayout | None = None
        self.lock = threading.Lock()
        self.events: deque[str] = deque(maxlen=8)
        self.recreated = 0
        self.repaired = 0
        self._reported_at: dict[str, float] = {}
        self._names_checked_at = time.monotonic()

    # ------------------------------------------------------------------------------------------ opening
    def open(self, width: int, height: int) -> None:
        c, pid = self.config, os.getpid()
        self.layout = RingLayout(width, height, c.pixel_format, c.row_order, c.slots, c.checksum)
        self.reader = self._open(RingReader, c.input_name or f"rtd_in_{pid}", "/ring/input")
        self.writer = self._open(RingWriter, c.output_name or f"rtd_out_{pid}", "/ring/output")
        for what in self.extra_wanted:
            field, prefix = EXTRA_RINGS[what]
            self.extras[what] = self._open(RingReader, getattr(c, field, None) or f"{prefix}_{pid}", what)

    def _put(self, what: str, ring) -> None:
        if what == "/ring/input":
            self.reader = ring
        elif what == "/ring/output":
            self.writer = ring
        else:
            self.extras[what] = ring

    def all(self) -> list[tuple[str, Any]]:
        """(what, ring) for every ring served, input and output first."""
        return [("/ring/input", self.reader), ("/ring/output", self.writer), *self.extras.items()]

    def _open(self, kind, name: str, what: str):
        layout = self.layout
        try:
            ring = kind.create(name, layout)
        except RingError:
            ring = self._adopt(kind, name, what)
            if ring is not None:
                return ring
        else:
            self._serve(ring, what, f"made ring {name!r} ({layout.describe()})")
            return ring
        fallback = f"{name[:20]}_{os.getpid()}"
        try:
            ring = kind.create(fallback, layout)
        except RingError:  # the fallback name is taken too: let the OS pick a free one
            ring = kind.create(None, layout)
            self.sender.error(what, f"{self._reason}; {fallback!r} exists as well; using {ring.name!r} instead")
        else:
            self.sender.error(what, f"{self._reason}; using {fallback!r} instead")
        self._serve(ring, what, f"made ring {ring.name!r} ({layout.describe()})")
        return ring

    def _adopt(self, kind, name: str, what: str):
        """A segment of that name exists: serve it if it is a ring of the same geometry (say a bridge that
        crashed left it); else None, with the reason in ``self._reason``."""
        layout = self.layout
        try:
            ring = kind.attach(name)
        except RingError as exc:
            self._reason = str(exc)
            return None
        got = ring.layout
        if (got.width, got.height, got.pixel_format, got.row_order) != (
                layout.width, layout.height, layout.pixel_format, layout.row_order):
            ring.close()
            self._reason = f"shared memory {name!r} exists as a {got.describe()} ring; expected {layout.describe()}"
            return None
        if isinstance(ring, RingReader):
            ring.last_index = ring.published - 1  # frames from before we came are stale
        if ring.closed:
            how = "left by a bridge that exited"
        else:
            how = (f"left open by process {ring.owner_pid}, a bridge that did not exit cleanly (crashed or "
                   f"killed); its clients switch to this bridge within a second or two")
        self._serve(ring, what, f"adopted the existing ring {name!r} ({got.describe()}), {how}")
        return ring

    def _serve(self, ring, what: str, text: str) -> None:
        session = ring.serve(self.config.checksum)
        self.note(what, f"{text}; session {session:016x}")

    # ------------------------------------------------------------------------------------------ checking
    def check(self) -> bool:
        """Size, geometry and flags of both rings, and about once a second their names; True when a ring was
        replaced (re-point the transfer)."""
        replaced = False
        now = time.monotonic()
        names_due = now - self._names_checked_at >= NAME_CHECK_S
        if names_due:
            self._names_checked_at = now
        for what, ring in self.all():
            try:
                ring.check_header()
            except RingTruncated as exc:
                self._recreate(what, ring, f"{exc}; the bridge made a new ring", unlink=True)
                replaced = True
                continue
            except RingError as exc:
                self.repaired += 1
                ring.repair_header()
                if self._due(f"{what} {exc}"):  # a new kind at once; the same again at most once a second
                    self.problem(what, f"{exc}; the bridge rewrote the header")
            if names_due:
                replaced |= self._check_name(what, ring)
        return replaced

    def _check_name(self, what: str, ring) -> bool:
        """Is ``ring.name`` still this ring? Removed (say by the resource tracker of a bridge that crashed,
        cleaning up after it just as this one re-made the name): make it again. Taken by another segment:
        say so (the other one's owner decides)."""
        try:
            session, _ = probe(ring.name)
        except RingError as exc:
            if "no shared memory named" not in str(exc):
                if self._due(f"{what} name {exc}"):
                    self.problem(what, f"the name {ring.name!r} now opens something else: {exc}")
                return False
            self._recreate(what, ring, f"the name {ring.name!r} was removed while the bridge served it (another "
                                       f"process unlinked it); the bridge made a new ring", unlink=False)
            return True
        if session != ring.session and self._due(f"{what} name taken {session}"):
            self.problem(what, f"the name {ring.name!r} now belongs to another ring (session {session:016x}, "
                               f"this bridge serves {ring.session:016x}): another bridge uses the same name?")
        return False

    def _recreate(self, what: str, old, why: str, unlink: bool) -> None:
        kind, name = type(old), old.name
        last = getattr(old, "last_index", -1)
        with self.lock:
            old.close(unlink=unlink)  # marks it CLOSED if the header page is still there; pixels untouched
            try:
                ring = kind.create(name, self.layout)
            except RingError:  # somebody made the name again in between: let the OS pick one
                ring = kind.create(None, self.layout)
            if isinstance(ring, RingReader):
                ring.last_index = last
            session = ring.serve(self.config.checksum)
            self._put(what, ring)
        self.recreated += 1
        self.problem(what, f"{why} {ring.name!r} (session {session:016x}); clients re-attach to it within a "
                           f"second or two")

    def _due(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._reported_at.get(key, -1e9) < REPORT_EVERY_S:
            return False
        if len(self._reported_at) > 64:  # messages with changing numbers in them: keep the map small
            self._reported_at.clear()
        self._reported_at[key] = now
        return True

    # ------------------------------------------------------------------------------------------ reporting
    def note(self, what: str, text: str) -> None:
        log.info("%s: %s", what, text)
        self.events.append(f"{what}: {text}")
        self.sender.send("/stream-info/ring-event", what, text[:1000])

    def problem(self, what: str, text: str) -> None:
        self.events.append(f"{what}: {text}")
        self.sender.send("/stream-info/ring-event", what, text[:1000])
        self.sender.error(what, text)

    def status(self) -> dict[str, Any]:
        r, w = self.reader, self.writer
        st = {
            "input_session": f"{r.session:016x}" if r is not None and r.serving else None,
            "output_session": f"{w.session:016x}" if w is not None and w.serving else None,
            "recreated": self.recreated, "repaired": self.repaired, "events": list(self.events),
        }
        for what, ring in self.extras.items():  # control_name / control_session, style_name / style_session
            kind = what.rsplit("/", 1)[1]
            st[f"{kind}_name"] = ring.name if ring is not None else None
            st[f"{kind}_session"] = f"{ring.session:016x}" if ring is not None and ring.serving else None
        return st

    # ------------------------------------------------------------------------------------------ lifetime
    def beat(self) -> None:
        """Heartbeat thread: one beat on each ring (a shrunk ring is skipped; the frame loop replaces it)."""
        with self.lock:
            for _, ring in self.all():
                if ring is None:
                    continue
                try:
                    ring.beat()
                except RingError:
                    pass

    def close(self) -> None:
        with self.lock:
            for _, ring in self.all():
                if ring is not None:
                    ring.close()
            self.reader = self.writer = None
            self.extras = {}
