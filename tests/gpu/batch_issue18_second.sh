#!/usr/bin/env bash
# Issue 18, second one-GPU batch (after the first found wait_connected timing out on vLLM):
#   source .gpu-carry/on-device.sh && BATCH_BUDGET_S=560 bash tests/gpu/batch_issue18_second.sh
# a  conformance traces: tests/gpu/record_conformance.py, one process per case, side by side
#    (exact KV bytes: no memory profile), OUT/conf/conformance-<case>.lkrec
# b  tests/gpu/test_observer_drops_vllm.py (PD pair, ExampleConnector) beside a; its JSON has
#    the telemetry phase of Lab.start (wait_connected) and the readers still missing
# c  if time remains: the kv-dtype Apply of labkit.bench.relaunch, alone on the GPU
# At most 8 files come back: 5 traces, 2 JSON, logs.tgz.
set -u
T0=$(date +%s)
BUDGET=${BATCH_BUDGET_S:-560}
left() { echo $(( T0 + BUDGET - $(date +%s) )); }
at() { echo "+$(( $(date +%s) - T0 ))s"; }
W=/tmp/b18s; rm -rf "$W"; mkdir -p "$W/a" "$W/b" "$W/c" "$OUT/conf" "$OUT/b" "$OUT/c"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$W/gpu.txt"
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"

for c in preempt-async preempt-sync prefix-evict abort-prefill chunked-long; do
  ( timeout 300 python3 tests/gpu/record_conformance.py "$W/a" "$c" > "$W/a/$c.out" 2>&1
    echo "a $c rc=$? at $(at)" ) &
done
( OUT=$W/b timeout 330 python3 -m pytest -m gpu tests/gpu/test_observer_drops_vllm.py -q \
    -p no:cacheprovider -rA > "$W/b/pytest.log" 2>&1
  echo "b rc=$? at $(at)" ) &
wait
echo "a+b done at $(at), $(left)s left"

CB=$(( $(left) - 20 ))
if [ "$CB" -gt 150 ]; then
  timeout "$CB" python3 -m labkit.bench.relaunch --mode vllm --num-gpus 1 --connector example \
    --toggles kv-dtype --budget-s $(( CB - 15 )) --json "$W/c/relaunch.json" \
    --run-dir /tmp/lkruns/relaunch > "$W/c/relaunch.txt" 2>&1
  echo "c rc=$? at $(at) (budget ${CB}s)"
else
  echo "c not run: ${CB}s left"
fi

cp "$W"/a/conformance-*.lkrec "$OUT/conf/" 2>/dev/null
cp "$W/b/observer_drops.json" "$OUT/b/" 2>/dev/null
cp "$W/c/relaunch.json" "$OUT/c/" 2>/dev/null
find /tmp/lkruns/relaunch -name '*.log' -size -4M > "$W/c.logs" 2>/dev/null
tar -czf "$OUT/logs.tgz" --exclude='*.lkrec' -C / "${W#/}" -T "$W/c.logs" 2>/dev/null
ls -la "$OUT"/* ; echo "== a"; tail -n 3 "$W"/a/*.out; ls "$W"/a
echo "== b"; tail -n 15 "$W/b/pytest.log"
python3 - "$W/b/observer_drops.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    print({k: r.get(k) for k in ("telemetry_connect_s", "telemetry_missing", "kv_peers",
                                 "observer_drops", "unpolled", "subscriber_dropped")})
    print("stages", [(s, round(t - r["stages"][0][1], 2)) for s, t in r.get("stages", [])])
except Exception as e:
    print("no drops json:", e)
PY
echo "== c"; tail -n 14 "$W/c/relaunch.txt" 2>/dev/null
echo "end at $(at)"
