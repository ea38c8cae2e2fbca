"""The simulated scheduler follows vllm/v1/core/sched/scheduler.py: token budget, chunked
prefill, decode-first, max_num_seqs, preemption by recompute, prefix hits; plus the engine's
timing, stats and cost model."""
from __future__ import annotations

import pytest

from labkit.engines.sim.clock import SimClock
from labkit.engines.sim.engine import SimEngine
from labkit.engines.sim.request import RequestStatus


def engine(**kw) -> SimEngine:
    kw.setdefault("num_gpu_blocks", 2000)
    kw.setdefault("max_num_batched_tokens", 2048)
    kw.setdefault("max_num_seqs", 64)
    return SimEngine("lab-1b", "h100", **kw)


def prompt(n: int, base: int = 0) -> list[int]:
    return [base + i % 30000 + 1 for i in range(n)]


def test_chunked_prefill_5000_tokens_takes_three_steps():
    e = engine()
    e.add_request("a", prompt(5000), 3)
    chunks, outputs = [], []
    while e.has_unfinished():
        r = e.step()
        chunks.append(r.scheduler_output.num_scheduled_tokens.get("a", 0))
        outputs.append([o.new_token_ids for o in r.outputs])
    assert chunks == [2048, 2048, 904, 1, 1]
    assert outputs[:3] == [[], [], []]  # partial chunks sample nothing; the third's token
    # leaves late (async scheduling, launch-bound steps: labkit/engines/sim/async_sched.py),
    # when the next step's launch ends; the last step emits its own token too (no next step)
    assert [len(o) for o in outputs[3:]] == [1, 2]
    assert e.stats.generation_tokens == 3
    assert e.stats.prompt_tokens_by_source == {"local_compute": 5000, "local_cache_hit": 0,
                                               "external_kv_transfer": 0}


def test_new_request_reports_prefix_hits_as_num_computed_tokens():
    e = engine()
    e.add_request("a", prompt(200), 1)
    while e.has_unfinished():
        e.step()
    e.add_request("b", prompt(200), 1)
    r = e.step()
    (new,) = r.scheduler_output.scheduled_new_reqs
    assert new.req_id == "b" and new.num_computed_tokens == 192  # 12 full blocks of 16
    assert r.scheduler_output.num_scheduled_tokens == {"b": 8}
    assert new.block_ids[0][:12] == r.scheduler_output.scheduled_new_reqs[0].block_ids[0][:12]
    assert e.prefix_cache_stats == (400, 192)
    assert e.stats.prompt_tokens_by_source["local_cache_hit"] == 192
    assert 0 not in new.block_ids[0]  # the null block is never in a block table


def test_decode_tokens_take_budget_first():
    # The scheduler's budget rule, in the sync loop (async scheduling would hold "long" one
    # step: tests/test_sim_async.py).
    e = engine(async_scheduling=False)
    e.add_request("d1", prompt(100), 50)
    e.add_request("d2", prompt(100, 5), 50)
    e.step()  # both prefilled in one step
    e.add_request("long", prompt(4000, 9), 5)
    r = e.step()
    sched = r.scheduler_output.num_scheduled_tokens
    assert sched == {"d1": 1, "d2": 1, "long": 2046}
    cached = r.scheduler_output.scheduled_cached_reqs
    assert cached.req_ids == ["d1", "d2"] and cached.num_computed_tokens == [100, 100]
    r = e.step()
    assert r.scheduler_output.num_scheduled_tokens == {"d1": 1, "d2": 1, "long": 1954}


def test_long_prefill_token_threshold_caps_chunks():
    e = engine(long_prefill_token_threshold=512)
    e.add_request("a", prompt(1200), 1)
    chunks = []
    while e.has_unfinished():
        chunks.append(e.step().num_scheduled_tokens)
    assert chunks == [512, 512, 176]


def test_max_num_seqs_caps_running_requests():
    e = engine(max_num_seqs=2)
    for i in range(3):
        e.add_request(str(i), prompt(50, 100 * i), 4)
    r = e.step()
    assert sorted(r.scheduler_output.num_scheduled_tokens) == ["0", "1"]
    assert e.num_running == 2 and e.num_waiting == 1
    seen_running = []
    while e.has_unfinished():
        e.step()
        seen_running.append(e.num_running)
    assert max(seen_running) <= 2
    assert e.stats.request_success == {"length": 3}


