"""The load generator against a simulated PD pair started through Lab(mode="sim"):
real subprocesses (two engines + the PD proxy), real HTTP on 127.0.0.1."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from labkit.bench import workloads as wl
from labkit.bench.loadgen import run_load
from labkit.bench.report import engine_delta, summarize
from labkit.lab import Lab
from labkit.telemetry.metrics import scrape

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    run_dir: Path = tmp_path_factory.mktemp("bench-lab")
    with Lab(mode="sim", model="lab-1b", run_dir=run_dir, observe=False) as running:
        yield running


def test_every_request_recorded_once_with_ttft_below_e2e(lab: Lab) -> None:
    assert lab.kind == "sim" and lab.proxy is not None  # through the PD proxy
    w = wl.shared_prefix(24, rate=12.0, seed=2, num_prefixes=2, prefix_len=256,
                         suffix=(32, 160), output=(4, 24))
    before = {n: scrape(e.base_url) for n, e in lab.engines.items()}
    res = run_load(lab.url, w, model=lab.plan.model.name, vocab_size=lab.plan.model.vocab_size)
    after = {n: scrape(e.base_url) for n, e in lab.engines.items()}
    assert [r.index for r in res.records] == list(range(len(w)))  # none lost, none duplicated
    assert [r.error for r in res.records] == [None] * len(w)
    for r, spec in zip(res.records, w.requests, strict=True):
        assert r.prompt_len == spec.prompt_len and r.arrival == pytest.approx(spec.arrival_s)
        assert r.sent >= r.arrival - 1e-3
        assert 0 < r.ttft < r.e2e
        assert r.num_output_tokens == spec.output_len  # ignore_eos + max_tokens, via usage
        assert len(r.token_times) == spec.output_len  # one SSE chunk per token
        assert r.token_times == sorted(r.token_times) and r.finish >= r.token_times[-1]
    s = summarize(res.records)
    assert s["num_ok"] == len(w) and s["output_tps"] > 0
    side = engine_delta(before, after)
    # decode got the prompt KV from prefill, minus what its own prefix cache already held
    total = sum(r.prompt_len for r in w.requests)
    assert 0 < side["kv_transfer_tokens"] <= total
    assert side["prefix_hit_tokens"] > 0  # the shared system prompts hit


def test_bounded_by_time_and_count(lab: Lab) -> None:
    w = wl.fixed(50, 64, 4, rate=10.0, seed=0)  # 5 s of arrivals
    res = run_load(lab.url, w, max_requests=30, max_duration_s=1.0)
    assert 5 <= len(res.records) <= 15  # ~10 arrive within the first second
    assert all(r.arrival <= 1.0 for r in res.records)
    assert all(r.ok for r in res.records)
    assert res.duration_s < 5.0
