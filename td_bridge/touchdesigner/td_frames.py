"""Frame logic of the TouchDesigner scripts, kept free of TouchDesigner so it can be tested anywhere.

Needs only numpy and ``td_bridge.ring`` (stdlib + numpy; no torch). TouchDesigner hands the scripts
``TOP.numpyArray()`` arrays: float32 RGBA in 0..1, rows bottom-up. ``scriptOp.copyNumpyArray()`` takes
[H, W, 3|4] arrays, also bottom-up. Both classes keep their buffers between cooks: nothing is allocated per
frame after the first.

Both survive the bridge coming and going: while no ring of that name exists they report why in
``.error`` and try again at most once a second; when the bridge exits (the ring is marked CLOSED) they
let go of it and wait for the next one.
"""

from __future__ import annotations

import time

import numpy as np

from td_bridge.ring import RingError, RingReader, RingWriter, RowOrder

RETRY_S = 1.0


class InputSender:
    """Sends a TOP's pixels into the bridge's input ring (use in the input Script TOP's onCook)."""

    def __init__(self) -> None:
        self.writer: RingWriter | None = None
        self.error: str | None = None
        self.sent = 0
        self._name: str | None = None
        self._next_try = 0.0

    def send(self, name: str, frame: np.ndarray | None) -> bool:
        """Write ``frame`` (numpyArray(): [H, W, 4] float32 bottom-up, or uint8) into ring ``name``."""
        if frame is None or not name:
            return False
        w = self._attach(name)
        if w is None:
            return False
        h, wd = w.layout.height, w.layout.width
        if frame.shape[0] != h or frame.shape[1] != wd:
            self.error = (f"the input TOP is {frame.shape[1]}x{frame.shape[0]} but the bridge runs at {wd}x{h}; "
                          f"set the TOP's resolution (or a Fit TOP before it) to {wd}x{h}")
            return False
        try:
            w.write(frame, rows=RowOrder.BOTTOM_UP)
        except RingError as exc:  # wrong channels or dtype: say why in .error, not a script error every cook
            self.error = str(exc)
            return False
        self.sent += 1
        self.error = None
        return True

    def _attach(self, name: str) -> RingWriter | None:
        if self.writer is not None and (name != self._name or self.writer.closed):
            self.close()
        if self.writer is None:
            now = time.monotonic()
            if now < self._next_try:
                return None
            self._next_try = now + RETRY_S
            try:
                w = RingWriter.attach(name)
            except RingError as exc:
                self.error = str(exc)
                return None
            if w.closed:  # its bridge has exited (the segment may be unlinked already): wait for the next one
                w.close()
                self.error = f"ring {name!r} is closed (its bridge has exited); waiting for the bridge to restart"
                return None
            self.writer, self._name = w, name
        return self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = None


class OutputReceiver:
    """Reads the newest result from the bridge's output ring as an array for ``copyNumpyArray``."""

    def __init__(self) -> None:
        self.reader: RingReader | None = None
        self.error: str | None = None
        self.frame: np.ndarray | None = None  # [H, W, 4] uint8 RGBA bottom-up: what the TOP shows
        self.received = 0
        self._raw: np.ndarray | None = None  # [H, W, C] in the ring's layout
        self._name: str | None = None
        self._next_try = 0.0

    def receive(self, name: str) -> np.ndarray | None:
        """The newest complete frame as [H, W, 4] uint8 RGBA bottom-up, or the last one if nothing is new
        (None before the first)."""
        r = self._attach(name)
        if r is None:
            return self.frame if self.received else None
        lay = r.layout
        direct = lay.pixel_format.value == "rgba8" and lay.row_order is RowOrder.BOTTOM_UP
        if self._raw is None:
            self._raw = r.empty_frame()
            self.frame = self._raw if direct else np.full((lay.height, lay.width, 4), 255, np.uint8)
        if r.read(self._raw) is None:
            return self.frame if self.received else None
        if not direct:
            src = self._raw if lay.row_order is RowOrder.BOTTOM_UP else self._raw[::-1]
            for c, pos in enumerate(lay.pixel_format.rgb_channels):
                np.copyto(self.frame[..., c], src[..., pos])
            if lay.channels == 4:
                np.copyto(self.frame[..., 3], src[..., 3])
        self.received += 1
        self.error = None
        return self.frame

    def _attach(self, name: str) -> RingReader | None:
        if self.reader is not None and (name != self._name or self.reader.closed):
            self.close()
        if self.reader is None and name:
            now = time.monotonic()
            if now < self._next_try:
                return None
            self._next_try = now + RETRY_S
            try:
                self.reader = RingReader.attach(name)
                self._name = name
            except RingError as exc:
                self.error = str(exc)
        return self.reader

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        self.reader = None
        self._raw = None
