#!/usr/bin/env bash
# The three fidelity layouts at once on nvidia-h200-x4 (after the vLLM chunks and nixl wheels):
#   source .gpu-carry/on-device.sh && export PYTHONPATH=/tmp/site-nixl:$PYTHONPATH && bash tests/gpu/batch_fidelity.sh
# GPUs 0,1: pd-nixl; GPU 2: pd-example (the pair shares it); GPU 3: colocated.
set -u
T0=$(date +%s)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} NCCL_NVLS_ENABLE=0
W=${OUT:-/tmp/labkit-batch}; mkdir -p "$W"
run() { CUDA_VISIBLE_DEVICES=$1 timeout 400 python3 tests/gpu/fidelity_real.py "$2" "$W" > "$W/$2.log" 2>&1
        echo "$2 rc=$? at +$(( $(date +%s) - T0 ))s"; }
run 0,1 pd-nixl & run 2 pd-example & run 3 colocated & wait
grep -h "^real " "$W"/*.log | cut -c1-220
ls -la "$W"
