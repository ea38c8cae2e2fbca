"""The observer (labkit.pd.observer) reports vLLM's CPU tier: an OffloadTransfer per finished
GPU<->CPU copy job and HostTierSnapshot of the CPU blocks, read from vLLM's OffloadingConnector
beside it in the same MultiConnector. vLLM is not needed: its connector base module, its
MultiConnector, OffloadingConnector, CPUOffloadingManager and LRU policy are stood in for by
the attributes the observer reads, shaped as in vLLM 0.26."""

from __future__ import annotations

import ctypes
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from labkit.bench.observer_cpu import observer_module
from labkit.vocab import HOST_FREE, HOST_LOADING, HOST_STORED, HOST_STORING

PAGE_BYTES, NUM_LAYERS, BLOCK_SIZE = 4096, 2, 16
GPU_BLOCK_BYTES = PAGE_BYTES * NUM_LAYERS  # one GPU block's KV over all layers


@pytest.fixture()
def observer() -> Iterator[types.ModuleType]:
    """labkit.pd.observer imported against stand-ins for vLLM's KV-connector base module."""
    with observer_module(stand_in=True) as mod:
        yield mod


# ---- vLLM 0.26 stand-ins (only what the observer reads) --------------------------------------
class BlockStatus(ctypes.Structure):
    """vllm/v1/kv_offload/cpu/policies/base.py: ref_cnt -1 = not yet readable (storing)."""

    _fields_ = [("ref_cnt", ctypes.c_int32), ("block_id", ctypes.c_int64)]

    def __init__(self, block_id: int) -> None:
        super().__init__()
        self.ref_cnt = -1
        self.block_id = block_id


class LRUCachePolicy:  # vllm/v1/kv_offload/cpu/policies/lru.py
    def __init__(self) -> None:
        self.blocks: dict[Any, BlockStatus] = {}


class CPUOffloadingManager:  # vllm/v1/kv_offload/cpu/manager.py
    def __init__(self, num_blocks: int) -> None:
        self._num_blocks = num_blocks
        self._policy = LRUCachePolicy()
        self._next = 0

    def prepare_store(self, keys: list[str]) -> list[int]:
        ids = []
        for k in keys:
            self._policy.blocks[k] = BlockStatus(self._next)
            ids.append(self._next)
            self._next += 1
        return ids

    def complete_store(self, keys: set[str]) -> None:
        for k in keys:
            self._policy.blocks[k].ref_cnt = 0

    def prepare_load(self, keys: list[str]) -> list[int]:
        for k in keys:
            self._policy.blocks[k].ref_cnt += 1
        return [self._policy.blocks[k].block_id for k in keys]

    def complete_load(self, keys: set[str]) -> None:
        for k in keys:
            self._policy.blocks[k].ref_cnt -= 1


class Spec:  # vllm/v1/kv_offload/base.py BlockIDsLoadStoreSpec (GPU..., CPU...)
    def __init__(self, block_ids: list[int]) -> None:
        self.block_ids = np.array(block_ids, dtype=np.int64)


@dataclass
class TransferJob:  # .../v1/offloading/common.py
    req_id: str
    src_spec: Spec
    dst_spec: Spec


@dataclass
class OffloadingConnectorMetadata:
    load_jobs: dict[int, TransferJob]
    store_jobs: dict[int, TransferJob]
    jobs_to_flush: set[int] | None = None


@dataclass
class OffloadingWorkerMetadata:
    completed_jobs: dict[int, int] = field(default_factory=dict)


class OffloadingConnectorScheduler:  # .../v1/offloading/scheduler.py (what the tap touches)
    def __init__(self, num_cpu_blocks: int) -> None:
        self.manager = CPUOffloadingManager(num_cpu_blocks)
        self._jobs: dict[int, tuple[bool, set[str]]] = {}
        self._loads: dict[int, TransferJob] = {}
        self._stores: dict[int, TransferJob] = {}
        self._counter = 0

    def add_store(self, req_id: str, gpu: list[int], keys: list[str]) -> None:
        cpu = self.manager.prepare_store(keys)
        self._stores[self._counter] = TransferJob(req_id, Spec(gpu), Spec(cpu))
        self._jobs[self._counter] = (True, set(keys))
        self._counter += 1

    def add_load(self, req_id: str, gpu: list[int], keys: list[str]) -> None:
        cpu = self.manager.prepare_load(keys)
        self._loads[self._counter] = TransferJob(req_id, Spec(cpu), Spec(gpu))
        self._jobs[self._counter] = (False, set(keys))
        self._counter += 1


