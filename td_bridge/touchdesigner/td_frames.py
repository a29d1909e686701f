"""Frame logic of the TouchDesigner scripts, kept free of TouchDesigner so it can be tested anywhere.

Needs only numpy and ``td_bridge.ring`` (stdlib + numpy; no torch). TouchDesigner hands the scripts
``TOP.numpyArray()`` arrays: float32 RGBA in 0..1, rows bottom-up. ``scriptOp.copyNumpyArray()`` takes
[H, W, 3|4] arrays, also bottom-up. Both classes keep their buffers between cooks: nothing is allocated per
frame after the first.

Both survive the bridge coming and going (see ``_Link``), and neither ever raises out of ``send`` /
``receive`` (so nothing escapes a Script TOP's ``onCook``): what went wrong is in ``.error`` (a problem now,
None when all is well), what happened last to the link in ``.status`` (connected, reconnected after a crash,
...), and ``.reconnects`` counts the times a new bridge was picked up after the link had been lost.

Attaching never registers the segment with multiprocessing's resource tracker (on macOS that would start
``sys.executable``, which inside TouchDesigner is TouchDesigner itself).
"""

from __future__ import annotations

import time

import numpy as np

from td_bridge.ring import RingError, RingReader, RingTruncated, RingWriter, RowOrder, probe

RETRY_S = 1.0  # attach attempts while there is no ring, and identity checks while there is one
STALE_S = 3.0  # a heartbeat that has not moved for this long: the bridge is said not to respond


class _Link:
    """Holds one ring by name and notices when the bridge behind it has gone or been replaced.

    While attached, about once a second (``RETRY_S``): the name is looked up again (``probe``); if it is gone
    or now names another segment (another session: a new bridge made a new ring after the old one crashed)
    the old mapping is dropped and the new ring attached at once. If the session in our own mapping changed
    (a new bridge adopted the same segment, as happens on Windows), that is a reconnect too. A heartbeat
    that has not moved for ``STALE_S`` is reported in ``.error`` (the mapping is kept: the bridge may only be
    busy). CLOSED (the bridge exited) and a segment that shrank (truncated) drop the mapping as well.
    """

    kind = RingWriter

    def __init__(self) -> None:
        self.ring = None
        self.error: str | None = None
        self.status = "not connected"
        self.reconnects = 0
        self._name: str | None = None
        self._next_try = 0.0
        self._next_check = 0.0
        self._session = 0
        self._beat = (0, 0.0)  # (heartbeat last seen, when it last moved)
        self._stale: str | None = None
        self._lost: str | None = None  # why the last ring was let go, until a new one is attached

    def _ring_for(self, name: str):
        now = time.monotonic()
        if self.ring is not None and name != self._name:
            self._drop(f"the ring name changed to {name!r}")
            self._lost = None  # not a failure: just another ring
        if self.ring is not None:
            if self.ring.closed:
                self._drop("its bridge exited (the ring was marked closed)")
            elif now >= self._next_check:
                self._check(now)
        if self.ring is None and name:
            if now < self._next_try:
                return None
            self._next_try = now + RETRY_S
            self._attach(name, now)
        return self.ring

    def _attach(self, name: str, now: float) -> None:
        try:
            ring = self.kind.attach(name)
        except RingError as exc:
            self.error = str(exc)
            return
        except Exception as exc:  # anything else the OS says: reported, never raised into onCook
            self.error = f"cannot attach to ring {name!r}: {type(exc).__name__}: {exc}"
            return
        if ring.closed:  # its bridge has exited (the segment may be unlinked already): wait for the next one
            ring.close()
            self.error = f"ring {name!r} is closed (its bridge has exited); waiting for the bridge to restart"
            return
        self.ring, self._name = ring, name
        self._session, self._beat, self._stale = ring.session, (ring.heartbeat, now), None
        self._next_check = now + RETRY_S
        self.error = None
        if self._lost is not None:
            self.reconnects += 1
            self.status = (f"reconnected to ring {name!r} (session {ring.session:016x}) after {self._lost}; "
                           f"{self.reconnects} reconnect(s) so far")
            self._lost = None
        else:
            self.status = f"connected to ring {name!r} (session {ring.session:016x}, {ring.layout.describe()})"
        self._attached(ring)

    def _check(self, now: float) -> None:
        self._next_check = now + RETRY_S
        ring, name = self.ring, self._name
        try:
            ring.check_size()
            session, beat = ring.session, ring.heartbeat
        except RingError as exc:
            self._drop(str(exc))
            return
        if session != self._session:  # a new bridge adopted this very segment
            self.reconnects += 1
            self.status = (f"a new bridge took over ring {name!r} (session {self._session:016x} -> "
                           f"{session:016x}); {self.reconnects} reconnect(s) so far")
            self._session, self._beat, self._stale = session, (beat, now), None
        elif beat != self._beat[0]:
            self._beat, self._stale = (beat, now), None
        try:
            named, _ = probe(name)
        except RingError as exc:
            self._drop(f"the ring was removed or replaced ({exc}): its bridge has gone")
            return
        except Exception as exc:
            self._drop(f"the ring could not be looked up ({type(exc).__name__}: {exc})")
            return
        if named != session:
            self._drop(f"its name now belongs to a new ring (session {named:016x}): the bridge restarted")
            self._next_try = 0.0  # attach to the new one now
            return
        if beat and now - self._beat[1] > STALE_S:
            self._stale = (f"the bridge is not responding: ring {name!r}'s heartbeat has not moved for "
                           f"{now - self._beat[1]:.0f} s (its process died or hangs); still attached, "
                           f"waiting for it or a new bridge")
            self.status = self._stale
        self.error = self._stale

    def _drop(self, why: str) -> None:
        self._lost = why
        self.status = f"lost ring {self._name!r}: {why}; looking for the bridge once a second"
        self.error = self.status
        self.close()

    def _attached(self, ring) -> None:
        pass

    def close(self) -> None:
        if self.ring is not None:
            try:
                self.ring.close()
            except Exception:  # a mapping that cannot be released now goes when it is collected
                pass
        self.ring = None


