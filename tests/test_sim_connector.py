"""Simulated KV connectors count and time what vLLM 0.26's connectors do
(kv_connector/v1/example_connector.py, nixl/pull_scheduler.py)."""
from __future__ import annotations

import json

import pytest
from labfixtures import FIXTURES

from labkit.engines.sim.cluster import NIXL_PREFILL_PARAMS
from labkit.engines.sim.connector import InProcessTransport, align_to_block_size
from labkit.engines.sim.engine import SimEngine
from labkit.engines.sim.request import RequestStatus
from labkit.hardware import LINKS, achieved_link

KV_BYTES = 65536  # lab-1b: 2 * 16 layers * 8 kv heads * 128 * 2 bytes


def prompt(n: int, base: int = 0) -> list[int]:
    return [base + 1 + i % 30000 for i in range(n)]


def pair(connector: str, **kw) -> tuple[SimEngine, SimEngine, InProcessTransport]:
    transport = InProcessTransport(LINKS["nvlink"], LINKS["same-gpu"])
    common = dict(num_gpu_blocks=500, max_num_batched_tokens=2048, max_num_seqs=64,
                  connector=connector, transport=transport, **kw)
    return (SimEngine("lab-1b", "h100", engine_id="P", **common),
            SimEngine("lab-1b", "h100", engine_id="D", **common), transport)


def run_until_done(e: SimEngine, rid: str, t: float = 0.0):
    results = []
    while e.get_request(rid) is not None and not e.get_request(rid).is_finished():
        r = e.step(now=t)
        results.append(r)
        t = r.end
    return results


def test_align_to_block_size_matches_vllm():
    assert align_to_block_size(1080, 16) == 1072
    assert align_to_block_size(1088, 16) == 1072
    assert align_to_block_size(1089, 16) == 1088


def test_example_connector_decode_loads_prompt_minus_one_whole_blocks():
    p, d, _ = pair("example")
    tokens = prompt(1081)
    p.add_request("r", tokens, 1)
    pres = run_until_done(p, "r")
    assert len(pres) == 1 and pres[0].outputs[0].finished
    saves = [t for t in p.take_transfers() if t.direction == "send"]
    assert [(t.num_tokens, t.num_bytes) for t in saves] == [(1072, 1072 * KV_BYTES)]
    # The save runs inside the step: one /dev/shm file per layer (16 for lab-1b), each
    # paying the save path's latency, plus the bytes over its bandwidth (as measured: the
    # observer's save timings in real recordings, slower than the load path).
    link = achieved_link("example-save", LINKS["same-gpu"])
    assert link.bandwidth < LINKS["same-gpu"].bandwidth
    assert pres[0].kv_connector_time == pytest.approx(16 * link.latency + 1072 * KV_BYTES / link.bandwidth)
    plain = SimEngine("lab-1b", "h100", num_gpu_blocks=500, max_num_batched_tokens=2048)
    plain.add_request("r", tokens, 1)
    assert pres[0].duration == pytest.approx(plain.step().duration + pres[0].kv_connector_time)

    d.add_request("r", tokens, 4)
    first = d.step(now=pres[0].end)
    (new,) = first.scheduler_output.scheduled_new_reqs
    assert new.num_computed_tokens == 1072
    assert first.scheduler_output.num_scheduled_tokens == {"r": 9}  # the rest computed locally
    assert [t.num_tokens for t in d.take_transfers()] == [1072]
    # ~70 MB in 16 files: 21.6-24.4 ms measured on an H200 (docs/gpu-runs.md); the step waits.
    assert 0.018 < first.kv_connector_time < 0.03
    run_until_done(d, "r", first.end)
    assert d.stats.prompt_tokens_by_source == {"local_compute": 9, "local_cache_hit": 0,
                                               "external_kv_transfer": 1072}
    assert d.external_prefix_cache_stats == (1081, 1072)


def test_example_connector_prompt_one_past_a_block_misses():
    # Saved under align(len) tokens, looked up under align(len - 1): they differ exactly when
    # len % block_size == 1, so vLLM's ExampleConnector never hits such prompts.
    p, d, _ = pair("example")
    tokens = prompt(1089)
    p.add_request("r", tokens, 1)
    run_until_done(p, "r")
    d.add_request("r", tokens, 2)
    r = d.step(now=1.0)
    assert r.scheduler_output.scheduled_new_reqs[0].num_computed_tokens == 0
    assert d.external_prefix_cache_stats == (1089, 0)


