"""labkit's observer beside vLLM 0.26's native KV offload (OffloadingConnector, the CPU tier).

Used by labkit/pd/observer.py (the observer connector): it finds the OffloadingConnector
among its MultiConnector siblings and publishes `OffloadTransfer` (one per finished copy
job) and `HostTierSnapshot` (one byte per CPU block). Imports no vLLM: everything read from
vLLM's objects is named in the docstrings, and a renamed field is a counted drop.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from labkit.telemetry import observer_schema as obs
from labkit.vocab import HOST_FREE, HOST_LOADING, HOST_STORED, HOST_STORING


def multi_connector_children(skip: object, max_depth: int = 8) -> list[Any] | None:
    """The children of the vLLM `MultiConnector` whose method is on the call stack, or None.

    MultiConnector.__init__ (vllm/distributed/kv_transfer/kv_connector/v1/multi_connector.py)
    makes `self._connectors = []` and then constructs each child into it, so a child's
    constructor finds that list one frame up; it is filled by the time `bind_gpu_block_pool`
    runs (the Scheduler calls it after building the connector)."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        children = getattr(owner, "_connectors", None) if owner is not skip else None
        if isinstance(children, list):
            return children
        frame = frame.f_back
    return None


def find_offloading_connector(children: Iterable[Any]) -> Any | None:
    """vLLM's OffloadingConnector (or a subclass) among MultiConnector's children, or None."""
    for c in children:
        if any(k.__name__ == "OffloadingConnector" for k in type(c).__mro__):
            return c
    return None


