"""labkit.bench.relaunch: Apply -> serving pair, split into stages (simulated engines here;
the same module times real vLLM on a GPU, docs/gpu-runs.md)."""

from __future__ import annotations

import json

import pytest

from labkit.bench import relaunch
from labkit.lab import build_config


def test_toggled_changes_both_engines_and_says_what():
    cfg = build_config("lab-1b", num_gpus=1, connector="example")
    new, label = relaunch.toggled(cfg, "chunk", chunk_to=1024)
    assert new.prefill.max_num_batched_tokens == new.decode.max_num_batched_tokens == 1024
    assert label == "chunk auto -> 1024"
    again, label = relaunch.toggled(new, "chunk", chunk_to=1024)  # already 1024: go elsewhere
    assert again.prefill.max_num_batched_tokens == 2048 and label == "chunk 1024 -> 2048"
    kv, label = relaunch.toggled(cfg, "kv-dtype")
    assert kv.prefill.kv_cache_dtype == kv.decode.kv_cache_dtype == "fp8"
    assert label == "kv auto -> fp8"
    tp, label = relaunch.toggled(cfg, "tp")
    assert (tp.prefill.tp, tp.decode.tp, label) == (2, 2, "tp 1 -> 2")
    assert cfg.prefill.max_num_batched_tokens is None  # the original is untouched
    with pytest.raises(ValueError):
        relaunch.toggled(cfg, "block-size")


def test_breakdown_splits_apply_into_stages():
    marks = [("preparing the model directory", 101.0), ("starting engines", 101.5),
             ("prefill: loading", 101.5), ("decode: loading", 142.0),
             ("engines ready", 183.0), ("ready", 185.0)]
    engines = {"prefill": {"own_start_s": 40.0}, "decode": {"own_start_s": 40.5}}
    row = relaunch.breakdown(99.0, 100.0, 101.0, marks, engines, (183.1, 184.2), 185.0, 185.3,
                             shared=True)
    assert row["stop_s"] == pytest.approx(1.0)
    assert row["plan_s"] == pytest.approx(1.0)
    assert row["model_dir_s"] == pytest.approx(0.5)
    assert row["engines_s"] == pytest.approx(81.5)
    assert row["engines_critical_s"] == pytest.approx(80.5)  # one after the other: the sum
    assert row["engines_overhead_s"] == pytest.approx(1.0)
    # a proxy still starting when the engines are ready: what is left of it counts
    assert row["proxy_s"] == pytest.approx(1.2) and row["telemetry_s"] == pytest.approx(0.8)
    assert row["proxy_own_s"] == pytest.approx(1.1)
    # the proxy started with the engines and was ready long before them: none of it counts
    early = relaunch.breakdown(99.0, 100.0, 101.0, marks, engines, (101.6, 103.0), 185.0, 185.3,
                               shared=True)
    assert early["proxy_s"] == 0.0 and early["proxy_own_s"] == pytest.approx(1.4)
    assert early["telemetry_s"] == pytest.approx(2.0)
    assert row["first_request_s"] == pytest.approx(0.3)
    assert row["total_s"] == pytest.approx(86.3)
    assert row["lab_adds_s"] == pytest.approx(86.3 - 80.5)
    together = relaunch.breakdown(99.0, 100.0, 101.0, marks, engines, (None, None), 185.0, 185.3,
                                  shared=False)
    assert together["engines_critical_s"] == pytest.approx(40.5)  # together: the longest
    assert "proxy_s" not in together


def test_relaunch_on_the_simulator(tmp_path, capsys):
    out = tmp_path / "relaunch.json"
    assert relaunch.main(["--mode", "sim", "--num-gpus", "1", "--toggles", "chunk,tp",
                          "--run-dir", str(tmp_path / "runs"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "sim"
    rows = {r["toggle"]: r for r in result["rows"]}
    assert set(rows) == {"initial", "chunk", "tp"}
    assert "needs" in rows["tp"]["skipped"]  # TP=2 on one GPU: the planner's reason
    chunk = rows["chunk"]
    assert chunk["config"]["chunk"] == 1024 and chunk["stop_s"] > 0
    assert set(chunk["engines_own_s"]) == {"prefill", "decode"}
    assert chunk["total_s"] >= chunk["engines_critical_s"] > 0
    assert chunk["lab_adds_s"] == pytest.approx(chunk["total_s"] - chunk["engines_critical_s"])
    text = capsys.readouterr().out
    assert "SIMULATED" in text and "lab adds" in text and "skipped" in text