def test_example_connector_local_hit_leaves_nothing_external():
    p, d, _ = pair("example")
    tokens = prompt(1081)
    p.add_request("r", tokens, 1)
    run_until_done(p, "r")
    d.add_request("a", tokens, 1)
    run_until_done(d, "a", 1.0)
    d.add_request("b", tokens, 1)
    r = d.step(now=2.0)
    assert r.scheduler_output.scheduled_new_reqs[0].num_computed_tokens == 1072
    assert d.get_request("b") is None or d.get_request("b").num_external_tokens == 0
    assert d.stats.prompt_tokens_by_source["local_cache_hit"] == 1072


def test_nixl_prefill_returns_vllm_shaped_kv_transfer_params_and_holds_blocks():
    fixture = json.loads((FIXTURES / "http" / "nixl-prefill-response.json").read_text().split("\n", 1)[1])
    p, d, transport = pair("nixl")
    tokens = prompt(1088)
    p.add_request("r", tokens, 1, kv_transfer_params=dict(NIXL_PREFILL_PARAMS))
    (res,) = run_until_done(p, "r")
    out = res.outputs[0]
    params = out.kv_transfer_params
    assert set(params) == set(fixture["kv_transfer_params"])
    assert params["remote_block_ids"] == fixture["kv_transfer_params"]["remote_block_ids"]  # [[1..68]]
    assert params["remote_num_tokens"] == 1088 and params["do_remote_prefill"] is True
    assert params["do_remote_decode"] is False and params["remote_engine_id"] == "P"
    # delay free: the 68 blocks stay allocated after the request finished
    assert p.kv_cache_manager.block_pool.get_num_free_blocks() == 499 - 68
    assert p.external_prefix_cache_stats == (1088, 0)  # queried, nothing external on prefill

    d.add_request("r", tokens, 8, kv_transfer_params=params, arrival_time=res.end)
    r1 = d.step(now=res.end)
    req = d.get_request("r")
    assert r1.num_scheduled_tokens == 0
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert req.num_external_tokens == 1088  # NIXL pulls every prompt token
    land = d.next_event_time()
    link = achieved_link("nixl", LINKS["nvlink"])  # NIXL as measured on 2xH200, not the peak
    assert land == pytest.approx(res.end + link.latency + 68 * 16 * KV_BYTES / link.bandwidth)
    assert 5.7e-3 <= land - res.end <= 6.1e-3  # the real transfer of these 68 blocks
    # Before the read lands, prefill still holds the blocks.
    p.step(now=land - 1e-6)
    assert p.kv_cache_manager.block_pool.get_num_free_blocks() == 499 - 68
    r2 = d.step(now=land)
    assert r2.scheduler_output.num_scheduled_tokens == {"r": 1}  # recompute the last token
    p.step(now=r2.start)
    assert p.kv_cache_manager.block_pool.get_num_free_blocks() == 499  # finished_sending: freed
    (recv,) = [t for t in d.take_transfers() if t.direction == "recv"]
    assert recv.num_bytes == 68 * 16 * KV_BYTES and recv.start == res.end
    run_until_done(d, "r", r2.end)
    assert d.stats.prompt_tokens_by_source == {"local_compute": 0, "local_cache_hit": 0,
                                               "external_kv_transfer": 1088}
    assert d.external_prefix_cache_stats == (1088, 1088)
    assert d.stats.generation_tokens == 8
    assert d.kv_cache_manager.block_pool.get_num_free_blocks() == 499


def test_nixl_decode_local_prefix_hit_pulls_only_the_rest():
    p, d, _ = pair("nixl")
    shared = prompt(512)
    d.add_request("warm", shared + prompt(100, 7000), 1)
    run_until_done(d, "warm")
    tokens = shared + prompt(300, 9000)
    p.add_request("r", tokens, 1, kv_transfer_params=dict(NIXL_PREFILL_PARAMS))
    (res,) = run_until_done(p, "r")
    d.add_request("r", tokens, 2, kv_transfer_params=res.outputs[0].kv_transfer_params)
    d.step(now=res.end)
    req = d.get_request("r")
    assert req.num_local_cached_tokens == 512 and req.num_external_tokens == 300
    (recv,) = d.take_transfers()
    assert recv.num_bytes == 19 * 16 * KV_BYTES  # the 19 unhashed blocks (812 tokens -> 51 blocks)


