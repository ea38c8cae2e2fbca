"""Calibration fit and fidelity arithmetic (CPU): the fit must recover constants the cost
model itself generated, the costs file must be what the cost model reads, and the fidelity
table must compute its errors and counts from both sides."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from labkit import hardware
from labkit.bench import fidelity
from labkit.bench.calibrate import (
    EFFS,
    Probe,
    cost_json,
    fit,
    format_probes,
    main,
    probe_steps,
    synthetic_probes,
)
from labkit.bench.loadgen import RequestResult
from labkit.engines.sim.cost_model import COSTS_DIR, CostModel, CostParams, load_cost_params
from labkit.models import get_model

GPU = hardware.GPU_TYPES["h200"]
MODEL = get_model("lab-1b")
H200_JSON = COSTS_DIR / "h200.json"


@pytest.mark.parametrize("truth", [
    dict(matmul_efficiency=0.45, attention_efficiency=0.3, memory_efficiency=0.55,
         step_overhead_s=0.004, per_request_overhead_s=2e-5, api=0.003),
    dict(matmul_efficiency=0.8, attention_efficiency=0.5, memory_efficiency=0.35,
         step_overhead_s=0.0015, per_request_overhead_s=6e-5, api=0.008),
])
def test_fit_recovers_constants_of_synthetic_probes(truth):
    api = truth.pop("api")
    params = replace(CostParams(gpu="h200"), **truth)
    probes = synthetic_probes(params, MODEL, GPU, 8192, api)
    f = fit(probes, MODEL, GPU, 8192, base=CostParams(gpu="h200"))
    for k, v in truth.items():
        assert getattr(f.params, k) == pytest.approx(v, rel=0.03), k
    assert f.api_latency_s == pytest.approx(api, rel=0.03)
    assert f.rms_rel_error < 0.005
    assert f.params.calibrated


def test_fit_reports_a_misfit_the_model_cannot_explain():
    probes = synthetic_probes(CostParams(gpu="h200"), MODEL, GPU, 8192, 0.004)
    probes[3].measured_s *= 2.0  # one probe far off the roofline
    f = fit(probes, MODEL, GPU, 8192)
    assert f.rms_rel_error > 0.05
    assert "| prefill 2048 tok (TTFT) |" in format_probes(f)


def test_probe_steps_follow_the_chunk():
    steps = probe_steps(Probe("prefill", 5000), 2048)
    assert [s[0] for s in steps] == [2048, 2048, 904]
    assert sum(s[3] for s in steps) == 5000 * 5001 // 2  # causal pairs of the whole prompt
    assert steps[-1][2] == 5000
    (d,) = probe_steps(Probe("decode", 64, batch=32, output_len=64), 2048)
    assert d[:2] == (32, 32) and d[2] == 32 * 96


def test_costs_json_round_trips_into_the_cost_model(tmp_path):
    truth = replace(CostParams(gpu="h200"), matmul_efficiency=0.7, memory_efficiency=0.9,
                    step_overhead_s=0.005)
    f = fit(synthetic_probes(truth, MODEL, GPU, 8192, 0.004), MODEL, GPU, 8192)
    raw = cost_json(f, "h200", device="test", vllm_version="0", chunk=8192,
                    base_raw={"memory": {"non_torch_bytes": 1}, "comm_efficiency": 0.5})
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(raw))
    back = json.loads(path.read_text())
    params = CostParams(**{k: v for k, v in back.items() if k in CostParams.__dataclass_fields__})
    assert params.calibrated and params.memory == {"non_torch_bytes": 1}
    assert params.comm_efficiency == 0.5  # fields the fit does not own are kept
    for k in EFFS:
        assert getattr(params, k) == pytest.approx(getattr(f.params, k), rel=1e-4)
    p = back["calibration"]["probes"][0]
    t = CostModel(MODEL, GPU, params=params).step_time(*probe_steps(Probe(**p), 8192)[0])
    assert t + back["calibration"]["api_latency_s"] == pytest.approx(p["measured_s"], rel=0.01)


def test_committed_h200_costs_are_calibrated_and_consistent():
    """The shipped h200.json: read by the cost model; its probe predictions are the model's."""
    params = load_cost_params("h200")
    assert params.calibrated
    raw = json.loads(H200_JSON.read_text())
    cal = raw["calibration"]
    models = {p.get("model", "lab-1b") for p in cal["probes"]}
    assert models == {"lab-1b", "llama-3.1-8b"} and params.per_layer_overhead_s > 0
    for p in cal["probes"]:
        pr = Probe(**p)
        cm = CostModel(get_model(pr.model or "lab-1b"), GPU, params=params)
        t = sum(cm.step_time(*s) for s in probe_steps(pr, cal["max_num_batched_tokens"]))
        t += cal["api_latency_s"] if pr.kind == "prefill" else 0.0
        assert t == pytest.approx(pr.predicted_s, rel=1e-3)
        assert abs(pr.predicted_s - pr.measured_s) / pr.measured_s < 0.25


def test_main_needs_an_output_path():
    with pytest.raises(SystemExit):
        main(["--gpu-type", "h200"])


# ------------------------------------------------------------------ fidelity arithmetic
def _rec(i: int, ttft: float, itl: float, n: int) -> RequestResult:
    toks = [ttft + k * itl for k in range(n)]
    return RequestResult(i, 0.0, 100, n, sent=0.0, first_token=ttft, token_times=toks,
                         finish=toks[-1], num_output_tokens=n)


