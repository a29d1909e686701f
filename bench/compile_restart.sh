#!/usr/bin/env bash
# Compiled backend: a cold start, then a restart in a new process with the same engine cache.
#   ARTIFACTS=jit  (default) Inductor's on-disk caches under the engine cache root
#   ARTIFACTS=aoti AOTInductor packages in the engine cache (the restart should compile nothing)
# Prints the engine build time of each, the frame time, and (restart) the max difference from eager over
# 100 frames in grey levels.
set -u
export RTDIFFUSION_CACHE=${RTDIFFUSION_CACHE:-/tmp/rtd_cache}
ARTIFACTS=${ARTIFACTS:-jit}
# the engine refuses AOTInductor packages on CUDA (loading one segfaulted on the H200, BENCHMARKS.md); this
# script exists to measure and debug exactly that, so it lifts the refusal
export RTDIFFUSION_AOTI_CUDA=1
for run in cold restart; do
  python3 - "$run" "$ARTIFACTS" <<'PY'
import sys, time, logging
logging.basicConfig(level=logging.WARNING)
import numpy as np
from rtdiffusion import StreamEngine
from rtdiffusion.bench import synthetic_frames
run, artifacts = sys.argv[1], sys.argv[2]
t0 = time.time()
e = StreamEngine.from_pretrained("random:sd-turbo", device="cuda", backend="compiled", compile_artifacts=artifacts)
frames = synthetic_frames(100, 512, 512)
out = [np.asarray(e(f)).copy() for f in frames]  # the first frame compiles (or loads) and captures
built = time.time() - t0
t1 = time.perf_counter(); [e(f) for f in frames]; ms = (time.perf_counter() - t1) * 10
line = f"{run:8s} {artifacts}: engine ready in {built:6.1f} s (model + compile/load + capture); {ms:.2f} ms/frame"
if run == "restart":
    ref = StreamEngine.from_pretrained("random:sd-turbo", device="cuda", backend="eager")
    diff = max(int(np.abs(o.astype(int) - np.asarray(ref(f)).astype(int)).max()) for o, f in zip(out, frames))
    line += f"; max |compiled - eager| over 100 frames: {diff}"
print(line, "|", e.status()["networks"])
PY
done
