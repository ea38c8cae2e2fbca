"""The fidelity harness over saved REAL vLLM runs (labkit/data/fidelity/): layouts with their
GPU counts, several real files in one table, the out-of-sample bench table."""
from __future__ import annotations

import json
from pathlib import Path

from labkit.bench import fidelity

DATA = Path(fidelity.__file__).resolve().parents[1] / "data" / "fidelity"
H200 = DATA / "real-h200-2026-11-21.json"
NIXL = DATA / "real-h200x2-nixl-2026-11-21.json"


def test_layouts_carry_their_gpus_and_pass_as_knobs():
    assert {n: lay.num_gpus for n, lay in fidelity.LAYOUTS.items()} == {
        "colocated": 1, "pd-example": 1, "pd-nixl": 2}

    assert dict(fidelity.LAYOUTS["pd-nixl"]) == {"connector": "nixl", "num_gpu_blocks": 16384}
    assert "num_gpus" not in dict(fidelity.LAYOUTS["colocated"])
    # Lab(**layout) plans what was measured (planning only: nothing starts)
    from labkit.lab import Lab

    connectors = {"colocated": None, "pd-example": "example", "pd-nixl": "nixl"}
    for name, layout in fidelity.LAYOUTS.items():
        lab = Lab(mode="sim", model="lab-1b", num_gpus=layout.num_gpus, **layout)
        assert lab.plan.connector == connectors[name] and lab.plan.num_gpus == layout.num_gpus
    assert [e.num_blocks for e in lab.plan.engines] == [16384, 16384]  # pd-nixl's override


def test_two_real_files_one_table_with_medians_per_file(tmp_path, capsys):
    assert fidelity.main(["--costs", "labkit/data/costs/h200.json", "--out", str(tmp_path),
                          "--real", str(H200), "--real", str(NIXL)]) == 0
    doc = json.loads((tmp_path / "fidelity.json").read_text())
    cases = [row["case"] for row in doc["table"]]
    assert cases == [f"{H200.stem}: {c}" for c in json.loads(H200.read_text())["real"]] + [
        f"{NIXL.stem}: pd-nixl/prefill-heavy", f"{NIXL.stem}: pd-nixl/decode-heavy"]
    assert doc["gpu_type"] == "h200"  # from the costs file
    # The 2-GPU NIXL pair ran on the simulator with both engines' counters, all equal to
    # vLLM's (tokens by source, prefix-cache queries/hits, preemptions, generated tokens).
    for row in doc["table"][-2:]:
        assert {k.split(".")[0] for k in row["counts"]} == {"prefill", "decode"}
        assert all(a == b for a, b in row["counts"].values()), row["counts"]
    text = (tmp_path / "fidelity.md").read_text()
    assert "(6 cases)" in text and f"{H200.stem}: " in text and f"{NIXL.stem}: " in text
    assert text in capsys.readouterr().out
    one = [r for r in doc["table"] if r["case"].startswith(NIXL.stem)]
    # the median |error| of TTFT p50 and TPOT p50 over the two cases, from real and sim
    errors = sorted(abs(r[m][1] - r[m][0]) / r[m][0] for r in one for m in ("ttft_p50", "tpot_p50"))
    assert len(errors) == 4
    assert f"{(errors[1] + errors[2]) / 2:.1%} (2 cases)" in text


def test_a_single_real_file_is_written_back_readable(tmp_path):
    assert fidelity.main(["--costs", "labkit/data/costs/h200.json", "--out", str(tmp_path),
                          "--real", str(NIXL)]) == 0
    doc = json.loads((tmp_path / "fidelity.json").read_text())
    assert set(doc["real"]) == set(doc["sim"]) == {"pd-nixl/prefill-heavy", "pd-nixl/decode-heavy"}
    assert fidelity.main(["--costs", "labkit/data/costs/h200.json", "--out", str(tmp_path / "again"),
                          "--real", str(tmp_path / "fidelity.json")]) == 0


