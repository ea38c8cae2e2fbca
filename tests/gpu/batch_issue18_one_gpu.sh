#!/usr/bin/env bash
# Issue 18 on ONE GPU (nvidia-h200 or nvidia-h100-x1): one device call after the vLLM chunks
# (docs/gpu-runs.md, 2026-12-05):
#   source .gpu-carry/on-device.sh && BATCH_BUDGET_S=540 bash tests/gpu/batch_issue18_one_gpu.sh
# Steps; each writes under $OUT/<step>/ (one tarball a step: the device tool brings back at most
# 8 files) and its figures into $OUT/summary.txt:
#   a  the product path after the refactor: pytest -m gpu tests/gpu/test_lab_vllm.py
#      -k one_gpu_lab_example_pair (Lab(mode="vllm"), ExampleConnector pair on one GPU)
#   d  the CPU tier (P4), beside a: tests/gpu/cpu_tier.py colocated (recorded), flag
#      (--kv-offloading-size alone), pd (ExampleConnector + OffloadingConnector, recorded)
#   c  relaunch on Apply (P7), alone on the GPU: python -m labkit.bench.relaunch (chunk, kv
#      dtype, TP: skipped on one GPU; the bare engine start if time is left)
#   b  observer overhead (P1): its two engines start beside a and d (fixed KV pools, no
#      profiling), its rounds wait for c to end and run alone, until the 95 % interval of the
#      throughput and ITL ratios is narrower than 2 % or the batch's time is up
# STEPS="c" (say) reruns one step on a warm machine. On a GPU under 100 GiB (H100), d's PD pair
# is left out and b's engines start only after a has finished (a's pair takes 0.4 + 0.4 of the
# GPU); c's first row (the initial start) then shares the host with b's engines starting.
set -u
T0=$(date +%s)
BUDGET=${BATCH_BUDGET_S:-540}
left() { echo $(( T0 + BUDGET - $(date +%s) )); }
at() { echo "+$(( $(date +%s) - T0 ))s"; }
STEPS=${STEPS:-"a d c b"}
has() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
FINAL=${OUT:-/tmp/labkit-batch}
W=/tmp/lk18
rm -rf "$W"; mkdir -p "$W"/a "$W"/b "$W"/c "$W"/d "$FINAL"
S=$W/summary.txt
{ nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; nproc
  python3 -c "import vllm, torch, sys; print('vllm', vllm.__version__, 'torch', torch.__version__, 'python', sys.version.split()[0])"
} > "$W/machine.txt" 2>&1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | sed 's/nvidia-//; s/-.*//')
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
echo "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1); $(nproc) cores; steps: $STEPS; budget ${BUDGET}s" | tee "$S"

A_PID=
if has a; then
  ( OUT=$W/a timeout 230 python3 -m pytest -m gpu tests/gpu/test_lab_vllm.py -k one_gpu_lab_example_pair \
      -q -p no:cacheprovider -o timeout=220 -rA --durations=0 > "$W/a/pytest.log" 2>&1
    echo "a rc=$? at $(at)" ) &
  A_PID=$!
fi
after_a() { if [ "${MEM:-0}" -lt 100000 ] && [ -n "$A_PID" ]; then while kill -0 "$A_PID" 2>/dev/null; do sleep 1; done; fi; }
if has d; then
  ( timeout 150 python3 tests/gpu/cpu_tier.py "$W/d" "real-$GPU-1gpu-cpu-tier" colocated > "$W/d/colocated.log" 2>&1
    echo "d colocated rc=$? at $(at)" ) &
  ( timeout 150 python3 tests/gpu/cpu_tier.py "$W/d" cpu-tier-flag flag > "$W/d/flag.log" 2>&1
    echo "d flag rc=$? at $(at)" ) &
  [ "${MEM:-0}" -lt 100000 ] || ( timeout 200 python3 tests/gpu/cpu_tier.py "$W/d" "real-$GPU-1gpu-cpu-tier-pd" pd > "$W/d/pd.log" 2>&1
    echo "d pd rc=$? at $(at)" ) &
