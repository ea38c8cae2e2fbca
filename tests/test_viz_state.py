"""Reducers fold scripted observer/timeline/NVML/metrics events into the right view state."""
from __future__ import annotations

import numpy as np
import pytest
from labfixtures import FIXTURES

from labkit.telemetry.metrics import MetricsSnapshot
from labkit.telemetry.observer_schema import (
    KVTransfer,
    LayerTiming,
    ObserverBatch,
    PoolSnapshot,
    RequestAllocated,
    RequestFinished,
    StepScheduled,
    decode_observer_batch,
    encode_observer_batch,
)
from labkit.telemetry.source import EngineMemory, GpuSample, MetricsSample
from labkit.viz.state import (
    BlockMapState,
    LatencyState,
    MemoryState,
    ScheduleState,
    TransferState,
    histogram_buckets,
)

GiB = 2**30


def batch(events, engine="prefill-0", role="prefill", kind="sim") -> ObserverBatch:
    # Through the wire codec, so the reducers see exactly what a subscriber hands them.
    return decode_observer_batch(encode_observer_batch(ObserverBatch(engine, role, kind, 0.0, events)))


def step(n, budget, sched, new_blocks, computed, preempted=(), finished=()) -> StepScheduled:
    return StepScheduled(n, float(n), budget, sched, new_blocks, computed, list(preempted), list(finished))


def test_blocks_prefix_sharing_then_finish():
    st = BlockMapState({"prefill-0": ("prefill", "sim", 32, 16)})
    # a: 40 tokens in blocks 1,2,3. b: shares a's first two blocks (prefix hit), own block 4.
    st.apply(batch([RequestAllocated(0.0, "a", [1, 2, 3], 0), step(1, 64, {"a": 40}, {"a": [1, 2, 3]}, {"a": 0})]))
    st.apply(batch([RequestAllocated(0.0, "b", [1, 2, 4], 0), step(2, 64, {"b": 8}, {"b": [1, 2, 4]}, {"b": 32})]))
    eng = st.engines["prefill-0"]
    assert eng.state[1:5].tolist() == [3, 3, 2, 2]  # shared, shared, in use, in use
    assert eng.refs[1:5].tolist() == [2, 2, 1, 1]
    assert [eng.req_names[c] for c in eng.owner[1:5]] == ["a", "a", "a", "b"]
    assert eng.tokens_per_block()[1:5].tolist() == [16, 16, 8, 8]
    assert sorted(eng.holders[1]) == ["a", "b"]
    # a finishes: shared blocks pass to b; a's partial tail block 3 is free (no hash).
    st.apply(batch([RequestFinished(3.0, "a", [1, 2, 3], False)]))
    assert eng.state[1:5].tolist() == [2, 2, 0, 2]
    assert [eng.req_names[c] for c in eng.owner[[1, 2, 4]]] == ["b", "b", "b"]
    assert eng.owner[3] == -1 and not eng.holders
    # b finishes: its two full blocks stay cached (evictable), the tail is free.
    st.apply(batch([step(3, 64, {}, {}, {}, finished=["b"])]))
    assert eng.state[1:5].tolist() == [1, 1, 0, 0]
    assert (eng.owner == -1).all()
    assert eng.counts().tolist() == [29, 2, 0, 0]


def test_snapshot_is_ground_truth_and_delay_free_waits_for_send():
    st = BlockMapState()
    st.apply(batch([RequestAllocated(0.0, "r", [5, 6], 0)], engine="p"))
    st.apply(batch([RequestFinished(1.0, "r", [5, 6], True)], engine="p"))
    eng = st.engines["p"]
    assert eng.state[5:7].tolist() == [2, 2], "delay_free keeps blocks until the KV is sent"
    st.apply(batch([KVTransfer(2.0, "r", "send", 32, 1 << 20, 1.0, 2.0, "NixlConnector")], engine="p"))
    assert eng.state[5:7].tolist() == [0, 0] and (eng.owner[5:7] == -1).all()
    state = np.zeros(10, np.uint8)
    state[[2, 3]] = [1, 3]
    st.apply(batch([PoolSnapshot(3.0, 10, 8, state.tobytes())], engine="p"))
    assert eng.num_blocks == 10
    assert eng.state.tolist() == state.tolist()
    assert eng.refs[3] >= 2 and eng.refs[2] == 0


