"""The observer connector (labkit.pd.observer) reports what it loses: a hook that raises, a
full outbox or a failed pool snapshot is counted, warned about once per cause, and carried
to the lab in every ObserverBatch (num_dropped). vLLM is not needed: its connector base
classes are stood in for by the few attributes the observer uses."""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Iterator
from types import SimpleNamespace

import msgspec
import pytest

from labkit.bench.observer_cpu import observer_module
from labkit.telemetry.observer_schema import (
    ObserverBatch,
    PoolSnapshot,
    decode_observer_batch,
    encode_observer_batch,
)
from labkit.telemetry.subscriber import ObserverSubscriber


@pytest.fixture()
def observer() -> Iterator[types.ModuleType]:
    """labkit.pd.observer imported against stand-ins for vLLM's KV-connector base module."""
    with observer_module(stand_in=True) as mod:
        yield mod


def _connector(observer: types.ModuleType, endpoint: str | None) -> object:
    extra = {"observer_name": "prefill"}
    if endpoint:
        extra["observer_endpoint"] = endpoint
    cfg = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra, engine_id="e0",
                                           kv_role="kv_both", kv_connector="x"),
        cache_config=SimpleNamespace(block_size=16),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=2048),
        parallel_config=SimpleNamespace(world_size=1))
    return observer.LabkitObserverConnector(cfg, observer.KVConnectorRole.SCHEDULER)


class _BrokenBlocks:
    """What vLLM would hand over if it renamed KVCacheBlocks.get_block_ids."""


def test_a_failing_hook_is_counted_warned_once_and_carried_to_the_lab(observer, caplog) -> None:
    got: list[ObserverBatch] = []
    with ObserverSubscriber("tcp://127.0.0.1:*", bind=True, callback=got.append) as sub:
        conn = _connector(observer, sub.endpoint)
        request = SimpleNamespace(request_id="r1", num_prompt_tokens=32, num_computed_tokens=32)
        with caplog.at_level(logging.WARNING, logger="labkit.observer"):
            for _ in range(3):
                conn.update_state_after_alloc(request, _BrokenBlocks(), 0)
        assert conn.num_drops == 3
        assert conn.drops_by_cause == {"update_state_after_alloc": 3}
        warned = [r for r in caplog.records if "dropped telemetry" in r.getMessage()]
        assert len(warned) == 1 and "update_state_after_alloc" in warned[0].getMessage()
        assert warned[0].exc_info is not None  # the traceback says what vLLM changed
        # The next event the engine emits carries the running total to the subscriber
        # (ZMQ joins late: emit until a batch arrives).
        deadline = time.monotonic() + 10
        while not any(b.num_dropped for b in got):
            assert time.monotonic() < deadline, "no observer batch reached the lab"
            conn.request_finished(request, [1, 2])
            time.sleep(0.1)
        conn.shutdown()
    batch = next(b for b in got if b.num_dropped)
    assert batch.engine_id == "prefill" and batch.num_dropped == 3
    assert conn.num_drops == 3  # the hooks that worked lost nothing


def test_a_full_outbox_and_a_failing_pool_snapshot_are_drops(observer, caplog) -> None:
    conn = _connector(observer, None)  # no endpoint: nothing is sent
    # an endpoint ZMQ refuses: the sender thread ends at once and never drains the queue
    box = observer.Outbox("nowhere", "prefill", "prefill", maxlen=2, on_drop=conn._drop)
    box._thread.join(5)
    for i in range(5):
        box.put(i)
    assert box.num_dropped == 3 and conn.drops_by_cause == {"outbox_full": 3}

    class Pool:  # a block pool whose blocks lost `_block_hash` (a vLLM rename)
        num_gpu_blocks = 4
        blocks = [SimpleNamespace(ref_cnt=0) for _ in range(4)]

        def get_num_free_blocks(self) -> int:
            return 4

    watcher = observer.PoolWatcher(Pool(), lambda *a: None, max_hz=50, on_error=conn._drop)
    with caplog.at_level(logging.WARNING, logger="labkit.observer"):
        watcher.start()
        deadline = time.monotonic() + 10
        while "pool_snapshot" not in conn.drops_by_cause:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        watcher.stop()
    assert any("pool_snapshot" in r.getMessage() for r in caplog.records)
    assert conn.num_drops >= 4


def test_old_recordings_decode_with_no_drops() -> None:
    """A batch encoded before num_dropped existed (no such key) reads as 0."""

    class OldBatch(msgspec.Struct):
        engine_id: str
        role: str
        kind: str
        ts: float
        events: list[PoolSnapshot]

    old = msgspec.msgpack.encode(OldBatch("decode", "decode", "vllm", 1.0,
                                          [PoolSnapshot(1.0, 2, 2, b"\0\0")]))
    assert decode_observer_batch(old).num_dropped == 0
    new = ObserverBatch("decode", "decode", "vllm", 1.0, [], num_dropped=7)
    assert decode_observer_batch(encode_observer_batch(new)).num_dropped == 7


def test_an_async_load_counts_its_external_tokens_once(observer) -> None:
    """A CPU-tier hit (OffloadingConnector inside MultiConnector, vLLM 0.26 scheduler.py
    `schedule`): update_state_after_alloc runs when the load is admitted (its blocks, the
    request set WAITING_FOR_REMOTE_KVS) and again when the request is scheduled after
    `finished_recving` (num_computed_tokens != 0: no second get_num_new_matched_tokens; the
    table has grown by the blocks of the new tokens). The observer reports both allocations,
    as the simulator does (labkit/teach/live.py explains them), with the 960 loaded tokens
    on the first only, one KVTransfer, and no synchronous load on the scheduled step."""
    conn = _connector(observer, None)
    events: list[object] = []
    conn._emit = events.append
    req = SimpleNamespace(request_id="a2", num_prompt_tokens=1024, num_computed_tokens=0)

    def blocks(n: int) -> SimpleNamespace:
        return SimpleNamespace(get_block_ids=lambda: (list(range(1, n + 1)),))

    def step(new: list[SimpleNamespace], sched: dict[str, int]) -> object:
        so = SimpleNamespace(
            scheduled_new_reqs=new, num_scheduled_tokens=sched,
            total_num_scheduled_tokens=sum(sched.values()),
            scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[],
                                                  new_block_ids=[], resumed_req_ids=set()),
            preempted_req_ids=set(), finished_req_ids=set())
        return conn.build_connector_meta(so)

    assert conn.get_num_new_matched_tokens(req, 0) == (0, False)  # no local hit
    conn.update_state_after_alloc(req, blocks(60), 0)  # MultiConnector: 0 to other children
    req.num_computed_tokens = 960  # set by the scheduler for the async load
    step([], {})
    conn.update_connector_output(SimpleNamespace(finished_recving={"a2"}, finished_sending=None))
    conn.update_state_after_alloc(req, blocks(64), 0)
    meta = step([SimpleNamespace(req_id="a2", block_ids=(list(range(1, 65)),),
                                 num_computed_tokens=960)], {"a2": 64})
    allocs = [e for e in events if type(e).__name__ == "RequestAllocated"]
    loads = [e for e in events if type(e).__name__ == "KVTransfer"]
    assert [(len(e.block_ids), e.num_external_tokens) for e in allocs] == [(60, 960), (64, 0)]
    assert sum(e.num_external_tokens for e in allocs) == 960
    assert [(e.direction, e.num_tokens) for e in loads] == [("recv", 960)]
    assert meta.load_tokens == {}  # not loaded again on the step that runs it
