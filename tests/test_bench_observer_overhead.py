"""labkit.bench.observer_overhead's statistics: per-round ratios and their 95 % interval
(the GPU run itself is in docs/gpu-runs.md; nothing here needs vLLM)."""

from __future__ import annotations

import math

import pytest

from labkit.bench import observer_overhead as oo


def _runs(plain: list[float], observed: list[float]) -> dict[str, list[dict[str, float]]]:
    def row(t: float) -> dict[str, float]:
        return {"ok": 64, "errors": 0, "req_s": t / 576, "out_tok_s": t / 9, "total_tok_s": t,
                "ttft_p50_ms": 700.0, "itl_p50_ms": 6.2}
    return {"plain": [row(t) for t in plain], "observed": [row(t) for t in observed]}


def test_t_quantile_matches_tables():
    assert oo.t_quantile(1) == pytest.approx(12.706)
    assert oo.t_quantile(4) == pytest.approx(2.776)
    assert oo.t_quantile(20) == pytest.approx(2.086, abs=2e-3)
    assert oo.t_quantile(60) == pytest.approx(2.000, abs=2e-3)
    assert oo.t_quantile(10_000) == pytest.approx(1.960, abs=1e-3)
    assert math.isinf(oo.t_quantile(0))


def test_ratio_ci_is_a_t_interval_over_log_ratios():
    runs = _runs([100, 110, 90, 105], [99, 109, 89.2, 104])
    ci = oo.ratio_ci(runs, "total_tok_s")
    logs = [math.log(o / p) for p, o in zip([100, 110, 90, 105], [99, 109, 89.2, 104],
                                            strict=True)]
    m = sum(logs) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in logs) / 3)
    assert ci["n"] == 4 and ci["ratio"] == pytest.approx(math.exp(m))
    assert ci["lo"] == pytest.approx(math.exp(m - 3.182 * sd / 2))
    assert ci["hi"] == pytest.approx(math.exp(m + 3.182 * sd / 2))
    assert ci["width"] == pytest.approx(ci["hi"] - ci["lo"])
    # the rounds' spread in absolute throughput (90..110) does not widen it: ratios are paired
    assert ci["width"] < 0.02
    assert oo.ci_reached(runs, 0.02)  # ITL identical in every round: width 0
    assert not oo.ci_reached(_runs([100, 100], [90, 110]), 0.02)
    assert oo.ratio_ci(_runs([100], [99]), "total_tok_s")["width"] == math.inf


def test_table_prints_the_interval():
    runs = _runs([100, 110, 90, 105], [99, 109, 89.2, 104])
    result = {"model": "lab-1b", "requests": 64, "prompt": 512, "output": 64, "concurrency": 16,
              "rounds": 4, "gpu": 0, "runs": runs, "ci_width_target": 0.02,
              "stopped_by": "ci_width", "summary": oo.summarize_runs(runs)}
    text = oo.format_table(result)
    assert "95% lo" in text and "95% width" in text
    assert "narrower than 0.020" in text and ": yes after 4 rounds" in text


def test_token_figures_from_offline_token_times():
    """--method offline: TTFT from the run's start, ITL from consecutive token stamps,
    throughput over the run's wall time; a request with no token counts as an error."""
    times = {"a": [1.1, 1.2, 1.4], "b": [1.3, 1.35], "c": []}
    f = oo.token_figures(1.0, 2.0, times, prompt=100)
    assert f["ok"] == 2 and f["errors"] == 1
    assert f["out_tok_s"] == pytest.approx(5.0) and f["total_tok_s"] == pytest.approx(205.0)
    assert f["req_s"] == pytest.approx(2.0)
    assert f["ttft_p50_ms"] == pytest.approx(200.0)  # median of 100 and 300 ms
    assert f["itl_p50_ms"] == pytest.approx(100.0)  # gaps 100, 200, 50 ms


def test_a_noop_connector_arm_splits_the_cost():
    """--noop-connector: connector/plain is vLLM's cost of carrying a connector,
    observed/connector the observer's own; their product is observed/plain."""
    runs = _runs([100, 110, 90, 105], [96, 105.6, 86.4, 100.8])  # observed: -4 % each round
    mid = _runs([100, 110, 90, 105], [98, 107.8, 88.2, 102.9])["observed"]  # connector: -2 %
    runs["connector"] = mid
    s = oo.summarize_runs(runs)
    assert s["ci"]["total_tok_s"]["ratio"] == pytest.approx(0.96)
    assert s["ci_connector"]["total_tok_s"]["ratio"] == pytest.approx(0.98)
    assert s["ci_observer_own"]["total_tok_s"]["ratio"] == pytest.approx(0.96 / 0.98)
    text = oo.format_table({"model": "lab-1b", "requests": 64, "prompt": 512, "output": 64,
                            "concurrency": 16, "rounds": 4, "gpu": 0, "runs": runs,
                            "summary": s, "method": "offline"})
    assert "no-op connector / plain (vLLM's cost of a connector): total_tok_s 0.9800" in text
    assert "observed / no-op connector (the observer's own): total_tok_s 0.9796" in text
    assert text.splitlines()[3].split()[0] == "connector"  # its row between plain and observed
