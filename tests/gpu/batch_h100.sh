#!/usr/bin/env bash
# One device call on ONE GPU (nvidia-h100-x1 or nvidia-h200), after the vLLM chunks and the nixl
# wheels are there (docs/gpu-runs.md):
#   source .gpu-carry/on-device.sh && export PYTHONPATH=/tmp/site-nixl:$PYTHONPATH && bash tests/gpu/batch_h100.sh
# 1. calibrate the simulator on this GPU, then the fidelity workloads (real + simulated);
# 2. a PD pair sharing the GPU over NIXL with a 256-token chunk, recorded (logs kept either way).
# Everything lands in $OUT.
set -u
T0=$(date +%s)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
W=${OUT:-/tmp/labkit-batch}; mkdir -p "$W"
{ nvidia-smi; date -u; nproc; } > "$W/machine.txt" 2>&1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | sed 's/nvidia-//; s/-.*//')
OUT=$W timeout 330 python3 -m pytest -m gpu tests/gpu/test_calibrate_vllm.py -q -s -p no:cacheprovider \
  -o timeout=320 -rA > "$W/calibrate.log" 2>&1
echo "calibrate rc=$? at +$(( $(date +%s) - T0 ))s"
timeout 220 python3 tests/gpu/record_toggles.py "$W" "real-${GPU}-1gpu-nixl-chunk256" \
  num_gpus=1 connector=nixl chunk=256 > "$W/record.log" 2>&1
echo "record rc=$? at +$(( $(date +%s) - T0 ))s"
tail -n 30 "$W/calibrate.log" | cut -c1-250; tail -n 15 "$W/record.log" | cut -c1-300
ls -la "$W"