def test_nixl_abort_while_loading_frees_after_the_read():
    p, d, _ = pair("nixl")
    tokens = prompt(640)
    p.add_request("r", tokens, 1, kv_transfer_params=dict(NIXL_PREFILL_PARAMS))
    (res,) = run_until_done(p, "r")
    d.add_request("r", tokens, 4, kv_transfer_params=res.outputs[0].kv_transfer_params)
    d.step(now=res.end)
    assert d.abort("r")
    assert d.kv_cache_manager.block_pool.get_num_free_blocks() == 499 - 40  # load in flight
    d.step(now=d.next_event_time())
    assert d.kv_cache_manager.block_pool.get_num_free_blocks() == 499
    p.step(now=d.busy_until + 1e-3)
    assert p.kv_cache_manager.block_pool.get_num_free_blocks() == 499


def test_in_process_transport():
    t = InProcessTransport(LINKS["pcie"], LINKS["same-gpu"], links={("a", "b"): LINKS["rdma"]})
    assert t.link("a", "b") is LINKS["rdma"] and t.link("b", "a") is LINKS["pcie"]
    assert t.link("storage", "x") is LINKS["same-gpu"]
    woke = []
    t.on_notify = lambda eid, at: woke.append((eid, at))
    t.notify_read_done("P", "r1", 1.0)
    t.notify_read_done("P", "r2", 2.0)
    assert woke == [("P", 1.0), ("P", 2.0)]
    assert t.take_read_done("P", 1.5) == ["r1"]
    assert t.take_read_done("P", 1.5) == []
    assert t.take_read_done("P", 3.0) == ["r2"]
    assert not t.contains("k")
    t.store("k", 16)
    assert t.contains("k")



def _step_scheduling_pulled(async_scheduling: bool, busy: bool) -> tuple[int | None, int, float]:
    """A NIXL decode engine pulls a 640-token prompt, running another request or idle:
    (the step whose poll first saw the read done, the step that scheduled the request, that
    step's start minus the read's end)."""
    p, d, _ = pair("nixl", async_scheduling=async_scheduling)
    tokens = prompt(640)
    p.add_request("r", tokens, 1, kv_transfer_params=dict(NIXL_PREFILL_PARAMS))
    (res,) = run_until_done(p, "r")
    t = res.end
    if busy:
        d.add_request("busy", prompt(64, 5000), 400)
        for _ in range(3):
            t = d.step(now=t).end
    d.add_request("r", tokens, 4, kv_transfer_params=res.outputs[0].kv_transfer_params)
    seen = None
    while True:
        r = d.step(now=t)
        req = d.get_request("r")
        if any(x[0].request_id == "r" and x[1] for x in r.scheduler_output.scheduled):
            return seen, r.step, r.start - req.kv_recv_end
        if seen is None and req.kv_recv_end is not None and req.kv_recv_end <= r.start + r.launch_s:
            seen = r.step
        t = r.end if busy else max(r.end, d.next_event_time() or r.end)


@pytest.mark.parametrize("async_scheduling,lag", [(True, 2), (False, 1)])
def test_nixl_decode_schedules_a_pulled_request_at_vllms_step_boundary(async_scheduling, lag):
    """vLLM polls get_finished once per step (after the forward); the scheduler promotes a
    WAITING_FOR_REMOTE_KVS request in the schedule after that step's output: K+2 with the
    async batch queue, K+1 in sync mode. An idle engine spins empty steps, so it schedules
    the request as soon as its read lands."""
    seen, scheduled, _ = _step_scheduling_pulled(async_scheduling, busy=True)
    assert seen is not None and scheduled == seen + lag
    seen, _, after = _step_scheduling_pulled(async_scheduling, busy=False)
    assert seen is None and after == pytest.approx(0.0, abs=1e-9)  # at the read's end