def host_block_states(num_blocks: int, ids: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """One byte per CPU block (labkit.vocab HOST_*) from vLLM's BlockStatus fields: a block the
    cache policy holds is storing (ref_cnt -1: written, not yet readable), stored (0) or
    loading (> 0: read by that many loads); any other block id is free."""
    state = np.full(num_blocks, HOST_FREE, dtype=np.uint8)
    ok = (ids >= 0) & (ids < num_blocks)
    state[ids[ok]] = np.where(refs[ok] < 0, HOST_STORING,
                              np.where(refs[ok] == 0, HOST_STORED, HOST_LOADING))
    return state


@dataclass(slots=True)
class _OffloadJob:
    req_id: str
    transfer_type: str  # vLLM's labels: GPU_to_CPU | CPU_to_GPU
    gpu_block_ids: list[int]
    cpu_block_ids: list[int]
    step: int
    start: float
    pending: int  # workers yet to report it (vLLM: TransferJobStatus.pending_count)


class OffloadTap:
    """Watches vLLM 0.26's OffloadingConnector (scheduler side): its copy jobs and its CPU tier.

    Jobs. `install()` puts two pass-through wrappers on that connector instance (instance
    attributes shadowing its methods; MultiConnector calls `c.build_connector_meta(...)` and
    `c.update_connector_output(...)` on it): each calls vLLM's method unchanged, returns its
    result, lets its exceptions through, and only reads:
    - `build_connector_meta`'s `OffloadingConnectorMetadata.load_jobs` / `.store_jobs`
      (offloading/common.py: job id -> `TransferJob(req_id, src_spec, dst_spec)`, the specs'
      `block_ids`: GPU ids for `GPULoadStoreSpec`, CPU ids for `CPULoadStoreSpec`);
    - `update_connector_output`'s `kv_connector_worker_meta` (its own slot, set by
      MultiConnector): `OffloadingWorkerMetadata.completed_jobs` (job id -> workers that
      finished it); a job is done when all `world_size` workers reported it.
    Reading both at the connector itself makes it independent of where the observer sits
    in the MultiConnector's list (before or after the OffloadingConnector).

    Times (wall clock, `time.time()`, the scheduler process). `start`: when the scheduler
    built the job (the OffloadingConnector's `build_connector_meta` returned). A load's copy
    starts in that step's `start_load_kv`; a store's copy is deferred by the worker to the
    next step's (offloading/worker.py `prepare_store_kv`). `end`: when the scheduler received
    the last worker's completion (`update_connector_output`, before vLLM processes it). So
    `end - start` is the scheduler's view of the job, quantized to steps: an upper bound on
    the copy itself. The copy's own CUDA-event time is only aggregated per step by vLLM
    (`OffloadingWorkerMetadata.transfer_stats`, Prometheus `vllm:kv_offload_total_time`).
    `num_bytes`: GPU blocks copied x one GPU block's KV over all layers, on one rank.

    CPU tier. A side thread reads the manager's cache policy at most `max_hz` times a second
    while jobs come and go: `spec.get_manager()` is vllm/v1/kv_offload/cpu/manager.py
    `CPUOffloadingManager` (`_num_blocks`; `_policy.blocks` for LRU, `_policy.t1`/`.t2` for
    ARC: offload key -> `BlockStatus(ref_cnt, block_id)`). Reads race the scheduler under
    the GIL: a snapshot may mix two adjacent steps.
    """

    def __init__(self, connector: Any, emit: Callable[[Any], None],
                 on_drop: Callable[[str], None], gpu_block_bytes: int, num_workers: int = 1,
                 max_hz: float = 4.0, max_jobs: int = 8192) -> None:
        self.connector = connector
        self.manager = connector.connector_scheduler.manager
        self.num_blocks = int(self.manager._num_blocks)
        self.emit = emit
        self.on_drop = on_drop
        self.gpu_block_bytes = gpu_block_bytes
        self.num_workers = max(1, num_workers)
        self.period = 1.0 / max_hz
        self.max_jobs = max_jobs
        self.step = 0  # the connector's build_connector_meta calls: the scheduler step
        self.num_snapshots = 0
        self.jobs: dict[int, _OffloadJob] = {}
        # requests with a CPU_to_GPU job (newest 4,096): their finished_recving is a CPU-tier
        # load, not the PD connector's (MultiConnector loads a request from one child only)
        self.load_reqs: dict[str, None] = {}
        self._changed = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labkit-host-tier", daemon=True)

    def install(self) -> None:
        """Wrap the connector's two scheduler hooks and start the snapshot thread."""
        c, tap = self.connector, self
        build, update = c.build_connector_meta, c.update_connector_output

        def build_connector_meta(scheduler_output: Any) -> Any:
            meta = build(scheduler_output)
            tap.on_meta(meta)
            return meta

        def update_connector_output(connector_output: Any) -> None:
            done = tap.on_output(connector_output)
            update(connector_output)
            if done:  # vLLM's complete_store/complete_load just ran
                tap._changed = True

        self._thread.start()
        c.build_connector_meta = build_connector_meta
        c.update_connector_output = update_connector_output

    def stop(self) -> None:
        self._stop.set()

    def on_meta(self, meta: Any) -> None:
        """A step's new jobs (never raises)."""
        try:
            self.step += 1
            now = time.time()
            for jobs, kind, gpu, cpu in ((meta.load_jobs, "CPU_to_GPU", "dst_spec", "src_spec"),
                                         (meta.store_jobs, "GPU_to_CPU", "src_spec", "dst_spec")):
                for job_id, job in (jobs or {}).items():
                    if kind == "CPU_to_GPU":
                        self.load_reqs[str(job.req_id)] = None
                        if len(self.load_reqs) > 4096:
                            self.load_reqs.pop(next(iter(self.load_reqs)))
                    self.jobs[int(job_id)] = _OffloadJob(
                        str(job.req_id), kind,
                        [int(b) for b in getattr(job, gpu).block_ids],
                        [int(b) for b in getattr(job, cpu).block_ids],
                        self.step, now, self.num_workers)
                    self._changed = True
            while len(self.jobs) > self.max_jobs:  # completions we never heard of
                self.jobs.pop(next(iter(self.jobs)))
                self.on_drop("offload_job_lost")
        except Exception:
            self.on_drop("offload_meta")

    def on_output(self, connector_output: Any) -> bool:
        """Jobs the workers finished: one OffloadTransfer each; whether any (never raises)."""
        try:
            meta = connector_output.kv_connector_worker_meta
            if meta is None:
                return False
            now = time.time()
            done = False
            for job_id, count in meta.completed_jobs.items():
                job = self.jobs.get(int(job_id))
                if job is None:  # built before the tap was installed, or lost
                    self.on_drop("offload_job_unknown")
                    continue
                job.pending -= int(count)
                if job.pending > 0:
                    continue
                del self.jobs[int(job_id)]
                done = True
                self.emit(obs.OffloadTransfer(
                    ts=now, req_id=job.req_id, transfer_type=job.transfer_type,
                    num_blocks=len(job.cpu_block_ids),
                    num_bytes=len(job.gpu_block_ids) * self.gpu_block_bytes,
                    start=job.start, end=now, gpu_block_ids=job.gpu_block_ids,
                    cpu_block_ids=job.cpu_block_ids, step=job.step))
            return done
        except Exception:
            self.on_drop("offload_output")
            return True

    def _run(self) -> None:
        wait = self.period
        while not self._stop.wait(wait):
            if self._changed:
                t0 = time.perf_counter()
                try:
                    self.snapshot()
                except Exception:
                    self.on_drop("host_tier_snapshot")
                # a large tier: keep the scan (which holds the GIL) under ~5% of the time
                wait = max(self.period, 20 * (time.perf_counter() - t0))

    def snapshot(self) -> bytes:
        """Read the CPU blocks' states, emit a HostTierSnapshot, and return the states."""
        self._changed = False
        policy = self.manager._policy
        held = getattr(policy, "blocks", None)  # LRUCachePolicy
        if held is not None:
            statuses = list(held.values())
        else:  # ARCCachePolicy
            statuses = list(policy.t1.values()) + list(policy.t2.values())
        n = len(statuses)
        ids = np.fromiter((s.block_id for s in statuses), np.int64, count=n)
        refs = np.fromiter((s.ref_cnt for s in statuses), np.int32, count=n)
        state = host_block_states(self.num_blocks, ids, refs)
        counts = np.bincount(state, minlength=4)
        out = state.tobytes()
        self.emit(obs.HostTierSnapshot(
            ts=time.time(), num_blocks=self.num_blocks, num_free=int(counts[HOST_FREE]),
            num_stored=int(counts[HOST_STORED]), block_state=out))
        self.num_snapshots += 1
        return out
