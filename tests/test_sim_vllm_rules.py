"""Two vLLM 0.26 scheduler rules under memory pressure, with the steps worked out by hand
from vLLM's source (vllm/v1/core/sched/scheduler.py, async_scheduler.py,
vllm/v1/core/kv_cache_manager.py allocate_slots).

1. Deferred block frees: with async scheduling (2 batches in flight) and a KV-consuming
   connector (the observer is kv_both), a preempted request's blocks return to the pool only
   after the step that last scheduled it is processed. A 64-token request needing its 5th
   block in a full pool preempts the other running request, gets nothing back, preempts
   itself: a step with nothing scheduled.
2. Async scheduling caches only known tokens: the token sampled by the step in flight is a
   placeholder, so allocate_slots caches min(total, request.num_tokens) one token short, and
   a request preempted while its step was in flight gets its token, not its block cached.
"""
from __future__ import annotations

from labkit.engines.sim.engine import SimEngine


def engine(num_gpu_blocks: int, **kw) -> SimEngine:
    return SimEngine("lab-1b", "h100", block_size=16, max_num_batched_tokens=2048, max_num_seqs=16,
                     max_model_len=4096, num_gpu_blocks=num_gpu_blocks, **kw)


def two_full_requests(**kw) -> SimEngine:
    # null block + 8: two 64-token prompts take all 8 blocks.
    e = engine(9, **kw)
    e.add_request("A", list(range(1, 65)), 8)
    e.add_request("B", list(range(1000, 1064)), 8)
    return e


def test_deferred_frees_preempt_up_to_the_request_itself_and_schedule_nothing() -> None:
    e = two_full_requests(connector="observer", async_scheduling=True)
    sched, pool = e.scheduler, e.kv_cache_manager.block_pool
    assert sched.defer_block_free
    r1 = e.step()
    assert r1.scheduler_output.num_scheduled_tokens == {"A": 64, "B": 64}
    assert pool.get_num_free_blocks() == 0
    # schedule(2): A needs a 5th block, none free. B is preempted (its blocks are fenced at
    # step 1, not yet processed), still none free, so A preempts itself.
    so2 = sched.schedule()
    assert so2.total_num_scheduled_tokens == 0
    assert so2.preempted_req_ids == {"A", "B"}
    assert pool.get_num_free_blocks() == 0 and sched.num_deferred_free_blocks == 8
    assert [r.request_id for r in sched.waiting] == ["A", "B"]
    # update_from_output(1): step 1 processed, the 8 blocks return.
    prev, sampled = e._inflight
    sched.update_from_output(prev, sampled)
    assert pool.get_num_free_blocks() == 8 and not sched.deferred_frees
    # Both requests got their first token although preempted (vLLM appends it).
    assert sched.requests["A"].num_tokens == 65 and sched.requests["B"].num_tokens == 65
    e._inflight = None
    so3 = sched.schedule()
    # A resumes on its 4 cached prompt blocks (the hit is capped at num_tokens - 1 = 64).
    # vLLM 0.26's Model Runner V2 takes it as a new request (NewRequestData, whole table).
    assert so3.num_scheduled_tokens == {"A": 1} and so3.resumed_req_ids == set()
    assert [(n.req_id, n.num_computed_tokens, len(n.block_ids[0]))
            for n in so3.scheduled_new_reqs] == [("A", 64, 5)]


def test_without_a_consuming_connector_or_in_sync_mode_frees_are_immediate() -> None:
    for kw in ({"connector": None, "async_scheduling": True},
               {"connector": "observer", "async_scheduling": False}):
        e = two_full_requests(**kw)
        assert not e.scheduler.defer_block_free
        e.step()
        r2 = e.step()
        so = r2.scheduler_output
        assert so.preempted_req_ids == {"B"} and so.num_scheduled_tokens == {"A": 1}, kw


def test_async_scheduling_caches_one_block_less_at_a_block_boundary() -> None:
    cached = {}
    for flag in (True, False):
        e = engine(64, async_scheduling=flag)
        e.add_request("R", list(range(1, 64)), 8)  # 63 tokens: 3 full blocks
        e.step()  # prefill; R samples its token at position 63
        e.step()  # computes position 63: block 4 is full
        cached[flag] = e.kv_cache_manager.num_cached_block["R"]
    # sync: the token at 63 is known when step 2 is scheduled -> 4 blocks cached.
    # async: it is the placeholder of step 1 (still in flight) -> min(64, 63) -> 3 blocks.
    assert cached == {True: 3, False: 4}


def test_async_output_of_a_preempted_request_is_appended_not_cached() -> None:
    # A (31 tokens) and R (63 tokens) fill 6 blocks. Step 3: A needs its 3rd block; R is
    # preempted before update_from_output(2) folds in R's token at position 63.
    e = engine(7, connector="observer", async_scheduling=True)
    e.add_request("A", list(range(1, 32)), 8)
    e.add_request("R", list(range(100, 163)), 8)
    e.step()
    e.step()
    r = e.scheduler.requests["R"]
    blocks_r = list(e.kv_cache_manager.req_to_blocks["R"])
    assert e.kv_cache_manager.num_cached_block["R"] == 3 and r.num_output_placeholders == 1
    r3 = e.step()
    assert "R" in r3.scheduler_output.preempted_req_ids
    # R's step-2 token was appended (64 output-including tokens + 1), its 4th block stays
    # unhashed: a resumed R finds 48 prefix-hit tokens, not 64.
    assert r.num_tokens == 65 and r.num_output_placeholders == 0
    assert [b.block_hash is not None for b in blocks_r] == [True, True, True, False]
    hits = [e.kv_cache_manager.get_computed_blocks(r)[1]]
    assert hits == [48]