class OffloadingConnector:  # .../v1/offloading_connector.py
    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        self.connector_scheduler = OffloadingConnectorScheduler(num_cpu_blocks=8)

    def bind_gpu_block_pool(self, pool: Any) -> None:
        pass

    def build_connector_meta(self, scheduler_output: Any) -> OffloadingConnectorMetadata:
        s = self.connector_scheduler
        meta = OffloadingConnectorMetadata(load_jobs=s._loads, store_jobs=s._stores)
        s._loads, s._stores = {}, {}
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        meta = connector_output.kv_connector_worker_meta
        s = self.connector_scheduler
        for job_id in getattr(meta, "completed_jobs", {}):  # (a renamed field: vLLM's own)
            is_store, keys = s._jobs.pop(job_id)
            (s.manager.complete_store if is_store else s.manager.complete_load)(keys)


class ExampleConnector:  # a PD connector: not tapped
    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        self.connector_scheduler = SimpleNamespace()

    def bind_gpu_block_pool(self, pool: Any) -> None:
        pass

    def build_connector_meta(self, scheduler_output: Any) -> None:
        return None

    def update_connector_output(self, connector_output: Any) -> None:
        pass


class MultiConnector:  # .../v1/multi_connector.py: builds its children inside __init__
    def __init__(self, children: list[tuple[type, Any]], role: Any, kv_cache_config: Any) -> None:
        self._connectors: list[Any] = []
        for cls, cfg in children:
            self._connectors.append(cls(cfg, role, kv_cache_config))

    def bind_gpu_block_pool(self, pool: Any) -> None:
        for c in self._connectors:
            c.bind_gpu_block_pool(pool)

    def build_connector_meta(self, scheduler_output: Any) -> tuple:
        return tuple(c.build_connector_meta(scheduler_output) for c in self._connectors)

    def update_connector_output(self, connector_output: Any) -> None:
        slots = connector_output.kv_connector_worker_meta
        try:
            for i, c in enumerate(self._connectors):
                if slots is not None:
                    connector_output.kv_connector_worker_meta = slots[i]
                c.update_connector_output(connector_output)
        finally:
            connector_output.kv_connector_worker_meta = slots


# ---- the lab's two layouts ---------------------------------------------------------------------
def _config(bracket: str | None) -> SimpleNamespace:
    extra = {"observer_name": "prefill"}
    if bracket:
        extra["observer_bracket"] = bracket
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra, engine_id="e0",
                                           kv_role="kv_both", kv_connector="x"),
        cache_config=SimpleNamespace(block_size=BLOCK_SIZE, enable_prefix_caching=True),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=2048, max_num_seqs=8),
        model_config=SimpleNamespace(max_model_len=4096),
        parallel_config=SimpleNamespace(world_size=1))


KV_CACHE_CONFIG = SimpleNamespace(num_blocks=16, kv_cache_groups=[SimpleNamespace(
    kv_cache_spec=SimpleNamespace(page_size_bytes=PAGE_BYTES), layer_names=["l0", "l1"])])


class Pool:  # vLLM's BlockPool, as PoolWatcher reads it
    num_gpu_blocks = 16
    blocks = [SimpleNamespace(ref_cnt=0, _block_hash=None) for _ in range(16)]

    def get_num_free_blocks(self) -> int:
        return 16


def _engine(observer: types.ModuleType, layout: str) -> tuple[MultiConnector, Any, list[Any]]:
    """A MultiConnector as labkit.plan.vllm_args lays it out, bound to a block pool: (multi,
    the close observer, the events it emits)."""
    obs_cls = observer.LabkitObserverConnector
    if layout == "colocated":  # [observer open, OffloadingConnector, observer close]
        children = [(obs_cls, _config("open")), (OffloadingConnector, None),
                    (obs_cls, _config("close"))]
    else:  # pd: [observer open, Example, observer close, OffloadingConnector]
        children = [(obs_cls, _config("open")), (ExampleConnector, None),
                    (obs_cls, _config("close")), (OffloadingConnector, None)]
    multi = MultiConnector(children, observer.KVConnectorRole.SCHEDULER, KV_CACHE_CONFIG)
    close = multi._connectors[2]
    events: list[Any] = []
    close._publisher = SimpleNamespace(put=events.append, close=lambda: None)
    multi.bind_gpu_block_pool(Pool())
    close._pool.stop()
    if close._offload is not None:
        close._offload.stop()  # snapshots taken by hand below
    return multi, close, events


