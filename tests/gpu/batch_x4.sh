#!/usr/bin/env bash
# Device calls on nvidia-h200-x4 after the vLLM chunks and the nixl wheels are there
# (docs/gpu-runs.md), from the repo root:
#   source .gpu-carry/on-device.sh && export PYTHONPATH=/tmp/site-nixl:$PYTHONPATH && bash tests/gpu/batch_x4.sh a
#   (same machine)                                                                 ... batch_x4.sh b
# a: in parallel, two Labs side by side through CUDA_VISIBLE_DEVICES:
#    GPUs 0,1: PD 1P+1D (NIXL) vs colocated x1 vs colocated TP2, llama-3.1-8b shapes (dummy
#              weights), prefill-heavy, a rate sweep (labkit bench --rates);
#    GPUs 2,3: a PD pair over NIXL with a 256-token chunk, recorded; then the one-GPU Lab tests
#              on GPU 2 alone.
# b: a PD pair with TP=2 on each side (4 GPUs, NIXL), recorded.
set -u
T0=$(date +%s)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
W=${OUT:-/tmp/labkit-batch}; mkdir -p "$W"
at() { echo "$1 at +$(( $(date +%s) - T0 ))s"; }
if [ "${1:-a}" = a ]; then
  { nvidia-smi; nvidia-smi topo -m; date -u; nproc; } > "$W/machine.txt" 2>&1
  (
    CUDA_VISIBLE_DEVICES=0,1 timeout 540 python3 -m labkit.bench --mode vllm --num-gpus 2 \
      --model llama-3.1-8b --compare pd-vs-colocated --workload prefill-heavy \
      --rates 4,8,16,24 --num-requests 48 --ttft-slo-ms 500 --run-dir /tmp/lkb2 \
      --json "$W/pd_vs_colocated_2gpu.json" > "$W/bench2.txt" 2>&1
    at "bench rc=$?"
  ) &
  (
    CUDA_VISIBLE_DEVICES=2,3 timeout 200 python3 tests/gpu/record_toggles.py "$W" \
      real-h200x2-nixl-chunk256 num_gpus=2 connector=nixl chunk=256 > "$W/rec_chunk.txt" 2>&1
    at "record chunk256 rc=$?"
    CUDA_VISIBLE_DEVICES=2 OUT=$W timeout 300 python3 -m pytest -m gpu tests/gpu/test_lab_vllm.py \
      -k one_gpu -q -p no:cacheprovider -rA -o timeout=280 > "$W/t_one_gpu.log" 2>&1
    at "one_gpu rc=$?"
  ) &
  wait
  find /tmp/lkb2 -name '*.log' -size -4M | tar czf "$W/bench2-logs.tgz" -T - 2>/dev/null
  tail -n 14 "$W/bench2.txt" | cut -c1-260; tail -n 3 "$W/rec_chunk.txt"; tail -n 4 "$W/t_one_gpu.log"
else
  timeout 280 python3 tests/gpu/record_toggles.py "$W" real-h200x4-nixl-tp2 num_gpus=4 tp=2 \
    connector=nixl > "$W/rec_tp2.txt" 2>&1
  at "record tp2 rc=$?"
  tail -n 5 "$W/rec_tp2.txt"
fi
ls -la "$W"
