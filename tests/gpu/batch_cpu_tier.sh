#!/usr/bin/env bash
# Issue 13/18 (P4): the CPU tier on real vLLM with the observer's host-tier events
# (HostTierSnapshot, OffloadTransfer), colocated and beside a PD connector, side by side
# (exact KV bytes, no memory profile):
#   source .gpu-carry/on-device.sh && bash tests/gpu/batch_cpu_tier.sh
# Brings back OUT/cpu.tgz (recordings, JSON, metrics, logs) and OUT/summary.txt.
set -u
T0=$(date +%s)
at() { echo "+$(( $(date +%s) - T0 ))s"; }
W=/tmp/bcpu; rm -rf "$W"; mkdir -p "$W" "${OUT:=/tmp/bcpu-out}"
S=$W/summary.txt
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LABKIT_OBSERVER_TRACE=1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | sed 's/nvidia-//; s/-.*//')
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u; } | tee "$S"
( timeout 240 python3 tests/gpu/cpu_tier.py "$W" "real-$GPU-1gpu-cpu-tier" colocated > "$W/colocated.out" 2>&1
  echo "colocated rc=$? at $(at)" | tee -a "$S" ) &
( timeout 300 python3 tests/gpu/cpu_tier.py "$W" "real-$GPU-1gpu-cpu-tier-pd" pd > "$W/pd.out" 2>&1
  echo "pd rc=$? at $(at)" | tee -a "$S" ) &
wait
{ tail -n 5 "$W"/*.out | cut -c1-1500
  python3 tests/gpu/count_events.py "$W"/*.lkrec
  for f in "$W"/*.lkrec; do timeout 120 python3 -m labkit.bench.conformance "$f" 2>&1 | grep -v "^    " | tail -n 12; done
  ls -la "$W"; } >> "$S" 2>&1
tar czf "$OUT/cpu.tgz" -C "$W" .
cp "$S" "$OUT/"
cat "$S"
echo "end at $(at)"
