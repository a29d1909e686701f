"""How a frame step is launched: directly (eager) or as replays of captured CUDA graphs.

An executor is a small object the engine swaps, never a flag tested per frame. It runs the two stages of
``frame_step.py`` for one layout's state. Networks (torch modules, compiled modules, TensorRT engines)
are the executor's ``nets``; the graph executor captures whatever they enqueue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from engines.base import Networks
from engines.graph import CapturedStep

from .buffers import FrameBuffers
from .frame_step import main_step, probe_step
from .guidance import Guidance

log = logging.getLogger(__name__)


@dataclass
class LayoutState:
    """One layout's buffers and guidance object, and (graph executors) its captured steps."""

    buffers: FrameBuffers
    guidance: Guidance
    ring_shift: bool  # S > 1
    probe_graph: CapturedStep | None = None
    main_graph: CapturedStep | None = None
    notes: dict = field(default_factory=dict)

    def release(self) -> None:
        for g in (self.probe_graph, self.main_graph):
            if g is not None:
                g.release()
        self.probe_graph = self.main_graph = None


class EagerExecutor:
    """Launch every kernel from Python each frame: works everywhere, the oracle for parity tests."""

    captures = False

    def __init__(self, nets: Networks, name: str = "eager"):
        self.nets, self.name = nets, name

    def prepare(self, st: LayoutState) -> None:
        """Called between frames whenever ``st`` becomes active."""

    def probe(self, st: LayoutState) -> None:
        probe_step(st.buffers)

    def main(self, st: LayoutState) -> None:
        main_step(st.buffers, self.nets, st.guidance, st.ring_shift)


class GraphExecutor(EagerExecutor):
    """Capture each layout's probe and main stages once as CUDA graphs; afterwards only replay them.

    Capture happens in :meth:`prepare` (between frames). It raises ``engines.graph.CaptureError`` when
    capture is impossible; the engine then falls back to eager and says so in the log and in status().
    """

    captures = True

    def __init__(self, nets: Networks, name: str = "graph", warmup: int = 2):
        super().__init__(nets, name)
        self.warmup = warmup
        self.captures_done = 0

    def prepare(self, st: LayoutState) -> None:
        if st.main_graph is not None:
            return  # cached: replay at once, no capture
        b, dev = st.buffers, st.buffers.layout.device
        st.probe_graph = CapturedStep(lambda: probe_step(b), dev, state=b.state_tensors(),
                                      warmup=self.warmup, name="probe step")
        st.main_graph = CapturedStep(lambda: main_step(b, self.nets, st.guidance, st.ring_shift), dev,
                                     state=b.state_tensors(), warmup=self.warmup, name="frame step")
        self.captures_done += 1
        log.info("captured the frame step for %s (capture #%d)", _describe(b), self.captures_done)

    def probe(self, st: LayoutState) -> None:
        st.probe_graph.replay()

    def main(self, st: LayoutState) -> None:
        st.main_graph.replay()


def _describe(b: FrameBuffers) -> str:
    L = b.layout
    return f"{L.width}x{L.height}, {L.slots} step(s) x {L.frames} frame(s), cfg {L.cfg.value}, {L.dtype}"