def test_timing_and_errors():
    recs = [_rec(i, 0.01 * (i + 1), 0.005, 11) for i in range(10)]
    recs.append(RequestResult(10, 0.0, 5, 5, error="boom"))
    t = fidelity.timing(recs)
    assert t["num_ok"] == 10
    assert t["ttft_p50"] == pytest.approx(0.055)
    assert t["ttft_p90"] == pytest.approx(0.091)
    assert t["tpot_p50"] == pytest.approx(0.005)
    assert fidelity.rel_error(1.1, 1.0) == pytest.approx(0.1)
    assert math.isnan(fidelity.rel_error(1.0, 0.0))
    real = {"a/w": {"timing": t, "counts": {"colocated": {"prefix_hits": 5.0}}}}
    sim_t = {**t, "ttft_p50": t["ttft_p50"] * 1.2, "tpot_p50": t["tpot_p50"] * 0.9}
    sim = {"a/w": {"timing": sim_t, "counts": {"colocated": {"prefix_hits": 4.0}}}}
    (row,) = fidelity.rows(real, sim)
    assert row["ttft_p50"][2] == pytest.approx(0.2)
    assert row["tpot_p50"][2] == pytest.approx(-0.1)
    assert row["counts"]["colocated.prefix_hits"] == (5.0, 4.0)
    assert fidelity.median_abs_error([row]) == pytest.approx(0.15)
    text = fidelity.format_table([row])
    assert "| a/w | colocated.prefix_hits | 5 | 4 | no |" in text
    assert "(+20%)" in text


def test_sim_side_counts_match_the_workload(tmp_path):
    costs = json.loads(H200_JSON.read_text())
    wls = fidelity.workloads(12)
    out = fidelity.run_sim("pd-example", wls, costs)
    for wl in wls:
        c = out[f"pd-example/{wl.name}"]["counts"]
        prompt = sum(r.prompt_len for r in wl.requests)
        assert c["prefill"]["prompt_local_compute"] == prompt
        ext = c["decode"]["prompt_external_kv_transfer"]
        # decode gets whole blocks over the connector and computes the rest
        assert 0 < ext < prompt and ext % 16 == 0
        assert ext + c["decode"]["prompt_local_compute"] == prompt
        assert c["decode"]["generation_tokens"] == sum(r.output_len for r in wl.requests)
        assert out[f"pd-example/{wl.name}"]["timing"]["num_ok"] == len(wl)
    # the CLI's --real path: the sim against itself is exact
    (tmp_path / "real.json").write_text(json.dumps({"real": out}))
    assert fidelity.main(["--costs", str(H200_JSON),
                          "--real", str(tmp_path / "real.json"), "--layouts", "pd-example",
                          "--requests", "12", "--out", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "fidelity.json").read_text())["table"]
    assert all(row["ttft_p50"][2] == 0 and row["tpot_p90"][2] == 0 for row in table)


def test_fit_over_two_models_separates_per_step_and_per_layer_launch_cost():
    """Probes of a 16- and a 32-layer model generated with a + b * layers: the joint fit
    recovers a and b (one model alone cannot: its fit puts b's share into a)."""
    truth = replace(CostParams(gpu="h200"), matmul_efficiency=0.85, attention_efficiency=0.3,
                    memory_efficiency=0.9, step_overhead_s=0.0015, per_layer_overhead_s=2.2e-4,
                    per_request_overhead_s=1e-5)
    big = get_model("llama-3.1-8b")
    probes = (synthetic_probes(truth, MODEL, GPU, 8192, 0.0045, name="lab-1b")
              + synthetic_probes(truth, big, GPU, 8192, 0.0045, name="llama-3.1-8b"))
    f = fit(probes, MODEL, GPU, 8192, base=CostParams(gpu="h200"),
            models={"lab-1b": MODEL, "llama-3.1-8b": big})
    assert f.params.step_overhead_s == pytest.approx(0.0015, rel=0.05)
    assert f.params.per_layer_overhead_s == pytest.approx(2.2e-4, rel=0.03)
    assert f.params.matmul_efficiency == pytest.approx(0.85, rel=0.03)
    assert set(f.rms_by_model) == {"lab-1b", "llama-3.1-8b"} and f.rms_rel_error < 0.01
    alone = fit(probes[:12], MODEL, GPU, 8192, base=CostParams(gpu="h200"))
    assert alone.params.per_layer_overhead_s == 0.0
    assert alone.params.step_overhead_s == pytest.approx(0.0015 + 16 * 2.2e-4, rel=0.05)


def test_refit_from_stored_probe_files_writes_per_layer_cost(tmp_path):
    """`--probes` refits from stored probe sets without a GPU; the output records its sources
    and the error per model, and the cost model adds the per-layer launch cost per layer."""
    out = tmp_path / "h200.json"
    src = "labkit/data/calibration/h200-llama-3.1-8b-2026-11-21.json"
    root = COSTS_DIR.parents[2]
    assert main(["--gpu-type", "h200", "--out", str(out), "--probes", str(H200_JSON),
                 "--probes", f"{root / src}=llama-3.1-8b"]) == 0
    raw = json.loads(out.read_text())
    cal = raw["calibration"]
    assert set(cal["rms_rel_error_by_model"]) == {"lab-1b", "llama-3.1-8b"}
    assert len(cal["probe_files"]) == 2 and raw["per_layer_overhead_s"] > 0
    assert len(cal["probes"]) == 24  # the shipped file's own probes are not counted twice
    params = CostParams(**{k: v for k, v in raw.items() if k in CostParams.__dataclass_fields__})
    small = CostModel(MODEL, GPU, params=params).step_parts(1, 1, 64.0, 64.0)[0]
    large = CostModel(get_model("llama-3.1-8b"), GPU, params=params).step_parts(1, 1, 64.0, 64.0)[0]
    assert large - small == pytest.approx(16 * params.per_layer_overhead_s)
