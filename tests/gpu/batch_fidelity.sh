#!/usr/bin/env bash
# Calibration and the three fidelity layouts in ONE lease on nvidia-h200-x4 (same host: the
# constants and the runs they are checked against must come from the same machine), after the
# vLLM chunks and nixl wheels:
#   source .gpu-carry/on-device.sh && export PYTHONPATH=/tmp/site-nixl:$PYTHONPATH && bash tests/gpu/batch_fidelity.sh
# GPUs 0,1: pd-nixl, then GPU 0: 8B calibration probes; GPU 2: pd-example (the pair shares it);
# GPU 3: lab-1b calibration probes + the colocated workloads.
set -u
T0=$(date +%s)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NCCL_NVLS_ENABLE=0
W=${OUT:-/tmp/labkit-batch}; mkdir -p "$W"
# run GPUS TIMEOUT NAME COMMAND...
run() { CUDA_VISIBLE_DEVICES=$1 timeout "$2" python3 "${@:4}" > "$W/$3.log" 2>&1
        echo "$3 on GPU $1 rc=$? at +$(( $(date +%s) - T0 ))s"; }
( run 0,1 200 pd-nixl tests/gpu/fidelity_real.py pd-nixl "$W"
  run 0 200 cal-8b tests/gpu/calibrate_model.py "$W" llama-3.1-8b ) &
run 2 240 pd-example tests/gpu/fidelity_real.py pd-example "$W" &
run 3 240 cal-1b tests/gpu/calibrate_model.py "$W" lab-1b &
wait
grep -h "^real \|^rms" "$W"/*.log | cut -c1-220
ls -la "$W"
