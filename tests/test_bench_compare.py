"""Comparisons on the in-process SimCluster, and the CLI that prints them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from labkit.bench import workloads as wl
from labkit.bench.__main__ import main
from labkit.bench.compare import compare, run_cluster, variants
from labkit.bench.report import SLO, format_table

pytestmark = pytest.mark.timeout(60)


def test_pd_vs_colocated_table_and_kv_transfer_only_for_pd() -> None:
    w = wl.prefill_heavy(120, rate=8.0, seed=1)
    res = compare("pd-vs-colocated", w, engine="cluster", model="llama-3.1-8b", slo=SLO(0.5, 0.05))
    names = [r.variant for r in res]
    assert names == ["PD 1P+1D", "colocated x1", "colocated x2 (DP)", "colocated TP2"]
    by = {r.variant: r for r in res}
    for r in res:
        assert r.kind == "sim" and r.engine == "cluster"
        assert r.summary["num_ok"] == 120 and len(r.records) == 120
        assert sorted(x.index for x in r.records) == list(range(120))
        for x in r.records:
            assert x.ttft is not None and 0 < x.ttft < x.e2e
            assert x.num_output_tokens == x.output_len
            assert len(x.token_times) == x.output_len  # one timed token per output token
    pd = by["PD 1P+1D"].engine_side
    # decode receives every prompt token it does not have (NIXL pull, no shared prefixes)
    assert pd["kv_transfer_tokens"] == sum(r.prompt_len for r in w.requests)
    assert pd["kv_transfer_bytes"] > 0
    assert by["colocated x1"].engine_side["kv_transfer_tokens"] == 0
    assert by["colocated x2 (DP)"].engine_side["kv_transfer_tokens"] == 0
    assert by["colocated TP2"].num_gpus == 2 and by["colocated TP2"].engine_side["kv_transfer_tokens"] == 0
    # colocated prefills stall the decodes batched with them: the ITL tail is PD's to win
    assert by["PD 1P+1D"].summary["itl"]["p99"] < by["colocated x1"].summary["itl"]["p99"]
    # PD pays the KV hop in TTFT at light load
    assert by["PD 1P+1D"].summary["ttft"]["p50"] > by["colocated x2 (DP)"].summary["ttft"]["p50"]
    table = format_table(res).splitlines()
    assert table[0].startswith("SIMULATED") and "SimCluster" in table[0]
    assert [line.split("  ")[0].strip() for line in table[-4:]] == names


def test_rate_sweep_rows_rate_by_rate_and_one_gpu_drops_multi_gpu_variants() -> None:
    sweep = wl.rate_sweep("prefill-heavy", 30, [2.0, 20.0], seed=3)
    res = compare("pd-vs-colocated", sweep, engine="cluster", num_gpus=1, slo=SLO(0.5, 0.05))
    assert [r.variant for r in res] == ["PD 1P+1D @ 2/s", "colocated x1 @ 2/s",
                                        "PD 1P+1D @ 20/s", "colocated x1 @ 20/s"]
    assert [r.config["rate"] for r in res] == [2.0, 2.0, 20.0, 20.0]
    assert all(r.summary["num_ok"] == 30 for r in res)
    # the same lengths at both rates; ten times the offered rate shows in the throughput
    slow, fast = res[1], res[3]
    assert fast.summary["throughput_rps"] > 4 * slow.summary["throughput_rps"]


def test_variants_share_one_machine_and_chunk_changes_budget() -> None:
    assert variants("tp")[0] == 4 and [v.name for v in variants("tp")[1]] == ["PD TP1", "PD TP2"]
    assert [v.name for v in variants("pd-vs-colocated", "http")[1]] == ["PD 1P+1D", "colocated x1",
                                                                         "colocated TP2"]
    chunk = {v.name: v for v in variants("chunk")[1]}
    assert list(chunk) == ["colocated chunk 512", "colocated chunk 8192", "PD chunk 512",
                           "PD chunk 8192"]
    w = wl.prefill_heavy(60, rate=8.0, seed=0)
    small, big = (run_cluster(chunk[f"colocated chunk {c}"], w, model="llama-3.1-8b")
                  for c in (512, 8192))
    # a 2,048-token prompt takes 4+ steps at chunk 512, one at 8192: TTFT grows ...
    assert small.summary["ttft"]["p50"] > big.summary["ttft"]["p50"]
    # ... and the decodes batched with a prefill chunk stall less
    assert small.summary["itl"]["p99"] < big.summary["itl"]["p99"]


def test_fp8_kv_halves_transfer_bytes() -> None:
    w = wl.fixed(20, 1024, 4, rate=10.0, seed=0)
    auto, fp8 = (run_cluster(v, w) for v in variants("kv-dtype")[1])
    assert auto.engine_side["kv_transfer_tokens"] == fp8.engine_side["kv_transfer_tokens"] > 0
    assert fp8.engine_side["kv_transfer_bytes"] == pytest.approx(
        auto.engine_side["kv_transfer_bytes"] / 2, rel=0.01)


def test_cli_cluster_prints_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    out = tmp_path / "bench.json"
    code = main(["--engine", "cluster", "--compare", "pd-vs-colocated", "--workload",
                 "shared-prefix", "--num-requests", "60", "--rate", "10", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "SIMULATED" in text and "PD 1P+1D" in text and "colocated x1" in text
    doc = json.loads(out.read_text())
    assert [r["variant"] for r in doc["results"]][:2] == ["PD 1P+1D", "colocated x1"]
    assert all(r["engine_side"]["prefix_hit_tokens"] > 0 for r in doc["results"])
    assert len(doc["results"][0]["records"]) == 60
    assert main(["--engine", "cluster", "--mode", "vllm"]) == 2  # the cluster is the simulator
