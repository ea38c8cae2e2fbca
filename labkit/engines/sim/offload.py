"""The CPU tier: vLLM 0.26's native KV offload (`--kv-offloading-size GB`, OffloadingConnector).

Copied from vllm/v1/kv_offload/cpu/manager.py (CPUOffloadingManager), cpu/policies/lru.py
(LRUCachePolicy), cpu/spec.py (CPUOffloadingSpec: the pool size) and
distributed/kv_transfer/kv_connector/v1/offloading/scheduler.py (OffloadingConnectorScheduler),
with vLLM's defaults: one GPU block per CPU block (blocks_per_chunk 1), LRU eviction,
store_threshold 0 (every block), offload_prompt_only True (prompt blocks only).

    step K   build_connector_meta: a store job for every prompt block the step computes
             (`_build_store_jobs`; a finished request's last blocks at the next step);
             prepare_store allocates CPU blocks (ref_cnt -1: being written), evicting the
             least recently used stored ones if the pool is full.
    step K+1 the worker submits K's stores at the start of the step (`prepare_store_kv` defers
             them "so that offloading starts AFTER transfers related to token sampling"); they
             run GPU->CPU on the host link beside the forward pass; when one completes,
             complete_store makes its blocks readable (ref_cnt 0, evictable, most recent).
    lookup   get_num_new_matched_tokens: the CPU blocks that follow the request's GPU prefix
             hits, as consecutive full blocks; a hit loads ASYNCHRONOUSLY (the request waits
             in WAITING_FOR_REMOTE_KVS until the CPU->GPU load lands). A block still being
             written defers the request (None) until its store completes.

GPU blocks are not held for a store (request_finished returns False): vLLM flushes a pending
store before the block is reused; the simulator's stores always finish first (see
docs/conformance.md). Transfer times are SIMULATED: latency + bytes / bandwidth of the GPU's
PCIe link (labkit.hardware), one queue per direction.
"""
from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labkit.engines.sim.connector import _NOTHING, KVTransport, SimKVConnector, TransferRecord
from labkit.engines.sim.cost_model import transfer_time
from labkit.vocab import HOST_LOADING, HOST_STORED, HOST_STORING

if TYPE_CHECKING:
    from labkit.engines.sim.kv_cache_manager import KVCacheBlocks
    from labkit.engines.sim.request import Request
    from labkit.engines.sim.scheduler import SchedulerOutput
    from labkit.hardware import LinkSpec

GPU_TO_CPU, CPU_TO_GPU = "GPU_to_CPU", "CPU_to_GPU"  # vLLM's transfer_type label values


class LookupResult(enum.IntEnum):
    """vllm/v1/kv_offload/base.py LookupResult (RETRY is for remote tiers only)."""

    MISS = 0
    HIT = 1
    HIT_PENDING = 2


class BlockStatus:
    """cpu/policies/base.py BlockStatus: ref_cnt -1 = being written, >= 1 = being read."""

    __slots__ = ("ref_cnt", "block_id")

    def __init__(self, block_id: int) -> None:
        self.ref_cnt = -1
        self.block_id = block_id

    @property
    def is_ready(self) -> bool:
        return self.ref_cnt >= 0


