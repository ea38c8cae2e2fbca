"""Async scheduling in the simulated engine (vLLM 0.26's default AsyncScheduler +
step_with_batch_queue): a request reaching a busy engine joins one step later."""
from __future__ import annotations

import random

import pytest

from labkit.engines.sim.cluster import SimCluster
from labkit.engines.sim.engine import SimEngine


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 32000) for _ in range(n)]


def engine(**kw) -> SimEngine:
    return SimEngine("lab-1b", "h200", num_gpu_blocks=2000, max_num_batched_tokens=2048, **kw)


def busy_then_arrive(async_scheduling: bool) -> tuple[SimEngine, list]:
    """A decoding engine; "new" arrives in the middle of its second step."""
    e = engine(async_scheduling=async_scheduling)
    e.add_request("d", prompt(64), 20)
    steps = [e.step(), e.step()]
    e.clock.advance_to((steps[1].start + steps[1].end) / 2)  # arrives during step 2
    e.add_request("new", prompt(256, 1), 4)
    e.busy_until = steps[1].end  # the engine is still running step 2
    steps += [e.step(), e.step(), e.step()]
    return e, steps


def first_step_with(steps: list, rid: str) -> int:
    return next(i for i, s in enumerate(steps) if rid in s.scheduler_output.num_scheduled_tokens)


def test_busy_engine_takes_a_new_request_one_step_later_than_sync() -> None:
    _, sync_steps = busy_then_arrive(False)
    _, async_steps = busy_then_arrive(True)
    assert first_step_with(sync_steps, "new") == 2  # the next step
    assert first_step_with(async_steps, "new") == 3  # step 3 was scheduled when step 2 began
    # Its first token leaves at the end of the step that computed it: one decode step later.
    sync_ft = sync_steps[2].outputs and [o for o in sync_steps[2].outputs if o.request_id == "new"]
    async_ft = [o for o in async_steps[3].outputs if o.request_id == "new"]
    assert sync_ft and async_ft
    delay = async_ft[0].first_token_time - sync_ft[0].first_token_time
    assert delay == pytest.approx(async_steps[2].duration, rel=0.2)


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
    assert ttft[True] > ttft[False] + 0.002  # about one decode step (~5 ms) more