@pytest.mark.parametrize("use_v2_model_runner", [True, False])
def test_preemption_by_recompute_then_resume(use_v2_model_runner):
    # 24 usable blocks = 384 token slots; two requests of 100 + 200 need 19 blocks each.
    e = engine(num_gpu_blocks=25)
    e.scheduler.use_v2_model_runner = use_v2_model_runner
    e.add_request("a", prompt(100), 200)
    e.add_request("b", prompt(100, 7), 200)
    preempted, resumed, new = [], [], []
    while e.has_unfinished():
        r = e.step()
        so = r.scheduler_output
        preempted += so.preempted_req_ids
        resumed += so.scheduled_cached_reqs.resumed_req_ids
        new += [(n.req_id, n.num_computed_tokens, len(n.block_ids[0])) for n in so.scheduled_new_reqs]
        # the pool's free count is exactly what no request holds (no prefix is shared here)
        held = sum(len(b) for b in e.kv_cache_manager.req_to_blocks.values())
        assert e.kv_cache_manager.block_pool.get_num_free_blocks() == 24 - held
    assert preempted == ["b"]  # the LAST running request goes, FCFS
    if use_v2_model_runner:
        # vLLM 0.26 (Model Runner V2, its default for dense models): the resumed request is
        # sent as a new one, its prefix hits (the blocks freed at preemption, still cached,
        # come back) as num_computed_tokens and its whole block table as block_ids
        assert resumed == []
        assert [n[0] for n in new] == ["a", "b", "b"]
        rid, hits, num_blocks = new[2]
        assert hits > 0 and hits % 16 == 0 and num_blocks * 16 >= hits + 1
    else:
        assert resumed == ["b"] and [n[0] for n in new] == ["a", "b"]
    assert e.num_preemptions == 1
    assert e.stats.request_success == {"length": 2}
    assert e.stats.generation_tokens == 400  # 2 x 200: recompute re-runs the prompt, not the output
    assert e.kv_cache_manager.block_pool.get_num_free_blocks() == 24  # everything freed


def test_full_prompt_hit_still_computes_one_token_and_finishes():
    e = engine()
    e.add_request("a", prompt(64), 1)
    while e.has_unfinished():
        e.step()
    e.add_request("b", prompt(64), 2)
    r = e.step()
    assert r.scheduler_output.num_scheduled_tokens == {"b": 16}  # last block recomputed
    while e.has_unfinished():
        e.step()
    assert e.get_request("b") is None


def test_abort_frees_blocks():
    e = engine()
    e.add_request("a", prompt(500), 100)
    e.step()
    assert e.kv_cache_usage > 0
    assert e.abort("a") and not e.abort("a")
    assert e.kv_cache_usage == 0 and not e.has_unfinished()


def test_rejects_bad_requests():
    e = engine(max_model_len=1024)
    with pytest.raises(ValueError):
        e.add_request("x", prompt(1024), 1)
    with pytest.raises(ValueError):
        e.add_request("x", prompt(10), 0)
    e.add_request("x", prompt(10), 1)
    with pytest.raises(ValueError):
        e.add_request("x", prompt(10), 1)


def test_timing_and_histogram_samples():
    clock = SimClock()
    e = engine(clock=clock)
    e.add_request("a", prompt(1000), 5, arrival_time=0.0)
    results = []
    while e.has_unfinished():
        results.append(e.step())
    assert clock.now() == pytest.approx(results[-1].end)
    assert all(r.duration > 0 for r in results)
    # decode steps of one request cost about the same (context grows by one); prefill costs more
    assert results[0].duration > results[1].duration
    assert results[1].duration == pytest.approx(results[2].duration, rel=1e-3)
    s = e.stats.take_samples()
    # step 0 samples the first token; it leaves when step 1's launch ends (launch-bound)
    assert s["time_to_first_token_seconds"] == [
        pytest.approx(results[1].start + results[1].launch_s)]
    assert len(s["inter_token_latency_seconds"]) == 4
    assert s["e2e_request_latency_seconds"] == [pytest.approx(results[-1].end)]
    assert e.stats.take_samples()["inter_token_latency_seconds"] == []
    late, out = results[-1].outputs  # the previous step's token, then the last one
    assert not late.finished and out.finished and out.finish_reason == "length"


def test_tokens_are_deterministic_per_seed():
    def run(seed: int) -> list[int]:
        e = engine(seed=seed)
        e.add_request("a", prompt(30), 20)
        toks = []
        while e.has_unfinished():
            toks += [t for o in e.step().outputs for t in o.new_token_ids]
        return toks

    assert run(1) == run(1) and run(1) != run(2)
    assert all(0 <= t < 32000 for t in run(1))


