#!/usr/bin/env bash
# Issue 13's preemption traces and issue 18's CPU tier, the lean batch (vLLM bundle without
# nixl: two chunks; nothing here uses NIXL):
#   source .gpu-carry/on-device.sh && BATCH_BUDGET_S=300 bash tests/gpu/batch_issue13_traces.sh
# a  conformance traces, one process per case, side by side (exact KV bytes, no memory
#    profile): preempt-async preempt-sync prefix-evict abort-prefill pd-decode-preempt
# c  beside a: the CPU tier with the observer's host-tier events, colocated and beside the
#    ExampleConnector (tests/gpu/cpu_tier.py)
# Brings back OUT/a.tgz, OUT/c.tgz, OUT/summary.txt. The conformance harness is run here,
# not on the device (python -m labkit.bench.conformance on the .lkrec files).
set -u
T0=$(date +%s)
BUDGET=${BATCH_BUDGET_S:-300}
at() { echo "+$(( $(date +%s) - T0 ))s"; }
W=/tmp/b13; rm -rf "$W"; mkdir -p "$W/a" "$W/c" "${OUT:=/tmp/b13-out}"
S=$W/summary.txt
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LABKIT_OBSERVER_TRACE=1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | sed 's/nvidia-//; s/-.*//')
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; date -u
  python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"; } | tee "$S"
LIM=$(( BUDGET - 25 ))
for c in preempt-async preempt-sync prefix-evict abort-prefill pd-decode-preempt; do
  ( timeout $LIM python3 tests/gpu/record_conformance.py "$W/a" "$c" > "$W/a/$c.out" 2>&1
    echo "a $c rc=$? at $(at)" | tee -a "$S" ) &
done
( timeout $LIM python3 tests/gpu/cpu_tier.py "$W/c" "real-$GPU-1gpu-cpu-tier" colocated > "$W/c/colocated.out" 2>&1
  echo "c colocated rc=$? at $(at)" | tee -a "$S" ) &
( timeout $LIM python3 tests/gpu/cpu_tier.py "$W/c" "real-$GPU-1gpu-cpu-tier-pd" pd > "$W/c/pd.out" 2>&1
  echo "c pd rc=$? at $(at)" | tee -a "$S" ) &
wait
{ echo "== a"; tail -n 2 "$W"/a/*.out | cut -c1-400; ls -la "$W"/a
  echo "== c"; tail -n 3 "$W"/c/*.out | cut -c1-1500
  timeout 20 python3 tests/gpu/count_events.py "$W"/c/*.lkrec; } >> "$S" 2>&1
tar czf "$OUT/a.tgz" -C "$W/a" .
tar czf "$OUT/c.tgz" -C "$W/c" .
cp "$S" "$OUT/"
cut -c1-300 "$S"
echo "end at $(at)"