def test_bench_table_matches_variants_and_reports_errors():
    from labkit.bench.compare import Variant, run_cluster
    from labkit.bench.workloads import rate_sweep

    real = json.loads((DATA / "bench-8b-h100-1gpu-2026-11-21.json").read_text())
    (wl,) = rate_sweep("prefill-heavy", 40, [2.0, 4.0, 8.0, 12.0])[:1]  # the bench's first rate
    got = [run_cluster(Variant(n, k), wl, model="llama-3.1-8b", gpu_type="h100", num_gpus=1)
           for n, k in (("PD 1P+1D", {}), ("colocated x1", {"colocated": True}))]
    sim = {"results": [{"variant": f"{r.variant} @ 2/s", "summary": r.summary} for r in got]}
    lines = fidelity.bench_table(real, sim).splitlines()
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| PD 1P+1D @ 2/s", "| colocated x1 @ 2/s"]
    r0 = real["results"][0]["summary"]["ttft"]["p50"]
    s0 = got[0].summary["ttft"]["p50"]
    assert f"{r0 * 1e3:.1f} / {s0 * 1e3:.1f} ({(s0 - r0) / r0:+.0%})" in lines[2]
    # ExampleConnector's whole-block rule gives decode exactly vLLM's external KV tokens.
    assert got[0].engine_side["kv_transfer_tokens"] == real["results"][0]["engine_side"]["kv_transfer_tokens"]


LEASE = DATA / "real-h200x4-lease-2026-11-21.json"
COLOC_8B = DATA / "real-h200x4-llama-3.1-8b-colocated-2026-11-21.json"
COSTS_H200X4 = Path(fidelity.__file__).resolve().parents[1] / "data" / "calibration" / \
    "h200x4-costs-2026-11-21.json"


def test_phase_spans_are_medians_of_the_proxy_events_and_skip_missing_ones():
    def req(arrival, ps, pe, ks, ft):
        return {"arrival": arrival, "prefill_start": ps, "prefill_end": pe,
                "kv_transfer_start": ks, "first_token": ft, "finish": ft + 1}

    phases = [req(0.0, 0.001, 0.021, 0.022, 0.060), req(1.0, 1.0, 1.030, 1.031, 1.100),
              req(2.0, 2.0, 2.010, 2.010, 2.040),
              {**req(3.0, 3.0, 3.5, 3.5, 3.9), "first_token": None}]  # never answered
    got = fidelity.phase_spans(phases)
    assert abs(got["prefill_side"] - 0.025) < 1e-9  # 20, 30, 10 and 500 ms (it did prefill)
    assert abs(got["decode_side"] - 0.038) < 1e-9  # 38, 69, 30 ms; the unanswered one left out
    assert abs(got["proxy_ttft"] - 0.060) < 1e-9
    assert all(v != v for v in fidelity.phase_spans([]).values())  # nan without requests


def test_pd_cases_get_a_phase_table_from_the_simulated_proxy_events(tmp_path, capsys):
    costs = json.loads(COSTS_H200X4.read_text())
    hop = costs["calibration"]["api_latency_s"]
    assert fidelity.main(["--costs", str(COSTS_H200X4), "--out", str(tmp_path),
                          "--real", str(LEASE)]) == 0
    doc = json.loads((tmp_path / "fidelity.json").read_text())
    out = capsys.readouterr().out
    pd_cases = [k for k in doc["real"] if not k.startswith("colocated")]
    assert pd_cases and all("phases" not in doc["sim"][k] for k in doc["real"] if k not in pd_cases)
    rows = out.split("PD phases")[1].strip().splitlines()[3:]
    assert [r.split(" | ")[0] for r in rows] == [f"| {k}" for k in pd_cases]
    for key, row in zip(pd_cases, rows, strict=True):
        sim = doc["sim"][key]
        real = fidelity.phase_spans(doc["real"][key]["phases"])
        assert row.split(" | ")[1].startswith(f"{real['prefill_side'] * 1e3:.1f} / ")
        assert len(sim["phases"]) == len(doc["real"][key]["records"])
        for p in sim["phases"]:  # decode is called when prefill answers; the hop sits inside
            assert p["kv_transfer_start"] == p["prefill_end"] and p["prefill_start"] == p["arrival"]
            assert p["prefill_end"] - p["prefill_start"] > hop
            assert p["first_token"] - p["kv_transfer_start"] > hop
        spans = fidelity.phase_spans(sim["phases"])
        # The simulated client sees the router's first token: the same TTFT median.
        assert abs(spans["proxy_ttft"] - sim["timing"]["ttft_p50"]) < 1e-12
        assert f"{spans['decode_side'] * 1e3:.1f} ms" in row.split(" | ")[2]


def test_no_phase_table_without_pd_phases(tmp_path, capsys):
    assert fidelity.main(["--costs", str(COSTS_H200X4), "--out", str(tmp_path),
                          "--real", str(COLOC_8B)]) == 0
    assert "PD phases" not in capsys.readouterr().out
    assert fidelity.phase_table({"a/b": {"timing": {}}}, {"a/b": {"phases": [{}]}}) == ""