def test_allocation_is_deduplicated_across_hooks():
    st = BlockMapState({"d": ("decode", "vllm", 16, 16)})
    # update_state_after_alloc and build_connector_meta both report the same new blocks.
    st.apply(batch([RequestAllocated(0.0, "x", [1, 2], 20),
                    step(1, 32, {"x": 1}, {"x": [1, 2]}, {"x": 20})], engine="d", kind="vllm"))
    assert st.engines["d"].refs[1:3].tolist() == [1, 1]
    st.apply(batch([step(2, 32, {"x": 1}, {"x": [3]}, {"x": 32})], engine="d", kind="vllm"))
    eng = st.engines["d"]
    assert eng.pos[1:4].tolist() == [0, 1, 2]
    assert eng.tokens_per_block()[1:4].tolist() == [16, 16, 1]


def test_transfer_state_from_timeline_and_kv_transfer():
    st = TransferState()
    for ev, t in [("arrival", 0.0), ("prefill_start", 0.01), ("prefill_end", 0.05),
                  ("kv_transfer_start", 0.05), ("kv_transfer_end", 0.08), ("first_token", 0.09),
                  ("token", 0.1), ("finish", 0.3)]:
        st.apply_timeline({"req_id": "a", "ts": 100 + t, "event": ev})
    r = st.requests["a"]
    # no connector event yet: the proxy's wait stands in, and says so
    assert r.transfer()[:2] == pytest.approx((100.05, 100.08)) and "proxy" in r.transfer()[2]
    assert r.transfer_seconds == 0.0 and r.gbps is None
    st.apply(batch([KVTransfer(0, "a", "recv", 1000, 64_000_000, 100.055, 100.075, "ExampleConnector"),
                    LayerTiming(0, "load", "model.layers.0.self_attn.attn", 100.05, 100.052, 4_000_000, ["a"])],
                   engine="decode-0", role="decode"))
    # the connector's own start/end win over the proxy's wait for decode's first byte
    assert r.transfer()[:2] == pytest.approx((100.055, 100.075)) and "on decode" in r.transfer()[2]
    assert r.gbps == pytest.approx(64e6 / 0.02 / 1e9)
    assert st.layers[("load (decode)", "model.layers.0.self_attn.attn")][0] == pytest.approx(0.002)
    assert st.t0 == pytest.approx(100.0)


def test_a_cpu_tier_load_is_not_a_pd_transfer():
    """The observer labels a load from vLLM's CPU tier OffloadingConnector (it also reports it
    as OffloadTransfer, drawn by viz/offload.py): the PD transfer Gantt leaves it out."""
    st = TransferState()
    st.apply(batch([KVTransfer(0, "a", "recv", 960, 60_000_000, 1.0, 1.002, "OffloadingConnector"),
                    KVTransfer(0, "b", "recv", 1000, 64_000_000, 1.1, 1.12, "NixlConnector")],
                   engine="decode-0", role="decode"))
    assert list(st.requests) == ["b"] and st.connector == "NixlConnector"


def test_transfer_state_joins_vllm_ids_into_one_row_per_request():
    """vLLM's internal ids (`cmpl-<id>-0-<8 hex>`, one suffix per engine) join the proxy's id."""
    st = TransferState()
    pre, dec = "cmpl-pd-x-0-1a2b3c4d", "cmpl-pd-x-0-9f8e7d6c"
    st.apply_timeline({"req_id": "pd-x", "ts": 10.0, "event": "arrival", "connector": "nixl"})
    # prefill's events arrive before the proxy learns prefill's response id: an orphan row
    st.apply(batch([step(1, 512, {pre: 100}, {pre: [1, 2]}, {pre: 0})], engine="prefill", role="prefill"))
    st.apply(batch([RequestFinished(10.05, pre, [1, 2], True)], engine="prefill", role="prefill"))
    st.apply_timeline({"req_id": "pd-x", "ts": 10.06, "event": "prefill_end", "prefill_id": "cmpl-pd-x",
                       "kv_transfer_params": {"remote_request_id": pre}})
    st.apply(batch([KVTransfer(10.1, dec, "recv", 100, 6_400_000, 10.07, 10.09, "NixlConnector"),
                    step(2, 512, {dec: 1}, {}, {dec: 100})], engine="decode", role="decode"))
    st.apply_timeline({"req_id": "pd-x", "ts": 10.5, "event": "finish", "decode_id": "cmpl-pd-x"})
    assert list(st.requests) == ["pd-x"] and len(st.rows()) == 1
    r = st.requests["pd-x"]
    assert r.prefill_first_step == pytest.approx(1.0)  # StepScheduled of step 1 (ts 1.0)
    assert r.prefill_done == pytest.approx(10.05) and r.recv_start == pytest.approx(10.07)
    assert st.label(pre) == st.label(dec) == st.label("pd-x") == "#1"
    assert st.ids.color(pre) == st.ids.color(dec)


