"""Report arithmetic on hand-made records: latencies, throughput, goodput, engine deltas."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from labkit.bench.loadgen import RequestResult, check_loopback
from labkit.bench.report import (
    SLO,
    BenchResult,
    cdf_figure,
    engine_delta,
    format_table,
    goodput,
    meets_slo,
    summarize,
    write_json,
)
from labkit.telemetry.metrics import MetricsSnapshot

pytestmark = pytest.mark.timeout(60)


def rec(i: int, arrival: float, first: float, gap: float, n: int, error: str | None = None
        ) -> RequestResult:
    times = [first + k * gap for k in range(n)]
    return RequestResult(i, arrival, 100, n, sent=arrival, first_token=first, token_times=times,
                         finish=times[-1], num_output_tokens=n, error=error)


def records() -> list[RequestResult]:
    return [
        rec(0, 0.0, 0.2, 0.01, 11),   # TTFT 0.2, TPOT 0.01: good
        rec(1, 1.0, 1.3, 0.02, 11),   # TTFT 0.3, TPOT 0.02: good
        rec(2, 2.0, 3.5, 0.01, 11),   # TTFT 1.5: misses TTFT
        rec(3, 3.0, 3.1, 0.08, 11),   # TPOT 0.08: misses ITL
        rec(4, 4.0, 4.1, 0.01, 11, error="HTTP 500"),  # failed: never good
    ]


def test_per_request_latencies() -> None:
    r = records()[1]
    assert r.ttft == pytest.approx(0.3)
    assert r.tpot == pytest.approx(0.02)
    assert r.e2e == pytest.approx(1.3 + 0.2 - 1.0)
    assert r.itls == pytest.approx([0.02] * 10)


def test_goodput_counts_only_requests_meeting_both_slos() -> None:
    slo = SLO(ttft_s=1.0, itl_s=0.05)
    rs = records()
    assert [meets_slo(r, slo) for r in rs] == [True, True, False, False, False]
    g = goodput(rs, slo, duration_s=4.0)
    assert g["goodput_fraction"] == pytest.approx(2 / 5)
    assert g["goodput_rps"] == pytest.approx(0.5)
    # a looser ITL target lets request 3 in
    assert goodput(rs, SLO(1.0, 0.1), 4.0)["num_good"] == 3


def test_summary_percentiles_and_throughput() -> None:
    s = summarize(records(), SLO(1.0, 0.05))
    assert (s["num_requests"], s["num_ok"], s["num_errors"]) == (5, 4, 1)
    # span: first arrival 0.0 -> last finish of an ok request (3.1 + 10 * 0.08 = 3.9)
    assert s["duration_s"] == pytest.approx(3.9)
    assert s["throughput_rps"] == pytest.approx(4 / 3.9)
    assert s["output_tps"] == pytest.approx(44 / 3.9)
    assert s["ttft"]["p50"] == pytest.approx(0.25)  # of 0.2, 0.3, 1.5, 0.1
    assert s["ttft"]["mean"] == pytest.approx((0.2 + 0.3 + 1.5 + 0.1) / 4)
    assert s["tpot"]["p99"] == pytest.approx(0.08, abs=0.003)
    assert s["goodput_rps"] == pytest.approx(2 / 3.9)


def metrics(ext: float, nixl: float, preempt: float) -> MetricsSnapshot:
    text = f"""# TYPE vllm:prompt_tokens_by_source counter
vllm:prompt_tokens_by_source_total{{engine="0",model_name="m",source="external_kv_transfer"}} {ext}
vllm:prompt_tokens_by_source_total{{engine="0",model_name="m",source="local_compute"}} 999
# TYPE vllm:nixl_bytes_transferred histogram
vllm:nixl_bytes_transferred_bucket{{engine="0",le="+Inf",model_name="m"}} 1
vllm:nixl_bytes_transferred_count{{engine="0",model_name="m"}} 1
vllm:nixl_bytes_transferred_sum{{engine="0",model_name="m"}} {nixl}
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{{engine="0",model_name="m"}} {preempt}
"""
    return MetricsSnapshot.parse(text)


def test_engine_delta_reads_vllm_names() -> None:
    before = {"prefill": metrics(0, 0, 1), "decode": metrics(100, 6400, 0)}
    after = {"prefill": metrics(0, 0, 3), "decode": metrics(1188, 76032, 0)}
    d = engine_delta(before, after)
    assert d["kv_transfer_tokens"] == 1088
    assert d["nixl_bytes"] == 69632
    assert d["preemptions"] == 2


def test_table_json_and_cdf(tmp_path: Path) -> None:
    rs = records()
    res = [BenchResult("PD", "sim", "2x H100", "cluster", "w", 2, summarize(rs, SLO(1.0, 0.05)),
                       {"kv_transfer_tokens": 123.0}, records=rs),
           BenchResult("colocated", "vllm", "1x NVIDIA H200", "http", "w", 1,
                       summarize(rs[:2], SLO(1.0, 0.05)), records=rs[:2])]
    table = format_table(res, "title")
    lines = table.splitlines()
    assert lines[0] == "title"
    assert "SIMULATED (2x H100)" in lines[1] and "REAL vLLM on 1x NVIDIA H200" in lines[1]
    assert lines[-2].startswith("PD") and "123" in lines[-2] and " 4/5 " in lines[-2]
    assert lines[-1].startswith("colocated") and "100%" in lines[-1]
    doc = json.loads(write_json(res, tmp_path / "r.json", with_records=True).read_text())
    assert doc["results"][0]["summary"]["num_ok"] == 4
    assert len(doc["results"][0]["records"]) == 5
    assert doc["results"][0]["records"][4]["e2e"] is None  # the failed one
    fig = cdf_figure(res, "ttft")
    assert [t.name for t in fig.data] == ["PD", "colocated"]
    assert list(fig.data[0].y)[-1] == 1.0 and len(fig.data[0].x) == 4
    assert math.isclose(max(fig.data[0].x), 1500.0)


def test_loadgen_only_targets_loopback() -> None:
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    for bad in ("http://example.com:8000", "http://10.0.0.1:80", "ftp://127.0.0.1:1"):
        with pytest.raises(ValueError):
            check_loopback(bad)


def test_json_is_strict_when_values_are_missing(tmp_path: Path) -> None:
    one_token = [rec(0, 0.0, 0.1, 0.01, 1)]  # no ITL, no TPOT: NaN percentiles
    res = [BenchResult("x", "sim", "d", "cluster", "w", 1, summarize(one_token))]
    text = write_json(res, tmp_path / "r.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["results"][0]["summary"]["tpot"]["p50"] is None