fi
B_PID=
if has b; then
  ( after_a
    timeout $(( BUDGET + 30 )) python3 -m labkit.bench.observer_overhead --gpu 0 --requests 64 --prompt 512 \
      --output 64 --concurrency 16 --rounds 8 --ci-width 0.02 --max-rounds 200 --util 0.08 \
      --num-gpu-blocks 2048 --go-file "$W/b/go" --json "$W/b/observer_overhead.json" \
      --run-dir /tmp/lkruns/overhead > "$W/b/overhead.txt" 2> "$W/b/overhead.err"
    echo "b rc=$? at $(at)" ) &
  B_PID=$!
fi
# phase 1 ends when a and d are done (b's engines wait, idle, for their go file)
for j in $(jobs -p); do [ "$j" = "$B_PID" ] || wait "$j"; done
echo "phase 1 done at $(at), $(left)s left" | tee -a "$S"

if has c; then
  RES=15; has b && RES=${B_RESERVE_S:-115}   # b's rounds get at least ~90 s
  CB=$(( $(left) - RES ))
  [ "$CB" -gt 400 ] && CB=400
  timeout $(( CB + 20 )) python3 -m labkit.bench.relaunch --mode vllm --num-gpus 1 --connector example \
    --toggles chunk,kv-dtype,tp --baseline --budget-s "$CB" --json "$W/c/relaunch.json" \
    --run-dir /tmp/lkruns/relaunch > "$W/c/relaunch.txt" 2>&1
  echo "c rc=$? at $(at) (budget ${CB}s)" | tee -a "$S"
fi
if has b; then
  echo $(( $(left) - 25 )) > "$W/b/go"
  echo "b rounds start at $(at) with $(cat "$W/b/go")s" | tee -a "$S"
  wait "$B_PID"
fi

# results: one tarball a step (logs under 4 MB, JSON, text, recordings)
find /tmp/pytest-of-* -name '*.log' -size -4M > "$W/a.logs" 2>/dev/null
find /tmp/lkruns/overhead -name '*.log' -size -4M > "$W/b.logs" 2>/dev/null
find /tmp/lkruns/relaunch -name '*.log' -size -4M > "$W/c.logs" 2>/dev/null
: > "$W/d.logs"   # cpu_tier.py tars its own logs
for s in a b c d; do
  mkdir -p "$FINAL/$s"
  tar czf "$FINAL/$s/$s.tgz" -C "$W/$s" . -T "$W/$s.logs" 2>/dev/null
done
{ echo "== a"; grep -E "passed|failed|error" "$W/a/pytest.log" | tail -3
  python3 -c "import json; r=json.load(open('$W/a/lab_one_gpu.json')); print({k: r.get(k) for k in ('start_s','stop_s','decode_by_source','prefill_by_source','engine_blocks','pids_left','gpu_used_before_mib','gpu_used_after_mib','recording_bytes')})" 2>&1
  echo "== d"; for f in "$W"/d/*.json; do python3 - "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(sys.argv[1].rsplit('/', 1)[-1], 'start', r.get('start_s'), 'wall', r.get('wall_s'), 'rec', r.get('recording_bytes'),
      'A2 from CPU', r.get('a2_loaded_from_cpu_bytes'), 'err', (r.get('error') or '')[-300:])
for s in r.get('steps', []):
    print('  ', s['step'], 'ttft', s.get('ttft_s'), json.dumps(s['delta'])[:600])
print('   allocated', [(a['engine'][:3], a['external']) for a in r.get('allocated', [])])
PY
  done; cat "$W"/d/*-metrics.txt 2>/dev/null | head -40
  echo "== c"; cat "$W/c/relaunch.txt" | tail -12
  echo "== b"; cat "$W/b/overhead.txt"; tail -n 4 "$W/b/overhead.err"
} >> "$S" 2>&1
cp "$S" "$W/machine.txt" "$FINAL"/
ls -laR "$FINAL"
cat "$S" | cut -c1-400
echo "done at $(at)"
