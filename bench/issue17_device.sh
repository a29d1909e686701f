#!/usr/bin/env bash
# Issue 17 on a 2-GPU device machine, in one call: GPU 0 times ours vs the baseline (bench/baseline.py),
# GPU 1 measures start-up (bench/startup.py: cold AOTInductor build, restarts, a profiled restart), then the
# 'fast' Inductor preset. Results under $OUT. Needs the diffusers wheel in .whl (README of the device).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
LIMIT=${LIMIT:-540}
# Two jobs on disjoint CPU halves (the first run of this script timed GPU 0's host loop while GPU 1's
# AOTInductor build took every core: end-to-end times 3x the device time). Compile threads follow.
half=$(( $(nproc) / 2 ))
pin0="taskset -c 0-$((half - 1))"; pin1="taskset -c $half-$((2 * half - 1))"
command -v taskset >/dev/null || { pin0=""; pin1=""; }
export TORCHINDUCTOR_COMPILE_THREADS=$half
( export CUDA_VISIBLE_DEVICES=0 RTDIFFUSION_CACHE=/tmp/rtd_speed
  timeout $LIMIT $pin0 python3 -X faulthandler bench/baseline.py --only S1 S2 > $OUT/gpu0.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1 RTDIFFUSION_CACHE=/tmp/rtd17
  end=$(( $(date +%s) + LIMIT ))
  left() { l=$(( end - $(date +%s) )); [ $l -lt 1 ] && l=1; echo $l; }
  RTD_T0_NS=$(date +%s%N) timeout $(left) $pin1 python3 -X faulthandler bench/startup.py --run cold &&
  RTD_T0_NS=$(date +%s%N) timeout $(left) $pin1 python3 -X faulthandler bench/startup.py --run restart --parity &&
  RTD_T0_NS=$(date +%s%N) timeout $(left) $pin1 python3 -X faulthandler bench/startup.py --run restart-profile --profile &&
  RTD_T0_NS=$(date +%s%N) timeout $(left) $pin1 python3 -X faulthandler bench/startup.py --run restart-nocudnnsearch --cudnn-benchmark off
  ls -la $RTDIFFUSION_CACHE 2>&1 | head
  timeout $(left) $pin1 python3 -X faulthandler bench/baseline.py --only S1 --preset fast --no-baseline --tag fast
) > $OUT/gpu1.log 2>&1 &
wait
echo "=== GPU 1 (start-up, then preset fast) ==="; grep -v "^\s*$" $OUT/gpu1.log | grep -v "^  File\|Warning\|warn(" | tail -45
echo "=== GPU 0 (ours vs baseline) ==="; tail -22 $OUT/gpu0.log