def test_memory_state_breakdown_stacks_to_total():
    st = MemoryState()
    st.apply_engine_memory(EngineMemory("p", 0, 2 * GiB, 10 * GiB))
    st.apply_sample(GpuSample(1.0, 0, 20 * GiB, 80 * GiB, {"p": 14 * GiB, "d": 5 * GiB}))
    rows = {(e, c): b for e, c, b in st.breakdown(0)}
    assert rows[("p", "weights")] == 2 * GiB and rows[("p", "KV cache")] == 10 * GiB
    assert rows[("p", "engine other")] == 2 * GiB and rows[("d", "engine other")] == 5 * GiB
    assert rows[("", "other processes")] == 1 * GiB and rows[("", "free")] == 60 * GiB
    assert sum(rows.values()) == 80 * GiB
    st.apply_sample(GpuSample(2.0, 0, 30 * GiB, 80 * GiB, {"p": 14 * GiB, "d": 15 * GiB}))
    assert [v[-1] for _, v in st.history[0]] == [60 * GiB, 50 * GiB]  # free over time


def test_schedule_state_splits_prefill_chunks_from_decodes():
    st = ScheduleState()
    st.apply(batch([step(1, 512, {"a": 512}, {}, {"a": 0}),
                    step(2, 512, {"a": 488, "b": 24}, {}, {"a": 512, "b": 0}),
                    step(3, 512, {"a": 1, "b": 1}, {}, {"a": 1000, "b": 24}),
                    step(4, 512, {"c": 1}, {}, {"c": 0})]))
    s1, s2, s3, s4 = st.steps["prefill-0"]
    assert s1.prefill == [("a", 512)] and s2.prefill == [("a", 488), ("b", 24)]
    assert s3.prefill == [] and s3.decode == [("a", 1), ("b", 1)]
    assert s4.prefill == [("c", 1)], "a first schedule with nothing computed is a prefill"
    assert all(s.num_tokens <= s.token_budget for s in st.steps["prefill-0"])


def test_schedule_rows_only_for_schedulers_not_tp_worker_ranks():
    """With TP=2 the worker ranks ("prefill/rank1") send layer timings only: no schedule row."""
    st = ScheduleState()
    st.apply(batch([LayerTiming(0.1, "save", "model.layers.0", 0.1, 0.2, 4096, ["a"])],
                   engine="prefill/rank1"))
    st.apply(batch([step(1, 512, {"a": 512}, {}, {"a": 0})], engine="prefill"))
    assert list(st.steps) == ["prefill"] and list(st.kinds) == ["prefill"]


def test_latency_from_timeline_and_fixture_metrics():
    st = LatencyState()
    for ev, t in [("arrival", 0.0), ("first_token", 0.2), ("token", 0.25), ("token", 0.35), ("finish", 0.35)]:
        st.apply_timeline({"req_id": "a", "ts": t, "event": ev})
    assert list(st.ttft) == pytest.approx([0.2])
    assert list(st.itl) == pytest.approx([0.05, 0.1])
    snap = MetricsSnapshot.parse((FIXTURES / "metrics/nixl-decode.txt").read_text())
    st.apply_metrics(MetricsSample("decode-0", 0.0, snap, "decode", "vllm"))
    ttft = st.hist["decode-0"]["vllm:time_to_first_token_seconds"]
    assert ttft == histogram_buckets(snap, "vllm:time_to_first_token_seconds")
    assert ttft[-1][1] == snap.get("vllm:time_to_first_token_seconds_count")


def test_events_alone_agree_with_the_pool():
    """Folding only the hook events (no snapshots) reproduces the synthetic pool's truth."""
    from labkit.viz.synthetic import SyntheticSource

    src = SyntheticSource(num_blocks=3000, steps_per_poll=4, seed=3)
    st = BlockMapState({n: ("x", "sim", 3000, 16) for n in ("prefill-0", "decode-0")})
    num_shared_seen = num_busy_seen = 0
    for _ in range(60):
        for b in src.poll().observer:
            b.events = [e for e in b.events if not isinstance(e, PoolSnapshot)]
            st.apply(b)
        for name, pool in (("prefill-0", src.pre), ("decode-0", src.dec)):
            eng = st.engines[name]
            assert ((eng.state >= 2) == (pool.state >= 2)).all(), name
            assert ((eng.state == 3) == (pool.state == 3)).all(), name
            assert (eng.refs == pool.refs).all(), name
            num_shared_seen += int(np.count_nonzero(pool.state == 3))
            num_busy_seen += int(np.count_nonzero(pool.state >= 2))
    assert num_shared_seen > 0 and num_busy_seen > 1000, "the scenario shares and keeps blocks busy"