def _step(multi: MultiConnector, completed: dict[int, int] | None = None) -> None:
    """One engine step: build the metadata, then the workers' output comes back."""
    so = SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={},
                         total_num_scheduled_tokens=0,
                         scheduled_cached_reqs=SimpleNamespace(
                             req_ids=[], num_computed_tokens=[], new_block_ids=[],
                             resumed_req_ids=set()),
                         preempted_req_ids=set(), finished_req_ids=set())
    multi.build_connector_meta(so)
    slots = None
    if completed:
        slots = [None] * len(multi._connectors)
        i = next(i for i, c in enumerate(multi._connectors)
                 if isinstance(c, OffloadingConnector))
        slots[i] = OffloadingWorkerMetadata(completed_jobs=completed)
    multi.update_connector_output(SimpleNamespace(finished_recving=None, finished_sending=None,
                                                  kv_connector_worker_meta=slots))


def _of(events: list[Any], name: str) -> list[Any]:
    return [e for e in events if type(e).__name__ == name]


@pytest.mark.parametrize("layout", ["colocated", "pd"])
def test_a_store_then_a_load_are_reported_with_the_cpu_blocks_states(observer, layout) -> None:
    multi, close, events = _engine(observer, layout)
    tap = close._offload
    assert tap is not None and tap.num_blocks == 8
    sched = next(c for c in multi._connectors
                 if isinstance(c, OffloadingConnector)).connector_scheduler
    assert multi._connectors[0]._offload is None  # the passive "open" observer taps nothing

    state = np.frombuffer(tap.snapshot(), np.uint8)
    assert (state == HOST_FREE).all()

    sched.add_store("a", gpu=[1, 2, 3], keys=["k0", "k1", "k2"])  # request a's 3 blocks
    _step(multi)  # step 1 builds the store job
    state = np.frombuffer(tap.snapshot(), np.uint8)
    assert list(state) == [HOST_STORING] * 3 + [HOST_FREE] * 5
    assert not _of(events, "OffloadTransfer")  # not finished yet

    _step(multi, completed={0: 1})  # step 2: the worker reports job 0
    (store,) = _of(events, "OffloadTransfer")
    assert (store.req_id, store.transfer_type, store.step) == ("a", "GPU_to_CPU", 1)
    assert (store.num_blocks, store.num_bytes) == (3, 3 * GPU_BLOCK_BYTES)
    assert (store.gpu_block_ids, store.cpu_block_ids) == ([1, 2, 3], [0, 1, 2])
    assert store.start <= store.end
    tap.snapshot()
    last = _of(events, "HostTierSnapshot")[-1]
    assert list(last.block_state) == [HOST_STORED] * 3 + [HOST_FREE] * 5
    assert (last.num_blocks, last.num_free, last.num_stored) == (8, 5, 3)

    sched.add_load("b", gpu=[7, 8], keys=["k0", "k1"])  # a prefix hit on the CPU tier
    _step(multi)  # step 3 builds the load
    assert list(np.frombuffer(tap.snapshot(), np.uint8)[:3]) == [HOST_LOADING] * 2 + [HOST_STORED]
    _step(multi, completed={1: 1})
    load = _of(events, "OffloadTransfer")[-1]
    assert (load.req_id, load.transfer_type, load.step) == ("b", "CPU_to_GPU", 3)
    assert (load.num_blocks, load.num_bytes) == (2, 2 * GPU_BLOCK_BYTES)
    assert (load.gpu_block_ids, load.cpu_block_ids) == ([7, 8], [0, 1])
    assert close.num_drops == 0, close.drops_by_cause
    assert tap.step == close._step == 4  # the tap numbers steps as the observer does


def test_a_job_needs_every_worker_before_it_is_reported(observer) -> None:
    multi, close, events = _engine(observer, "colocated")
    close._offload.num_workers = 2  # tensor parallel 2: each worker copies its share
    sched = multi._connectors[1].connector_scheduler
    sched.add_store("a", gpu=[1], keys=["k0"])
    _step(multi)
    close._offload.on_output(SimpleNamespace(
        kv_connector_worker_meta=OffloadingWorkerMetadata({0: 1})))
    assert not _of(events, "OffloadTransfer")
    close._offload.on_output(SimpleNamespace(
        kv_connector_worker_meta=OffloadingWorkerMetadata({0: 1})))
    assert [e.req_id for e in _of(events, "OffloadTransfer")] == ["a"]


