"""StreamDiffusion's similar-frame filter: skip a frame that is nearly the one before it.

Two ways to decide, both on an 8x-subsampled probe of the frame (as [-1, 1] floats):
  host frames    host_skip(): the probe is computed here on this very frame, so a scene cut is never skipped
  device frames  device_skip(): the frame step writes the three dot products into the probe buffer, the
                 engine copies them to pinned memory (record_probe) and the next frame decides from the last
                 copy the GPU has finished: one frame late, but it never waits on the GPU.
The rule: skip with probability max(0, 1 - (1 - cos) / (1 - threshold)), at most max_skip frames in a row.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from .settings import FilterSettings


class SimilarFrameFilter:
    """The filter's state: the last probe, the pinned copy of the GPU's dot products, the skip run."""

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.probe_host = torch.zeros(3, dtype=torch.float32, pin_memory=cuda)  # [3] fp32: a.b, a.a, b.b
        self.probe_event = torch.cuda.Event() if cuda else None
        self.skipped = 0  # frames skipped so far (status()["skipped_frames"])
        self._run = 0  # frames skipped in a row
        self._rng = random.Random(0)
        self._host_ref: np.ndarray | None = None  # [F*H/8*W/8*3] fp32: the last processed host frame's probe

    def host_skip(self, frame: Any, f: FilterSettings) -> bool:
        """Similar-frame filter for frames that come from the host: the same 8x-subsampled probe as the
        GPU's, computed here on this very frame (tens of microseconds), so a scene cut is never skipped."""
        fr = frame if frame.ndim == 4 else frame[None]
        p = np.asarray(fr[:, ::8, ::8, :], dtype=np.float32).ravel() * (2.0 / 255.0) - 1.0
        ref = self._host_ref
        skip = ref is not None and ref.shape == p.shape and self._rule(float(p @ ref), float(p @ p),
                                                                        float(ref @ ref), f)
        if not skip:
            self._host_ref = p
        return skip

    def record_probe(self, dots: torch.Tensor) -> None:
        """Copy the frame step's probe dots to pinned memory (on the current stream; no host sync)."""
        self.probe_host.copy_(dots, non_blocking=True)
        if self.probe_event is not None:
            self.probe_event.record()

    def device_skip(self, f: FilterSettings) -> bool:
        """Similar-frame filter for frames already on the device (step(), CUDA frames): decided from the
        last probe the GPU has finished, so one frame late, but it never waits on the GPU."""
        if not f.enabled or (self.probe_event is not None and not self.probe_event.query()):
            return False
        return self._rule(*self.probe_host.tolist(), f)

    def _rule(self, ab: float, aa: float, bb: float, f: FilterSettings) -> bool:
        """StreamDiffusion's rule: skip with probability max(0, 1 - (1 - cos) / (1 - threshold)),
        at most max_skip frames in a row."""
        cos = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0
        skip_prob = 0.0 if f.threshold >= 1 else max(0.0, 1.0 - (1.0 - cos) / (1.0 - f.threshold))
        if self._run < f.max_skip and self._rng.random() < skip_prob:
            self._run += 1
            self.skipped += 1
            return True
        self._run = 0
        return False
