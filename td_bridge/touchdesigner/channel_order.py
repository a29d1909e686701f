"""Channel order between TouchDesigner's arrays and the rings, and the red-frame check.

What TouchDesigner documents: ``TOP.numpyArray()`` returns the TOP as a float32 array [H, W, 4] (values 0..1,
bottom row first) and ``scriptOp.copyNumpyArray()`` takes [H, W, 1..4] uint8/uint16/float32, also bottom row
first. The channel order is not stated on those pages; it is RGBA for the TOP pixel formats TouchDesigner
uses, but one of Derivative's own OpenCV examples reorders channels (OpenCV itself is BGR), and GPU
download paths differ between platforms. So the component does not guess: the red Constant TOP
(``check_red``) is read back with ``numpyArray()`` and the verdict says which order this machine returns.
If it is BGRA, turn on the component's *Swaprb* parameter and both Script TOPs swap R and B.

Nothing here allocates per frame: the input side passes a view, the output side copies into a buffer made
once.
"""

from __future__ import annotations

import numpy as np


def as_rgb_view(frame: np.ndarray, swap_rb: bool) -> np.ndarray:
    """The frame to hand to ``RingWriter.write``: itself, or a zero-copy [H, W, 3] view with B and R swapped
    (BGRA in -> RGB view; alpha is dropped, the ring then holds 255, which the engine ignores)."""
    return frame[..., 2::-1] if swap_rb else frame


class SwapOut:
    """[H, W, 4] RGBA -> [H, W, 4] BGRA into a buffer allocated once (for ``copyNumpyArray``)."""

    def __init__(self) -> None:
        self._buf: np.ndarray | None = None

    def __call__(self, frame: np.ndarray, swap_rb: bool) -> np.ndarray:
        if not swap_rb:
            return frame
        if self._buf is None or self._buf.shape != frame.shape or self._buf.dtype != frame.dtype:
            self._buf = np.empty_like(frame)  # [H, W, 4], once per size
        np.copyto(self._buf[..., :3], frame[..., 2::-1])
        if frame.shape[2] == 4:
            np.copyto(self._buf[..., 3], frame[..., 3])
        return self._buf


def check_red(pixels: np.ndarray | None) -> tuple[str, str]:
    """Verdict for ``numpyArray()`` of a pure red TOP: (order, text), order one of RGBA, BGRA, unknown."""
    if pixels is None or pixels.ndim != 3 or pixels.shape[2] < 3 or pixels.size == 0:
        got = "nothing" if pixels is None else f"shape {pixels.shape}"
        return "unknown", f"expected a [H, W, 4] array from the red Constant TOP; got {got}"
    mean = pixels.reshape(-1, pixels.shape[2]).mean(axis=0)
    first, third = float(mean[0]), float(mean[2])
    if first > 0.5 and third < 0.1 and float(mean[1]) < 0.1:
        return "RGBA", "numpyArray() returns RGBA (channel 0 is red): leave Swaprb off"
    if third > 0.5 and first < 0.1 and float(mean[1]) < 0.1:
        return "BGRA", "numpyArray() returns BGRA (channel 2 is red): turn Swaprb on"
    return "unknown", (f"the red test frame read back as channel means {[round(float(m), 3) for m in mean]}; "
                       "check that check_red is pure red (1, 0, 0, 1)")
