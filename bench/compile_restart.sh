#!/usr/bin/env bash
# Compiled backend: a cold start, then a restart in a new process with the same Inductor on-disk cache
# (under the engine cache root). Prints the engine build time of each.
set -u
export RTDIFFUSION_CACHE=${RTDIFFUSION_CACHE:-/tmp/rtd_cache}
for run in cold restart; do
  python3 - "$run" <<'PY'
import sys, time, logging
logging.basicConfig(level=logging.WARNING)
import numpy as np
from rtdiffusion import StreamEngine
t0 = time.time()
e = StreamEngine.from_pretrained("random:sd-turbo", device="cuda", backend="compiled")
built = time.time() - t0
f = np.zeros((512, 512, 3), np.uint8) + 100
for _ in range(20): e(f)
t1 = time.perf_counter(); [e(f) for _ in range(100)]; ms = (time.perf_counter() - t1) * 10
print(f"{sys.argv[1]:8s} engine built in {built:6.1f} s (model build + compile + capture); then {ms:.2f} ms/frame")
PY
done
