"""Async scheduling in the simulated engine (vLLM 0.26's default AsyncScheduler +
step_with_batch_queue): per step, either the lookahead (GPU-bound: a request reaching the
busy engine joins one step later) or late emission (launch-bound: tokens leave when the
next step's launch ends)."""
from __future__ import annotations

import random

import pytest

from labkit.engines.sim.cluster import SimCluster
from labkit.engines.sim.engine import SimEngine


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 32000) for _ in range(n)]


def engine(**kw) -> SimEngine:
    kw.setdefault("max_num_batched_tokens", 2048)
    return SimEngine("lab-1b", "h200", num_gpu_blocks=2000, **kw)


def arrive(e: SimEngine, t: float, rid: str, n: int, max_tokens: int = 4) -> None:
    """`rid` reaches the engine at simulated time `t` (the engine's steps run at given times)."""
    e.clock.advance_to(t)
    e.add_request(rid, prompt(n, hash(rid) % 100), max_tokens)


def test_launch_bound_step_emits_its_tokens_when_the_next_launch_ends() -> None:
    e = engine()
    e.add_request("a", prompt(128), 4)
    r1 = e.step(now=0.0)
    assert r1.launch_s > r1.gpu_s  # the 1B model on an H200: ~5 ms launch, < 1 ms of GPU
    assert [r.request_id for r, _ in r1.sampled] == ["a"] and r1.emitted == [] and r1.outputs == []
    r2 = e.step(now=r1.end)
    assert [(r.request_id, t) for r, _, t in r2.emitted] == [("a", pytest.approx(r2.start + r2.launch_s))]
    assert e.get_request("a").first_token_time == pytest.approx(r2.start + r2.launch_s)
    assert r2.start + r2.launch_s < r2.end
    while e.has_unfinished():
        last = e.step(now=e.busy_until)
    # the last token has no next step: it leaves at its own step's end, with the one before it
    assert [t for _, _, t in last.emitted] == [pytest.approx(last.start + last.launch_s),
                                               pytest.approx(last.end)]
    assert [o.finished for o in last.outputs] == [False, True]
    assert e.stats.generation_tokens == 4


def test_max_tokens_1_alone_is_never_emitted_late() -> None:
    e = engine()
    e.add_request("p", prompt(512), 1)
    r = e.step(now=0.0)
    assert r.launch_s > r.gpu_s
    assert [(q.request_id, t) for q, _, t in r.emitted] == [("p", r.end)]
    assert r.outputs[0].finished and not e.has_unfinished()


def test_request_arriving_during_a_launch_bound_step_joins_the_next_step() -> None:
    e = engine()
    e.add_request("d", prompt(64), 20)
    r1 = e.step(now=0.0)
    r2 = e.step(now=r1.end)
    assert r2.launch_s > r2.gpu_s
    arrive(e, (r2.start + r2.end) / 2, "new", 256)
    r3 = e.step(now=r2.end)  # no lookahead: the core read its input queue after r2's launch
    assert "new" in r3.scheduler_output.num_scheduled_tokens


def test_gpu_bound_step_has_the_lookahead_and_emits_at_its_end() -> None:
    e = engine(max_num_batched_tokens=8192)
    e.add_request("d", prompt(64), 20)
    r1 = e.step(now=0.0)
    arrive(e, r1.end, "long", 8000, 2)
    r2 = e.step(now=r1.end)
    assert r2.scheduler_output.num_scheduled_tokens == {"d": 1, "long": 8000}
    assert r2.gpu_s > r2.launch_s  # an 8,000-token prefill: ~30 ms of GPU
    # d's token of r1 left when r1 ended: the core waited on r1 while r2 was queued
    assert [(r.request_id, t) for r, _, t in r2.emitted] == [("d", r2.start)]
    arrive(e, (r2.start + r2.end) / 2, "new", 256)
    r3 = e.step(now=r2.end)  # r3's batch was fixed when r2 started
    r4 = e.step(now=r3.end)
    assert "new" not in r3.scheduler_output.num_scheduled_tokens
    assert "new" in r4.scheduler_output.num_scheduled_tokens


def test_sync_engine_emits_every_token_at_its_steps_end() -> None:
    e = engine(async_scheduling=False)
    e.add_request("a", prompt(128), 3)
    while e.has_unfinished():
        r = e.step(now=e.busy_until)
        assert [t for _, _, t in r.emitted] == [r.end]


def test_abort_drops_a_held_token() -> None:
    e = engine()
    e.add_request("a", prompt(128), 8)
    e.add_request("b", prompt(128, 1), 8)
    r1 = e.step(now=0.0)
    assert len(r1.sampled) == 2 and not r1.emitted
    assert e.abort("a")
    r2 = e.step(now=r1.end)
    assert [r.request_id for r, _, _ in r2.emitted] == ["b"]
    assert e.get_request("a") is None


def test_idle_engine_schedules_at_once_and_waiting_request_is_visible() -> None:
    e = engine()
    e.add_request("a", prompt(128), 2)
    assert e.has_unfinished() and e.num_waiting == 1 and e.get_request("a") is not None
    r = e.step()
    assert r.scheduler_output.num_scheduled_tokens == {"a": 128}
    # A request added after the engine went idle (a gap) is not deferred.
    while e.has_unfinished():
        e.step()
    e.clock.advance_to(e.busy_until + 0.05)
    e.add_request("b", prompt(128, 2), 1)
    assert e.step().scheduler_output.num_scheduled_tokens == {"b": 128}


def test_abort_of_a_request_not_yet_scheduled() -> None:
    e = engine()
    e.add_request("a", prompt(64), 2)
    with pytest.raises(ValueError):
        e.add_request("a", prompt(64), 2)
    assert e.abort("a") and not e.has_unfinished()


def test_cluster_ttft_under_load_is_longer_with_async_scheduling() -> None:
    work = [(i * 0.013, 512, 64) for i in range(30)]  # arrivals land inside busy decode steps
    ttft = {}
    for flag in (False, True):
        c = SimCluster("lab-1b", "h200", num_prefill=1, num_decode=0,
                       prefill_kwargs={"async_scheduling": flag, "num_gpu_blocks": 4000})
        recs = c.run(work)
        assert all(r.finish is not None for r in recs)
        ttft[flag] = sorted(r.ttft for r in recs)[len(recs) // 2]
    assert ttft[True] > ttft[False] + 0.002  # about one launch (~5 ms) more: late emission