class CPUOffloadingManager:
    """The CPU block pool with its own LRU (manager.py + policies/lru.py, policy "lru").

    Keys are the GPU blocks' hashes (blocks_per_chunk 1). A use is a store, a completed load
    or a touch (lookup / store of the request), and moves the key to the LRU's recent end.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._num_allocated_blocks = 0
        self._free_list: list[int] = []
        self.blocks: dict[int, BlockStatus] = {}  # LRUCachePolicy.blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref_cnt 0, least recent first
        self.num_write_pending = 0
        self.num_allocation_failures = 0
        self.allocation_sizes: list[int] = []  # drained by the metrics

    def get_num_free_blocks(self) -> int:
        return len(self._free_list) + self.num_blocks - self._num_allocated_blocks

    def lookup(self, key: int) -> LookupResult:
        block = self.blocks.get(key)
        if block is None:
            return LookupResult.MISS
        return LookupResult.HIT if block.ref_cnt >= 0 else LookupResult.HIT_PENDING

    def touch(self, keys: list[int]) -> None:
        """LRUCachePolicy.touch: the first key ends most recent."""
        evictable = self.evictable
        for key in reversed(keys):
            if key in evictable:
                evictable.move_to_end(key)

    def prepare_load(self, keys: list[int]) -> list[int]:
        """Pin the blocks for reading; returns their CPU block ids."""
        ids = []
        for key in keys:
            block = self.blocks[key]
            if block.ref_cnt == 0:
                del self.evictable[key]
            block.ref_cnt += 1
            ids.append(block.block_id)
        return ids

    def complete_load(self, keys: list[int]) -> None:
        for key in keys:
            block = self.blocks[key]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.evictable[key] = None

    def prepare_store(self, keys: list[int]) -> tuple[list[int], list[int], list[int]] | None:
        """(keys to store, their CPU block ids, evicted keys), or None if eviction fails."""
        keys_to_store = [k for k in keys if k not in self.blocks]
        if not keys_to_store:
            return [], [], []
        self.allocation_sizes.append(len(keys_to_store))
        num_to_evict = len(keys_to_store) - self.get_num_free_blocks()
        evicted: list[int] = []
        if num_to_evict > 0:
            if num_to_evict > len(self.evictable):
                return None
            protected = set(keys)
            for key in self.evictable:
                if key not in protected:
                    evicted.append(key)
                    if len(evicted) == num_to_evict:
                        break
            if len(evicted) < num_to_evict:
                return None
            for key in evicted:
                del self.evictable[key]
                self._free_list.append(self.blocks.pop(key).block_id)
        ids = []
        for key in keys_to_store:
            if self._num_allocated_blocks < self.num_blocks:
                block_id = self._num_allocated_blocks
                self._num_allocated_blocks += 1
            else:
                block_id = self._free_list.pop()
            self.blocks[key] = BlockStatus(block_id)
            ids.append(block_id)
        self.num_write_pending += len(keys_to_store)
        return keys_to_store, ids, evicted

    def complete_store(self, keys: list[int]) -> None:
        for key in keys:
            block = self.blocks.get(key)
            if block is not None and block.ref_cnt < 0:
                block.ref_cnt = 0
                self.num_write_pending -= 1
                self.evictable[key] = None

    def usage(self) -> tuple[float, float, float]:
        """(cpu_cache_usage_perc, write, read) as get_stats computes them: blocks pinned by
        transfers over the pool."""
        n = self.num_blocks or 1
        used = self._num_allocated_blocks - len(self._free_list) - len(self.evictable)
        write = self.num_write_pending / n
        return used / n, write, max(used / n - write, 0.0)

    def block_states(self) -> bytes:
        """One byte per CPU block: labkit.vocab HOST_* (free, stored, storing, loading)."""
        out = bytearray(self.num_blocks)
        for block in self.blocks.values():
            r = block.ref_cnt
            out[block.block_id] = HOST_STORING if r < 0 else (HOST_STORED if r == 0 else HOST_LOADING)
        return bytes(out)


@dataclass(slots=True)
class _ReqState:
    """RequestOffloadState with one KV group and blocks_per_chunk 1."""

    req: Request
    block_ids: list[int] = field(default_factory=list)
    next_stored_chunk_idx: int = 0
    num_locally_computed_tokens: int = 0
    transfer_jobs: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Job:
    req_id: str
    is_store: bool
    keys: list[int]
    gpu_block_ids: list[int]
    cpu_block_ids: list[int]
    step: int = -1  # the scheduler step that built it
    start: float = 0.0
    end: float = float("inf")


@dataclass(slots=True)
class HostTransfer:
    """One finished GPU<->CPU job (the observer's OffloadTransfer event)."""

    req_id: str
    transfer_type: str  # GPU_to_CPU | CPU_to_GPU
    num_blocks: int
    num_bytes: int
    start: float
    end: float
    gpu_block_ids: list[int]
    cpu_block_ids: list[int]
    step: int = -1


class OffloadingConnector(SimKVConnector):
    """vLLM's OffloadingConnector (scheduler side) with a timed stand-in for its worker.

    Args (beyond SimKVConnector's):
        cpu_bytes: kv_connector_extra_config["cpu_bytes_to_use"] (= --kv-offloading-size GiB).
        world_size: GPUs of the engine: a CPU block holds the block of every rank.
        link: the host link of each GPU (PCIe); ranks copy in parallel.
    """

    name = "offload"

    def __init__(self, engine_id: str, block_size: int, kv_bytes_per_token: int,
                 transport: KVTransport | None, num_layers: int = 1, *, cpu_bytes: int,
                 world_size: int = 1, link: LinkSpec) -> None:
        super().__init__(engine_id, block_size, kv_bytes_per_token, transport,  # type: ignore[arg-type]
                         num_layers)
        self.world_size = max(1, world_size)
        self.gpu_block_bytes = block_size * kv_bytes_per_token  # one rank's
        self.cpu_block_bytes = self.gpu_block_bytes * self.world_size
        # cpu/spec.py: num_blocks = cpu_bytes_to_use // kv_bytes_per_block (all workers).
        self.manager = CPUOffloadingManager(int(cpu_bytes) // self.cpu_block_bytes)
        self.link = link
        self._req_status: dict[str, _ReqState] = {}
        self._jobs: dict[int, _Job] = {}
        self._job_counter = 0
        self._num_steps = 0  # build_connector_meta calls = the engine's step numbers
        self._current_batch_load_jobs: list[int] = []
        self._unsubmitted_store_jobs: list[int] = []  # built last step: submitted this step
        self._chunks_being_loaded: set[int] = set()
        self._free_at = {GPU_TO_CPU: 0.0, CPU_TO_GPU: 0.0}  # one copy queue per direction
        self.host_transfers: list[HostTransfer] = []  # finished jobs, drained by the runner
        self.stats = {GPU_TO_CPU: [0, 0.0, []], CPU_TO_GPU: [0, 0.0, []]}  # bytes, time, sizes

    # -- scheduler side -------------------------------------------------------------------
    def on_new_request(self, request: Request) -> None:
        self._req_status[request.request_id] = _ReqState(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._req_status[request.request_id]
        st.block_ids.clear()
        if st.transfer_jobs:  # "Delaying request since it still has in-flight transfers"
            return None, False
        st.num_locally_computed_tokens = num_computed_tokens
        keys = request.block_hashes
        hits = self._lookup(st, keys, num_computed_tokens)
        self.manager.touch(keys)
        return hits, bool(hits)

    def _lookup(self, st: _ReqState, keys: list[int], num_computed_tokens: int) -> int | None:
        """_lookup / _maximal_prefix_lookup for one full-attention group."""
        bs = self.block_size
        max_hit = min(st.req.num_tokens, len(keys) * bs)
        if max_hit - num_computed_tokens < bs:
            return 0
        start = num_computed_tokens // bs
        num_chunks = min(-(-max_hit // bs), len(keys))
        hit_count, defer = 0, False
        lookup = self.manager.lookup
        for key in keys[start:num_chunks]:
            res = lookup(key)
            if res == LookupResult.MISS:
                break
            hit_count += 1
            if res == LookupResult.HIT_PENDING:
                defer = True
        if hit_count == 0:
            return 0
        num_hit_tokens = min(max_hit, bs * (start + hit_count)) - num_computed_tokens
        if num_hit_tokens < bs:
            return 0
        if defer:
            return None
        if self._chunks_being_loaded:
            end = -(-(num_computed_tokens + num_hit_tokens) // bs)
            if any(k in self._chunks_being_loaded for k in keys[start:end]):
                return None  # another request is loading these chunks: wait for it
        return num_hit_tokens

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        st = self._req_status[request.request_id]
        bs = self.block_size
        num_cached = st.num_locally_computed_tokens + num_external_tokens
        num_gpu_blocks = -(-num_cached // bs)
        group = blocks.blocks
        first = num_gpu_blocks
        for i, block in enumerate(group[:num_gpu_blocks]):
            if not block.is_null and block.block_hash is None:
                first = i
                break
        keys = list(request.block_hashes[first:num_gpu_blocks]) if first < num_gpu_blocks else []
        dst = [b.block_id for b in group[first:num_gpu_blocks]]
        st.next_stored_chunk_idx = num_gpu_blocks  # OffloadPolicy.BLOCK_LEVEL: hits not re-stored
        cpu_ids = self.manager.prepare_load(keys)
        job_id = self._new_job(_Job(request.request_id, False, keys, dst, cpu_ids))
        self._current_batch_load_jobs.append(job_id)
        st.transfer_jobs.add(job_id)
        self._chunks_being_loaded.update(keys)

    def _new_job(self, job: _Job) -> int:
        job.step = self._num_steps + (0 if job.is_store else 1)
        job_id = self._job_counter
        self._job_counter += 1
        self._jobs[job_id] = job
        return job_id

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Any:
        """_update_req_states + _build_store_jobs: (load jobs, store jobs) of this step."""
        self._num_steps += 1
        status = self._req_status
        for rid in scheduler_output.preempted_req_ids:
            st = status.get(rid)
            if st is not None:
                st.block_ids.clear()
        for rid, new_blocks in scheduler_output.req_to_new_blocks.items():
            st = status.get(rid)
            if st is not None:
                st.block_ids.extend(b.block_id for b in new_blocks.blocks)
        store_jobs = []
        for request, n, computed, _ in scheduler_output.scheduled:
            job = self._build_store_job(request.request_id, computed + n)
            if job is not None:
                store_jobs.append(job)
        for rid in scheduler_output.finished_req_ids:
            st = status.get(rid)
            if st is not None:
                job = self._build_store_job(rid, st.req.num_tokens)
                if job is not None:
                    store_jobs.append(job)
        loads, self._current_batch_load_jobs = self._current_batch_load_jobs, []
        return loads, store_jobs

    def _build_store_job(self, rid: str, num_tokens_after_batch: int) -> int | None:
        st = self._req_status.get(rid)
        if st is None:
            return None
        req = st.req
        # _calc_num_offloadable_tokens with offload_prompt_only
        offloadable = min(num_tokens_after_batch, req.num_tokens, req.num_prompt_tokens)
        # Only blocks the request holds (an aborted request may never have computed its prompt).
        num_chunks = min(offloadable // self.block_size, len(st.block_ids))
        start = st.next_stored_chunk_idx
        job_id = None
        if num_chunks > start:
            keys = req.block_hashes[start:num_chunks]
            out = self.manager.prepare_store(keys)
            if out is None:
                self.manager.num_allocation_failures += 1  # "cannot store chunks"
                self._maybe_cleanup_finished_req(rid, st)
                return None
            keys_to_store, cpu_ids, _ = out
            if keys_to_store:
                self.manager.touch(req.block_hashes)
                wanted = set(keys_to_store)
                gpu_ids = [st.block_ids[start + i] for i, k in enumerate(keys) if k in wanted]
                job_id = self._new_job(_Job(rid, True, keys_to_store, gpu_ids, cpu_ids))
                st.transfer_jobs.add(job_id)
        st.next_stored_chunk_idx = max(start, num_chunks)
        self._maybe_cleanup_finished_req(rid, st)
        return job_id

    def _maybe_cleanup_finished_req(self, rid: str, st: _ReqState) -> None:
        if st.req.is_finished() and not st.transfer_jobs:
            del self._req_status[rid]

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Blocks are never held for a store; the state stays for the last blocks' store."""
        if request.request_id not in self._req_status:
            return False, None
        return False, None

    def has_pending_push_work(self) -> bool:
        """vLLM keeps stepping while jobs are pending (has_pending_push_work)."""
        return bool(self._jobs) or any(st.req.is_finished() for st in self._req_status.values())

    # -- worker side (timed) --------------------------------------------------------------
    def start_step(self, meta: Any, now: float) -> float:
        """start_kv_transfers: last step's stores, then this step's loads; all async."""
        for job_id in self._unsubmitted_store_jobs:
            self._submit(job_id, GPU_TO_CPU, now)
        self._unsubmitted_store_jobs = []
        if meta:
            loads, stores = meta
            for job_id in loads:
                self._submit(job_id, CPU_TO_GPU, now)
            self._unsubmitted_store_jobs = list(stores)
        return 0.0

    def _submit(self, job_id: int, direction: str, now: float) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return
        start = max(now, self._free_at[direction])
        # Every rank copies its share over its own host link at the same time.
        job.start, job.end = start, start + transfer_time(len(job.keys) * self.gpu_block_bytes, self.link)
        self._free_at[direction] = job.end

    def get_finished(self, now: float) -> tuple[set[str], set[str]]:
        """Completed jobs: stores become readable, loads report finished_recving."""
        if not self._jobs:
            return _NOTHING
        done = [(jid, j) for jid, j in self._jobs.items() if j.end <= now]
        if not done:
            return _NOTHING
        recving: set[str] = set()
        for job_id, job in done:
            del self._jobs[job_id]
            direction = GPU_TO_CPU if job.is_store else CPU_TO_GPU
            if job.is_store:
                self.manager.complete_store(job.keys)
            else:
                self.manager.complete_load(job.keys)
                self._chunks_being_loaded.difference_update(job.keys)
                recving.add(job.req_id)
            num_bytes = len(job.keys) * self.cpu_block_bytes
            s = self.stats[direction]
            s[0] += num_bytes
            s[1] += job.end - job.start
            s[2].append(num_bytes)
            self.host_transfers.append(HostTransfer(job.req_id, direction, len(job.keys), num_bytes,
                                                    job.start, job.end, job.gpu_block_ids,
                                                    job.cpu_block_ids, job.step))
            if not job.is_store:
                self.transfers.append(TransferRecord(job.req_id, "recv", len(job.keys) * self.block_size,
                                                     num_bytes, job.start, job.end, self.name))
            st = self._req_status.get(job.req_id)
            if st is not None:
                st.transfer_jobs.discard(job_id)
                self._maybe_cleanup_finished_req(job.req_id, st)
        return _NOTHING[0], recving

    def next_event_time(self) -> float | None:
        if self._unsubmitted_store_jobs:
            return 0.0
        return min((j.end for j in self._jobs.values()), default=None)

    def take_host_transfers(self) -> list[HostTransfer]:
        out, self.host_transfers = self.host_transfers, []
        return out


class MultiConnector(SimKVConnector):
    """vLLM's MultiConnector (kv_connector/v1/multi_connector.py): a PD connector beside the
    offload connector. The first child with matched tokens loads them; every child sees every
    request and its blocks."""

    name = "multi"

    def __init__(self, connectors: list[SimKVConnector]) -> None:
        first = connectors[0]
        super().__init__(first.engine_id, first.block_size, first.kv_bytes_per_token,
                         first.transport, first.num_layers)
        self.connectors = connectors
        self._requests_to_connector: dict[str, int] = {}

    def on_new_request(self, request: Request) -> None:
        for c in self.connectors:
            c.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        to_return: tuple[int | None, bool] = (0, False)
        for i, c in enumerate(self.connectors):
            toks, load_async = c.get_num_new_matched_tokens(request, num_computed_tokens)
            if toks is None:
                return None, False
            if to_return[0] == 0 and toks > 0:
                self._requests_to_connector[request.request_id] = i
                to_return = (toks, load_async)
        return to_return

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        chosen = self._requests_to_connector.get(request.request_id, -1)
        for i, c in enumerate(self.connectors):
            c.update_state_after_alloc(request, blocks, num_external_tokens if i == chosen else 0)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> Any:
        return tuple(c.build_connector_meta(scheduler_output) for c in self.connectors)

    def start_step(self, meta: Any, now: float) -> float:
        return sum(c.start_step(m, now) for c, m in zip(self.connectors, meta or (None,) * len(self.connectors),
                                                         strict=True))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests_to_connector.pop(request.request_id, None)
        delay, params = False, None
        for c in self.connectors:
            d, p = c.request_finished(request, block_ids)
            delay = delay or d
            if params is None:
                params = p
        return delay, params

    def get_finished(self, now: float) -> tuple[set[str], set[str]]:
        sending: set[str] = set()
        recving: set[str] = set()
        for c in self.connectors:
            s, r = c.get_finished(now)
            sending |= s
            recving |= r
        return sending, recving

    def next_event_time(self) -> float | None:
        times = [t for t in (c.next_event_time() for c in self.connectors) if t is not None]
        return min(times) if times else None

    def has_pending_push_work(self) -> bool:
        return any(c.has_pending_push_work() for c in self.connectors)

    def take_transfers(self) -> list[TransferRecord]:
        return [t for c in self.connectors for t in c.take_transfers()]

    @property
    def is_kv_consumer(self) -> bool:  # type: ignore[override]
        return any(c.is_kv_consumer for c in self.connectors)


def offload_link(gpu: Any) -> LinkSpec:
    """The host link of one GPU for offload copies: the GPU's PCIe bandwidth, PCIe latency."""
    from labkit.hardware import LINKS, LinkSpec

    pcie = LINKS["pcie"]
    bw = min(float(getattr(gpu, "pcie_bw", pcie.bandwidth) or pcie.bandwidth), pcie.bandwidth)
    return LinkSpec("pcie", f"{pcie.name} GPU<->host (SIMULATED)", bw, pcie.latency)
