#!/usr/bin/env bash
# Issues 13 and 18, third one-GPU batch (vLLM bundle WITH nixl: three chunks):
#   source .gpu-carry/on-device.sh && BATCH_BUDGET_S=560 bash tests/gpu/batch_issue18_third.sh
# a  conformance traces with preemption, one process per case, side by side (exact KV bytes,
#    no memory profile): tests/gpu/record_conformance.py preempt-async preempt-sync
#    prefix-evict abort-prefill pd-decode-preempt
# c  beside a: the CPU tier with the observer's host-tier events, colocated and beside the
#    ExampleConnector (tests/gpu/cpu_tier.py; exact KV bytes too)
# b  re-record the shipped one-GPU recordings, one Lab at a time (alone on the GPU: each engine
#    profiles memory), with LABKIT_OBSERVER_TRACE=1 (prompt ids in the recording, so the
#    conformance harness can replay them): NIXL with a 256-token chunk (a real NIXL decode
#    engine's trace), the ExampleConnector pair, the same with an fp8 KV cache
# Brings back: OUT/a.tgz (traces + logs), OUT/b.tgz (recordings + engine logs), OUT/c.tgz
# (CPU-tier recordings, JSON, metrics, logs), OUT/summary.txt
set -u
T0=$(date +%s)
BUDGET=${BATCH_BUDGET_S:-560}
left() { echo $(( T0 + BUDGET - $(date +%s) )); }
at() { echo "+$(( $(date +%s) - T0 ))s"; }
W=/tmp/b18t; rm -rf "$W"; mkdir -p "$W/a" "$W/b" "$W/c" "${OUT:=/tmp/b18t-out}"
S=$W/summary.txt
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LABKIT_OBSERVER_TRACE=1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | sed 's/nvidia-//; s/-.*//')
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; date -u
  python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  python3 -c "import nixl; print('nixl ok')" 2>&1 | tail -1; } | tee "$S"

for c in preempt-async preempt-sync prefix-evict abort-prefill pd-decode-preempt; do
  ( timeout 300 python3 tests/gpu/record_conformance.py "$W/a" "$c" > "$W/a/$c.out" 2>&1
    echo "a $c rc=$? at $(at)" | tee -a "$S" ) &
done
( timeout 240 python3 tests/gpu/cpu_tier.py "$W/c" "real-$GPU-1gpu-cpu-tier" colocated > "$W/c/colocated.out" 2>&1
  echo "c colocated rc=$? at $(at)" | tee -a "$S" ) &
( timeout 300 python3 tests/gpu/cpu_tier.py "$W/c" "real-$GPU-1gpu-cpu-tier-pd" pd > "$W/c/pd.out" 2>&1
  echo "c pd rc=$? at $(at)" | tee -a "$S" ) &
wait
echo "a+c done at $(at), $(left)s left" | tee -a "$S"

rec() {  # name, then Lab keywords
  local name=$1; shift
  if [ "$(left)" -lt 140 ]; then echo "b $name not run: $(left)s left" | tee -a "$S"; return; fi
  timeout $(( $(left) - 15 )) python3 tests/gpu/record_toggles.py "$W/b" "$name" "$@" > "$W/b/$name.out" 2>&1
  echo "b $name rc=$? at $(at)" | tee -a "$S"
}
rec "real-$GPU-1gpu-nixl-chunk256" num_gpus=1 connector=nixl max_num_batched_tokens=256
rec "real-$GPU-1gpu-example" num_gpus=1 connector=example
rec "real-$GPU-1gpu-fp8" num_gpus=1 connector=example kv_cache_dtype=fp8

{ echo "== a"; tail -n 2 "$W"/a/*.out; ls -la "$W"/a
  for f in "$W"/a/conformance-*.lkrec; do
    [ -f "$f" ] && timeout 120 python3 -m labkit.bench.conformance "$f" 2>&1 | tail -n 8
  done
  echo "== c"; tail -n 3 "$W"/c/*.out | cut -c1-1500
  python3 tests/gpu/count_events.py "$W"/c/*.lkrec
  echo "== b"; tail -n 3 "$W"/b/*.out; ls -la "$W"/b
  python3 tests/gpu/count_events.py "$W"/b/*.lkrec
  for f in "$W"/b/*.lkrec; do
    [ -f "$f" ] && timeout 120 python3 -m labkit.bench.conformance "$f" 2>&1 | tail -n 8
  done
} >> "$S" 2>&1
tar czf "$OUT/a.tgz" -C "$W/a" .
tar czf "$OUT/b.tgz" -C "$W/b" .
tar czf "$OUT/c.tgz" -C "$W/c" .
cp "$S" "$OUT/"
cut -c1-300 "$S"
echo "end at $(at)"
