"""The REAL side of the fidelity workloads for one layout, proxy phases included.

    source .gpu-carry/on-device.sh && PYTHONPATH=$PWD python3 tests/gpu/fidelity_real.py pd-nixl $OUT

Writes OUT/fidelity-<layout>.json ({"real": ...}, as `python -m labkit.bench.fidelity --real`
reads). Run the layouts side by side on one machine with CUDA_VISIBLE_DEVICES (tests/gpu/batch_fidelity.sh).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from labkit.bench import fidelity

if __name__ == "__main__":
    layout, out = sys.argv[1], Path(sys.argv[2])
    real = fidelity.run_real(layout, fidelity.workloads(40), run_dir=tempfile.mkdtemp())
    (out / f"fidelity-{layout}.json").write_text(json.dumps({"real": real}, default=str))
