"""Calibrate the simulator on REAL vLLM, then measure its fidelity with the fresh constants.

One colocated `Lab(mode="vllm", num_gpus=1)` serves the calibration probes and then the
fidelity workloads (one start saved); a PD pair on the same GPU (ExampleConnector) runs the
same workloads; the simulated side runs in-process. Everything lands in $OUT:
h200.json (the fitted costs file), fidelity.json, fidelity.md, calibrate.md.
"""

from __future__ import annotations

import json
import math

import pytest
from _support import out_dir

pytestmark = pytest.mark.gpu


def test_calibrate_then_fidelity(tmp_path):
    from labkit import hardware
    from labkit.bench import fidelity
    from labkit.bench.calibrate import Probe, calibrate, format_probes
    from labkit.lab import Lab
    from labkit.plan import detect

    out = out_dir()
    gpu_key = hardware.gpu_type_for(detect().gpus[0].name).key
    wls = fidelity.workloads(40)
    costs_path = out / f"{gpu_key}.json"
    with Lab(mode="vllm", num_gpus=1, observe=False, run_dir=tmp_path / "colocated",
             **fidelity.LAYOUTS["colocated"]) as lab:
        costs = calibrate(lab, gpu_key, costs_path)
        real = fidelity.measure_lab(lab, "colocated", wls)
    cal = costs["calibration"]
    (out / "calibrate.md").write_text(format_probes([Probe(**p) for p in cal["probes"]]) + "\n")
    print(json.dumps({k: v for k, v in costs.items() if k != "calibration"}, indent=1))
    print((out / "calibrate.md").read_text(), "api_latency_s", cal["api_latency_s"])
    (out / "fidelity.json").write_text(json.dumps({"real": real, "costs": costs}, default=str))
    real.update(fidelity.run_real("pd-example", wls, run_dir=tmp_path / "pd"))
    (out / "fidelity.json").write_text(json.dumps({"real": real, "costs": costs}, default=str))
    sim = {}
    for layout in fidelity.LAYOUTS:
        sim.update(fidelity.run_sim(layout, wls, costs, gpu_key))
    table = fidelity.rows(real, sim)
    text = fidelity.format_table(table)
    err = fidelity.median_abs_error(table)
    (out / "fidelity.md").write_text(text + f"\n\nmedian |error| of the medians: {err:.1%}\n")
    (out / "fidelity.json").write_text(json.dumps({"real": real, "sim": sim, "table": table,
                                                   "costs": costs}, default=str))
    print(text, f"\nmedian |error| {err:.1%}")

    assert costs["calibrated"] is True and costs["gpu"] == gpu_key
    assert all(p["measured_s"] > 0 for p in cal["probes"])
    assert all(0 < costs[k] <= 1 for k in ("matmul_efficiency", "memory_efficiency"))
    assert cal["rms_rel_error"] < 0.5, cal["rms_rel_error"]  # the model shape fits the probes
    for key, r in real.items():
        assert r["timing"]["num_ok"] == len(wls[0]), key  # every request finished
        assert not math.isnan(r["timing"]["ttft_p50"])