class InputSender(_Link):
    """Sends a TOP's pixels into the bridge's input ring (use in the input Script TOP's onCook)."""

    kind = RingWriter

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    @property
    def writer(self) -> RingWriter | None:
        return self.ring

    def send(self, name: str, frame: np.ndarray | None) -> bool:
        """Write ``frame`` (numpyArray(): [H, W, 4] float32 bottom-up, or uint8) into ring ``name``.
        Never raises: returns False with the reason in ``.error``."""
        try:
            return self._send(name, frame)
        except Exception as exc:  # pragma: no cover - a last guard for onCook
            self.error = f"{type(exc).__name__}: {exc}"
            return False

    def _send(self, name: str, frame: np.ndarray | None) -> bool:
        if frame is None or not name:
            return False
        w = self._ring_for(name)
        if w is None:
            return False
        h, wd = w.layout.height, w.layout.width
        if frame.shape[0] != h or frame.shape[1] != wd:
            self.error = (f"the input TOP is {frame.shape[1]}x{frame.shape[0]} but the bridge runs at {wd}x{h}; "
                          f"set the TOP's resolution (or a Fit TOP before it) to {wd}x{h}")
            return False
        try:
            w.write(frame, rows=RowOrder.BOTTOM_UP)
        except RingTruncated as exc:
            self._drop(str(exc))
            return False
        except RingError as exc:  # wrong channels or dtype: say why in .error, not a script error every cook
            self.error = str(exc)
            return False
        self.sent += 1
        self.error = self._stale
        return True


class StyleSender(InputSender):
    """Sends the IP-Adapter's style picture into the bridge's style ring only when asked (``request``: the
    component's Update pulse) and whenever a ring is (re)attached (a new bridge needs it too), never every
    frame: the bridge encodes each picture it gets. Use ``wants(name)`` before paying for numpyArray()."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = True

    def request(self) -> None:
        self.pending = True

    def _attached(self, ring) -> None:
        self.pending = True

    def wants(self, name: str) -> bool:
        """True when a picture should be sent now (a ring is attached and one was asked for)."""
        try:
            return bool(name) and self._ring_for(name) is not None and self.pending
        except Exception as exc:  # pragma: no cover - a last guard for onCook
            self.error = f"{type(exc).__name__}: {exc}"
            return False

    def send(self, name: str, frame: np.ndarray | None) -> bool:
        sent = super().send(name, frame)
        if sent:
            self.pending = False
        return sent


class OutputReceiver(_Link):
    """Reads the newest result from the bridge's output ring as an array for ``copyNumpyArray``."""

    kind = RingReader

    def __init__(self) -> None:
        super().__init__()
        self.frame: np.ndarray | None = None  # [H, W, 4] uint8 RGBA bottom-up: what the TOP shows
        self.received = 0
        self._raw: np.ndarray | None = None  # [H, W, C] in the ring's layout
        self._shown: np.ndarray | None = None  # [H, W, 4] what ``frame`` becomes once a frame of this ring is in
        self._direct = False

    @property
    def reader(self) -> RingReader | None:
        return self.ring

    def receive(self, name: str) -> np.ndarray | None:
        """The newest complete frame as [H, W, 4] uint8 RGBA bottom-up, or the last one if nothing is new
        (None before the first). Never raises: problems go to ``.error``."""
        try:
            self._receive(name)
        except Exception as exc:  # pragma: no cover - a last guard for onCook
            self.error = f"{type(exc).__name__}: {exc}"
        return self.frame if self.received else None

    def _attached(self, ring: RingReader) -> None:
        lay = ring.layout
        self._direct = lay.pixel_format.value == "rgba8" and lay.row_order is RowOrder.BOTTOM_UP
        self._raw = ring.empty_frame()
        # the last frame stays up until the first frame of this ring has been read
        self._shown = self._raw if self._direct else np.full((lay.height, lay.width, 4), 255, np.uint8)

    def _receive(self, name: str) -> None:
        r = self._ring_for(name)
        if r is None:
            return
        try:
            info = r.read(self._raw)
        except RingTruncated as exc:
            self._drop(str(exc))
            return
        except RingError as exc:
            self.error = str(exc)
            return
        if info is None:
            return
        lay = r.layout
        if not self._direct:
            src = self._raw if lay.row_order is RowOrder.BOTTOM_UP else self._raw[::-1]
            for c, pos in enumerate(lay.pixel_format.rgb_channels):
                np.copyto(self._shown[..., c], src[..., pos])
            if lay.channels == 4:
                np.copyto(self._shown[..., 3], src[..., 3])
        self.frame = self._shown
        self.received += 1
        self.error = self._stale

    def close(self) -> None:
        super().close()
        self._raw = None