def test_cost_model_knobs():
    from labkit.engines.sim.cost_model import CostModel
    from labkit.hardware import GPU_TYPES
    from labkit.models import get_model

    h100 = GPU_TYPES["h100"]
    m8b = get_model("llama-3.1-8b")
    base = CostModel(m8b, h100)
    fp8 = CostModel(m8b, h100, kv_cache_dtype="fp8")
    assert fp8.kv_bytes_per_token * 2 == base.kv_bytes_per_token
    # decode with long contexts is KV-read bound: fp8 KV is faster
    assert fp8.step_time(64, 64, 64 * 8000, 64 * 8000) < base.step_time(64, 64, 64 * 8000, 64 * 8000)
    # prefill is compute bound and grows with tokens
    assert base.step_cost(8192, 1, 8192, 8192 * 4096).bound == "compute"
    assert base.step_cost(1, 1, 100, 100).bound == "memory"
    m70 = get_model("llama-3.1-70b")
    tp1, tp4 = CostModel(m70, h100, tp=1), CostModel(m70, h100, tp=4)
    # a decode step reads a quarter of the weights per GPU (the fixed per-step overhead of
    # the calibrated costs file is not split)
    one, four = tp1.step_cost(1, 1, 1000, 1000), tp4.step_cost(1, 1, 1000, 1000)
    assert four.memory_s < one.memory_s / 3.5
    assert four.total_s - four.overhead_s < (one.total_s - one.overhead_s) / 2.5
    assert tp4.step_cost(2048, 1, 2048, 2048 * 1024).comm_s > 0
    pp2 = CostModel(m8b, h100, pp=2)
    assert pp2.step_cost(512, 1, 512, 512 * 256).comm_s > 0
    # fp8 KV and a larger memory fraction give more blocks
    few = engine(num_gpu_blocks=None, gpu_memory_utilization=0.5).num_gpu_blocks
    more = engine(num_gpu_blocks=None, gpu_memory_utilization=0.5, kv_cache_dtype="fp8").num_gpu_blocks
    assert more > 1.9 * few


def test_num_gpu_blocks_matches_real_vllm_log():
    # fixtures/vllm-0.26/logs/nixl-prefill.log: lab model, 0.25 of an H100, NixlConnector ->
    # "GPU KV cache size: 189,168 tokens" (11,823 blocks of 16).
    e = SimEngine("lab-1b", "h100", gpu_memory_utilization=0.25, max_num_batched_tokens=2048,
                  connector="nixl")
    assert e.num_gpu_blocks * 16 == pytest.approx(189_168, rel=0.03)


def test_paced_clock_follows_wall_time():
    import time

    clock = SimClock(paced=True, speed=2.0)
    t0 = time.monotonic()
    clock.advance_to(0.1)  # 0.1 simulated s at 2x: 0.05 wall s
    assert time.monotonic() - t0 >= 0.045
    assert clock.now() >= 0.1
    fast = SimClock()
    fast.advance(5.0)
    assert fast.now() == 5.0


def test_waiting_status_names_match_vllm():
    assert RequestStatus.WAITING_FOR_REMOTE_KVS.name == "WAITING_FOR_REMOTE_KVS"
    assert RequestStatus.is_finished(RequestStatus.FINISHED_ABORTED)
    assert not RequestStatus.is_finished(RequestStatus.PREEMPTED)


@pytest.mark.parametrize("chunked", [True, False])
def test_chunked_prefill_off_never_splits_a_waiting_prompt(chunked):
    # vllm/v1/core/sched/scheduler.py: without chunked prefill a waiting request whose new
    # tokens exceed the budget left is not split; scheduling stops there.
    e = engine(max_num_batched_tokens=4096, max_model_len=4096, enable_chunked_prefill=chunked,
               async_scheduling=False)
    e.add_request("a", prompt(3000), 2)
    e.add_request("b", prompt(3000, base=7), 2)
    steps = [e.step().scheduler_output.num_scheduled_tokens for _ in range(3)]
    if chunked:
        assert steps == [{"a": 3000, "b": 1096}, {"a": 1, "b": 1904}, {"b": 1}]
    else:
        assert steps == [{"a": 3000}, {"a": 1, "b": 3000}, {"b": 1}]
    while e.has_unfinished():
        e.step()
    assert e.stats.prompt_tokens_by_source["local_compute"] == 6000


def test_chunked_prefill_off_chunk_holds_max_model_len():
    # engine/arg_utils.py: the default chunk grows to max_model_len; config/scheduler.py
    # verify_max_model_len: a smaller explicit chunk is an error.
    assert engine(max_num_batched_tokens=None, max_model_len=20000,
                  enable_chunked_prefill=False).max_num_batched_tokens == 20000
    with pytest.raises(ValueError, match="smaller than max_model_len"):
        engine(max_num_batched_tokens=2048, max_model_len=4096, enable_chunked_prefill=False)


def test_example_connector_prefill_gets_chunked_prefill_off_from_the_plan():
    from labkit.bench.compare import Variant, _engine_kwargs, _plan

    plan = _plan("lab-1b", Variant("pd", {"connector": "example"}), 1, "h200", simulated=True)
    kw = {r: _engine_kwargs(plan.engine(r)) for r in ("prefill", "decode")}
    assert kw["prefill"]["enable_chunked_prefill"] is False
    assert kw["decode"]["enable_chunked_prefill"] is True
    prefill = SimEngine("lab-1b", "h200", **kw["prefill"])
    assert prefill.scheduler.enable_chunked_prefill is False
