"""How a frame step is launched: directly (eager) or as replays of captured CUDA graphs.

An executor is a small object the engine swaps, never a flag tested per frame. It runs the two stages of
``frame_step.py`` for one layout's state. Networks (torch modules, compiled modules, TensorRT engines)
are the executor's ``nets``; the graph executor captures whatever they enqueue.

With ``overlap`` (``EngineConfig.vae_overlap``) the main stage is ``overlapped_step``: the VAE runs on a
parallel branch (a second stream, captured into the same graph) next to the UNet, and each frame comes out
2 calls later than with ``main_step`` (:data:`OVERLAP_LATENCY`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from engines.base import Networks
from engines.graph import Branch, CapturedStep

from .buffers import FrameBuffers
from .frame_step import main_step, overlapped_step, probe_step
from .guidance import Guidance

log = logging.getLogger(__name__)

OVERLAP_LATENCY = 2  # extra calls before a frame comes out with overlap: encoded, denoised, then decoded


@dataclass
class LayoutState:
    """One layout's buffers and guidance object (kept while the engine lives; small next to the graphs)."""

    buffers: FrameBuffers
    guidance: Guidance
    ring_shift: bool  # S > 1


@dataclass
class CapturedFrame:
    """The captured probe and main stages of one layout (an entry of the engine's graph cache)."""

    probe: CapturedStep
    main: CapturedStep

    @property
    def released(self) -> bool:
        return self.main.released

    def release(self) -> None:
        self.probe.release()
        self.main.release()


class EagerExecutor:
    """Launch every kernel from Python each frame: works everywhere, the oracle for parity tests."""

    captures = False

    def __init__(self, nets: Networks, name: str = "eager", overlap: bool = False):
        self.nets, self.name, self.overlap = nets, name, overlap
        self._branches: dict = {}  # device -> Branch (overlap): one side stream per device, made once

    def step_fn(self, st: LayoutState, nets: Networks) -> Callable[[], None]:
        """The main stage of ``st`` as a no-argument call (what the graph executor captures)."""
        b, g, ring = st.buffers, st.guidance, st.ring_shift
        if not self.overlap:
            return lambda: main_step(b, nets, g, ring)
        dev = b.layout.device
        side = self._branches.get(dev) or self._branches.setdefault(dev, Branch(dev))
        return lambda: overlapped_step(b, nets, g, ring, side)

    def capture(self, st: LayoutState) -> CapturedFrame | None:
        """Called between frames when no captured frame is cached for ``st``."""
        return None

    def probe(self, st: LayoutState, frame: CapturedFrame | None) -> None:
        probe_step(st.buffers)

    def main(self, st: LayoutState, frame: CapturedFrame | None) -> None:
        self.step_fn(st, self.nets)()


class GraphExecutor(EagerExecutor):
    """Capture each layout's probe and main stages once as CUDA graphs; afterwards only replay them.

    :meth:`capture` raises ``engines.graph.CaptureError`` when capture is impossible; the engine then
    falls back to eager and says so in the log and in status().
    """

    captures = True

    def __init__(self, nets: Networks, name: str = "graph", warmup: int = 2, overlap: bool = False):
        super().__init__(nets, name, overlap)
        self.warmup = warmup
        self.captures_done = 0
        self.before_capture: Callable[[], None] | None = None  # set by the engine (low-VRAM streaming)

    def capture(self, st: LayoutState) -> CapturedFrame:
        b, dev, nets = st.buffers, st.buffers.layout.device, self.nets
        probe = CapturedStep(lambda: probe_step(b), dev, state=b.state_tensors(), warmup=self.warmup,
                             name="probe step")
        main = CapturedStep(self.step_fn(st, nets), dev,
                            state=b.state_tensors(), warmup=self.warmup, name="frame step",
                            before_capture=self.before_capture)
        self.captures_done += 1
        log.info("captured the frame step for %s (capture #%d)", _describe(b), self.captures_done)
        return CapturedFrame(probe, main)

    def probe(self, st: LayoutState, frame: CapturedFrame | None) -> None:
        frame.probe.replay()

    def main(self, st: LayoutState, frame: CapturedFrame | None) -> None:
        frame.main.replay()


def _describe(b: FrameBuffers) -> str:
    L = b.layout
    return f"{L.width}x{L.height}, {L.slots} step(s) x {L.frames} frame(s), cfg {L.cfg.value}, {L.dtype}"
