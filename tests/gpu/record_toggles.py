"""Record two short REAL PD sessions on one GPU for the lab's shipped recordings: a small
chunk size (256 tokens: chunked prefill visible) and an fp8 KV cache (twice the blocks).

    source .gpu-carry/on-device.sh && PYTHONPATH=$PWD python3 tests/gpu/record_toggles.py $OUT
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from labkit.bench.record_session import record_demo_session

VARIANTS = {
    "real-h200-1gpu-chunk256": {"chunk": 256},
    "real-h200-1gpu-fp8": {"kv_cache_dtype": "fp8"},
}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    for name, knobs in VARIANTS.items():
        t0 = time.time()
        path = record_demo_session(out / f"{name}.lkrec", mode="vllm", duration_s=14,
                                   model="lab-1b", num_gpus=1, connector="example", **knobs)
        print(f"{name}: {path.stat().st_size} B in {time.time() - t0:.0f} s", flush=True)