def test_renamed_vllm_attributes_are_counted_drops_not_exceptions(observer) -> None:
    multi, close, events = _engine(observer, "pd")
    tap = close._offload
    sched = multi._connectors[3].connector_scheduler
    # the worker metadata lost `completed_jobs`: the engine's own hook still runs
    multi.update_connector_output(SimpleNamespace(
        finished_recving=None, finished_sending=None,
        kv_connector_worker_meta=[None, None, None, SimpleNamespace(renamed={})]))
    assert close.drops_by_cause.get("offload_output") == 1
    # the metadata lost `store_jobs`
    tap.on_meta(SimpleNamespace(load_jobs={}))
    assert close.drops_by_cause.get("offload_meta") == 1
    # the manager's policy was renamed: the snapshot thread counts it
    del sched.manager._policy
    tap._changed = True
    tap.period = 0.01
    tap._stop.clear()
    threading.Thread(target=tap._run, daemon=True).start()
    deadline = time.monotonic() + 5
    while "host_tier_snapshot" not in close.drops_by_cause:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    tap.stop()
    # a completion for a job the tap never saw
    tap.on_output(SimpleNamespace(kv_connector_worker_meta=OffloadingWorkerMetadata({99: 1})))
    assert close.drops_by_cause.get("offload_job_unknown") == 1


def test_a_sibling_without_its_scheduler_is_a_drop_and_no_sibling_is_nothing(observer) -> None:
    class Broken(OffloadingConnector):  # vLLM renamed connector_scheduler
        def __init__(self, *a: Any) -> None:
            self.scheduler = None

    obs_cls = observer.LabkitObserverConnector
    multi = MultiConnector([(Broken, None), (obs_cls, _config("close"))],
                           observer.KVConnectorRole.SCHEDULER, KV_CACHE_CONFIG)
    close = multi._connectors[1]
    close._publisher = SimpleNamespace(put=lambda e: None, close=lambda: None)
    multi.bind_gpu_block_pool(Pool())  # does not raise
    close._pool.stop()
    assert close._offload is None and close.drops_by_cause.get("bind_offload") == 1

    alone = obs_cls(_config(None), observer.KVConnectorRole.SCHEDULER, KV_CACHE_CONFIG)
    alone._publisher = SimpleNamespace(put=lambda e: None, close=lambda: None)
    alone.bind_gpu_block_pool(Pool())  # no MultiConnector on the stack: no tap, no drop
    alone._pool.stop()
    assert alone._offload is None and alone.num_drops == 0


def test_host_block_states_from_ref_counts(observer) -> None:
    ids = np.array([0, 2, 3, 9], np.int64)  # 9: out of range, ignored
    refs = np.array([-1, 0, 2, 0], np.int32)
    state = observer.host_block_states(5, ids, refs)
    assert list(state) == [HOST_STORING, HOST_FREE, HOST_STORED, HOST_LOADING, HOST_FREE]


@pytest.mark.parametrize("layout", ["colocated", "pd"])
def test_a_cpu_tier_load_is_labelled_offloading_not_the_pd_connector(observer, layout) -> None:
    """finished_recving aggregates every child's loads; a request the OffloadingConnector built
    a load job for came from host memory, whatever connector the observer brackets."""
    multi, close, events = _engine(observer, layout)
    close.transfer_connector = "ExampleConnector"
    sched = next(c for c in multi._connectors
                 if isinstance(c, OffloadingConnector)).connector_scheduler
    sched.add_store("a", gpu=[1, 2], keys=["k0", "k1"])
    _step(multi)
    _step(multi, completed={0: 1})
    sched.add_load("b", gpu=[5, 6], keys=["k0", "k1"])
    _step(multi)
    multi.update_connector_output(SimpleNamespace(finished_recving={"b", "c"},
                                                  finished_sending=None,
                                                  kv_connector_worker_meta=None))
    recv = {e.req_id: e.connector for e in _of(events, "KVTransfer")}
    assert recv == {"b": "OffloadingConnector", "c": "ExampleConnector"}
