#!/usr/bin/env bash
# One device call that proves the product path (see docs/gpu-runs.md), run from the repo root
# on the lent GPU machine after the vLLM chunks are there:
#   source .gpu-carry/on-device.sh && bash tests/gpu/batch_lab.sh
# Phase 1 (in parallel): GPU 0 = Lab(mode="vllm") pytest + `labkit demo --vllm`;
#                        GPU 1 = labkit.bench.observer_overhead (when a second GPU exists).
# Phase 2 (two GPUs): NIXL pair, colocated fp8 vs auto (+ the same workload), TP=2 engine.
# Everything lands in $OUT: results.tgz (JSON, logs) and the recordings (*.lkrec).
set -u
T0=$(date +%s)
BUDGET=${BATCH_BUDGET_S:-555}
left() { echo $(( T0 + BUDGET - $(date +%s) )); }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
FINAL=${OUT:-/tmp/labkit-batch}
W=/tmp/lkout; R=/tmp/lkruns
mkdir -p "$W" "$R" "$FINAL"
NGPU=$(nvidia-smi -L | wc -l)
{ nvidia-smi; nvidia-smi topo -m; date -u; nproc; } > "$W/machine.txt" 2>&1
python3 -c "import vllm, sys; print('vllm', vllm.__version__, 'python', sys.version.split()[0])
import importlib.util as u; print('nixl', u.find_spec('nixl') is not None)" > "$W/versions.txt" 2>&1
PYT="python3 -m pytest -m gpu tests/gpu/test_lab_vllm.py -q -p no:cacheprovider -rA --durations=0"

echo "phase 1 at +$(( $(date +%s) - T0 ))s, $NGPU GPU(s)"
(
  OUT=$W timeout 250 $PYT -k one_gpu -o timeout=240 > "$W/t_one_gpu.log" 2>&1
  echo "one_gpu rc=$? at +$(( $(date +%s) - T0 ))s"
  OUT=$W timeout 160 python3 -m labkit.cli demo --vllm --gpus 1 --connector example \
    --num-gpu-blocks 2048 --requests 12 --run-dir "$R/demo" > "$W/demo.txt" 2>&1
  echo "demo rc=$? at +$(( $(date +%s) - T0 ))s"
) &
A=$!
if [ "$NGPU" -ge 2 ]; then
  (
    timeout 240 python3 -m labkit.bench.observer_overhead --gpu 1 --requests 64 --prompt 512 \
      --output 64 --concurrency 16 --rounds 3 --json "$W/observer_overhead.json" \
      --run-dir "$R/overhead" > "$W/overhead.txt" 2>&1
    echo "overhead rc=$? at +$(( $(date +%s) - T0 ))s"
  ) &
fi
wait

if [ "$NGPU" -ge 2 ] && [ "$(left)" -gt 120 ]; then
  echo "phase 2 at +$(( $(date +%s) - T0 ))s, $(left)s left"
  OUT=$W timeout $(( $(left) - 10 )) $PYT -k two_gpu -o timeout=220 > "$W/t_two_gpu.log" 2>&1
  echo "two_gpu rc=$? at +$(( $(date +%s) - T0 ))s"
fi

# logs of every engine (no model dirs), JSON and text results; recordings beside the tarball
find /tmp/pytest-of-* "$R" -name '*.log' -size -4M 2>/dev/null | tar czf "$W/engine-logs.tgz" -T - 2>/dev/null
cp "$W"/*.lkrec "$FINAL"/ 2>/dev/null
tar czf "$FINAL/results.tgz" -C "$W" --exclude='*.lkrec' .
ls -la "$FINAL"
tail -n 25 "$W/t_one_gpu.log" "$W/t_two_gpu.log" "$W/overhead.txt" 2>/dev/null | cut -c1-300
echo "done at +$(( $(date +%s) - T0 ))s"
