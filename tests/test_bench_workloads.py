"""Workload generators: deterministic per seed, and with the statistics they promise."""
from __future__ import annotations

import math

import numpy as np
import pytest

from labkit.bench import workloads as wl

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("name", ["fixed", "sharegpt", "prefill-heavy", "decode-heavy", "shared-prefix"])
def test_same_seed_same_workload_other_seed_other(name: str) -> None:
    a = wl.make(name, 200, rate=5.0, seed=7)
    b = wl.make(name, 200, rate=5.0, seed=7)
    c = wl.make(name, 200, rate=5.0, seed=8)
    assert a.requests == b.requests
    assert a.token_ids() == b.token_ids()
    assert a.requests != c.requests
    assert [r.arrival_s for r in a.requests] == sorted(r.arrival_s for r in a.requests)


def test_poisson_rate_and_exponential_gaps() -> None:
    w = wl.fixed(4000, 128, 16, rate=10.0, seed=1)
    gaps = np.diff([r.arrival_s for r in w.requests])
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert gaps.std() == pytest.approx(0.1, rel=0.08)  # exponential: std == mean
    assert w.stats()["offered_rate"] == pytest.approx(10.0, rel=0.05)
    assert all(r.arrival_s == 0.0 for r in wl.fixed(5, 8, 8, rate=math.inf).requests)


def test_bursts() -> None:
    w = wl.fixed(10, 64, 8, burst=(4, 2.0))
    assert [r.arrival_s for r in w.requests] == [0.0] * 4 + [2.0] * 4 + [4.0] * 2


def test_sharegpt_lengths_match_published_means_and_pruning() -> None:
    w = wl.sharegpt(5000, seed=3)
    st = w.stats()
    assert st["prompt_mean"] == pytest.approx(wl.SHAREGPT_MEAN_PROMPT, rel=0.06)
    assert st["output_mean"] == pytest.approx(wl.SHAREGPT_MEAN_OUTPUT, rel=0.06)
    assert st["prompt_p50"] < 0.8 * st["prompt_mean"]  # long right tail (lognormal)
    for r in w.requests:
        assert wl.MIN_LEN <= r.prompt_len <= wl.MAX_PROMPT_LEN and r.output_len >= wl.MIN_LEN
        assert r.prompt_len + r.output_len <= wl.MAX_TOTAL_LEN


def test_prefill_and_decode_heavy_shapes() -> None:
    p = wl.prefill_heavy(500, seed=0).stats()
    d = wl.decode_heavy(500, seed=0).stats()
    assert p["prompt_mean"] > 20 * p["output_mean"]
    assert d["output_mean"] > 2 * d["prompt_mean"]


def test_shared_prefix_share_and_tokens() -> None:
    w = wl.shared_prefix(2000, seed=5, num_prefixes=3, prefix_len=256, share=0.6)
    assert w.stats()["shared_prefix_fraction"] == pytest.approx(0.6, abs=0.04)
    assert {r.prefix_id for r in w.requests} == {None, 0, 1, 2}
    toks = w.token_ids()
    by_prefix: dict[int, list[int]] = {}
    for r, t in zip(w.requests, toks, strict=True):
        assert len(t) == r.prompt_len
        if r.prefix_id is not None:
            head = t[:256]
            assert by_prefix.setdefault(r.prefix_id, head) == head
    assert len({tuple(v) for v in by_prefix.values()}) == 3
    # requests without a prefix share no first block with anybody
    firsts = [tuple(t[:16]) for r, t in zip(w.requests, toks, strict=True) if r.prefix_id is None]
    assert len(set(firsts)) == len(firsts)


def test_rate_sweep_keeps_lengths_changes_arrivals() -> None:
    a, b = wl.rate_sweep("decode-heavy", 300, [2.0, 20.0], seed=1)
    assert [(r.prompt_len, r.output_len) for r in a.requests] == \
        [(r.prompt_len, r.output_len) for r in b.requests]
    assert a.requests[-1].arrival_s > 5 * b.requests[-1].arrival_s
    assert b.stats()["offered_rate"] == pytest.approx(20.0, rel=0.15)
    # fresh prompt tokens per rate: an engine serving the sweep gets no prefix hits from the last rate
    ta, tb = a.token_ids(32000), b.token_ids(32000)
    assert all(x[:16] != y[:16] for x, y in zip(ta, tb, strict=True))
