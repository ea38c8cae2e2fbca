"""Calibration probes (and the fidelity workloads, colocated) on REAL vLLM for another model.

    source .gpu-carry/on-device.sh && PYTHONPATH=$PWD python3 tests/gpu/calibrate_model.py $OUT llama-3.1-8b

Writes OUT/<gpu>-<model>.json (the costs fitted to this model alone, probes included) and
OUT/fidelity-<model>-colocated.json ({"real": ...} as labkit.bench.fidelity reads). Two models
with different layer counts separate a per-step launch cost from a per-layer one.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from labkit import hardware
from labkit.bench import fidelity
from labkit.bench.calibrate import calibrate
from labkit.lab import Lab
from labkit.plan import detect

if __name__ == "__main__":
    out, model = Path(sys.argv[1]), sys.argv[2]
    gpu_key = hardware.gpu_type_for(detect().gpus[0].name).key
    with Lab(mode="vllm", num_gpus=1, observe=False, model=model, colocated=True,
             num_gpu_blocks=16384, run_dir=tempfile.mkdtemp()) as lab:
        costs = calibrate(lab, gpu_key, out / f"{gpu_key}-{model}.json")
        real = fidelity.measure_lab(lab, "colocated", fidelity.workloads(40))
    (out / f"fidelity-{model}-colocated.json").write_text(json.dumps({"real": real}, default=str))
    cal = costs["calibration"]
    print(json.dumps({k: v for k, v in costs.items() if k not in ("calibration", "memory")}))
    print("rms", cal["rms_rel_error"], "api", cal["api_latency_s"])
    for p in cal["probes"]:
        print(p)
