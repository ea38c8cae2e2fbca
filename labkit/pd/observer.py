"""The observer KV connector: runs INSIDE vLLM 0.26 and publishes what the engine does.

Load it alone or beside a transfer connector (vLLM's `MultiConnector`)::

    {"kv_connector": "LabkitObserverConnector", "kv_role": "kv_both",
     "kv_connector_module_path": "labkit.pd.observer",
     "kv_connector_extra_config": {"observer_endpoint": "tcp://127.0.0.1:5601",
                                   "observer_name": "prefill"}}

It moves no KV: `get_num_new_matched_tokens` returns (0, False) and `request_finished`
returns (False, None) (vllm/distributed/kv_transfer/kv_connector/v1/base.py), so the
engine behaves exactly as without it. Every hook catches everything and counts drops:
the observer never blocks or raises into the engine. Drops are not silent: the first of
each cause (a hook that raised, e.g. because vLLM renamed a private field; the outbox or the
ZMQ queue full; a pool snapshot that failed) logs a warning with its traceback, and every
batch carries the process's running total (`ObserverBatch.num_dropped`).

Scheduler side (one instance in EngineCore): `StepScheduled` per scheduler step
(`build_connector_meta`), `RequestAllocated` (`update_state_after_alloc`),
`RequestFinished` (`request_finished`), `KVTransfer` for asynchronous loads/sends
(`update_connector_output`'s finished_recving/finished_sending), and a `PoolSnapshot`
of the block pool bound with `bind_gpu_block_pool` (`PoolWatcher`, <= 4 Hz, side thread).

CPU tier (vLLM's native KV offload, `OffloadingConnector`, listed beside the observer in the
same `MultiConnector`): the scheduler-side observer finds its sibling through the
MultiConnector on the call stack (`MultiConnector.__init__` builds `self._connectors` and
calls each child's constructor, then `bind_gpu_block_pool` on each), and `OffloadTap` emits
`OffloadTransfer` per finished copy job and `HostTierSnapshot` of the CPU blocks (<= 4 Hz,
side thread). See `OffloadTap` for the vLLM names it relies on and what its times measure.

Worker side (one instance per worker): `LayerTiming` for `save_kv_layer`,
`wait_for_layer_load` and `wait_for_save`, and `KVTransfer(direction="recv")` for
synchronous loads done inside `start_load_kv` (ExampleConnector does this).

What the times measure. vLLM's `MultiConnector` calls its children in order for each hook
(multi_connector.py: `for c in self._connectors: c.save_kv_layer(...)`). So:
- Bracket mode (recommended): list the observer twice, before and after the transfer
  connector, with `"observer_bracket": "open"` and `"close"`. The open instance only stamps
  the time; the close instance publishes `start` = open's stamp and `end` = its own: exactly
  the transfer connector's wall time in that hook for that layer (two `time.time()` calls
  apart, no model compute inside).
- Solo mode (no `observer_bracket`): `start` is the observer's previous worker hook in the
  same forward pass, `end` the current call. As the last child after a transfer connector,
  the interval holds that layer's model compute plus the transfer connector's per-layer
  work, so it brackets the transfer, not isolates it.
Times are wall clock (`time.time()`, comparable across processes). Asynchronous transfer
connectors (NixlConnector) return from the per-layer hooks at once; their transfer shows in
`KVTransfer` events from the scheduler side instead.
LayerTiming is published for steps that compute prompt tokens (prefill, chunked or not) or
load external KV; decode-only steps publish none (one event per layer per step would be
~2,000 events/s and carry no KV streaming). `num_bytes` is the KV of that layer for the
tokens concerned: prompt tokens computed in the step for "save", externally loaded tokens
for "load"; bytes per token and layer come from the KV caches given to `register_kv_caches`.

This module imports vLLM, torch-free numpy, labkit's observer schema and labkit.vocab only.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from labkit.pd.observer_offload import (  # noqa: F401 - re-exported for tests and readers
    OffloadTap,
    find_offloading_connector,
    host_block_states,
    multi_connector_children,
)
from labkit.telemetry import observer_schema as obs

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("labkit.observer")

# Stamps of the "open" instance, read by the "close" instance of the same process.
_OPEN_STAMPS: dict[tuple[str, str], float] = {}

_REF = attrgetter("ref_cnt")
_HASH = attrgetter("_block_hash")  # KVCacheBlock._block_hash (vllm/v1/core/kv_cache_utils.py)


def kv_bytes_per_token(kv_cache_config: Any, block_size: int) -> int:
    """KV bytes one token takes on this rank, all layers (0 when the config is unknown):
    sum over KV cache groups of page_size_bytes x layers, per block_size tokens."""
    try:
        total = sum(int(g.kv_cache_spec.page_size_bytes) * len(g.layer_names)
                    for g in kv_cache_config.kv_cache_groups)
        return total // max(1, block_size)
    except Exception:
        return 0


def block_states(refs: np.ndarray, hashed: np.ndarray) -> np.ndarray:
    """One byte per block: 0 free, 1 free but cached (has a hash), 2 ref 1, 3 ref >= 2."""
    return np.where(refs >= 2, 3, np.where(refs == 1, 2, hashed.astype(np.uint8))).astype(np.uint8)


class PoolWatcher:
    """Reads vLLM's BlockPool into one byte per block, off the scheduler's hot path.

    Cheap by caching: the scheduler hooks `mark()` the blocks they saw change (allocated,
    touched, freed) and only those are re-read, at most `max_hz` times a second, from a side
    thread; a vectorised full scan (numpy over `map(attrgetter)`, ~20 ms for 200k blocks)
    runs at start and at most every `full_every_s` while the pool changes, which catches what
    no hook shows (prefix-cache reset). Reads race the scheduler under the GIL: a snapshot may
    mix two adjacent steps, never a torn byte. Block 0 is vLLM's null block (reads 0).
    """

    def __init__(self, pool: Any, sink: Callable[[int, int, bytes], None],
                 max_hz: float = 4.0, full_every_s: float = 5.0,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.pool = pool
        self.sink = sink
        self.on_error = on_error
        self.period = 1.0 / max_hz
        self.full_every_s = full_every_s
        self.num_blocks = int(pool.num_gpu_blocks)
        self.state = np.zeros(self.num_blocks, dtype=np.uint8)
        self.num_snapshots = 0
        self._dirty: set[int] = set()
        self._freed: dict[int, float] = {}  # block -> re-read until this time
        self._full_due = True
        self._last_full = 0.0
        self._changed = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labkit-pool-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def mark(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._dirty.update(ids)
            self._changed = True

    def mark_freed(self, ids: Iterable[int]) -> None:
        """Blocks of a finished/preempted request: freed right after the hook, so re-read a while."""
        until = time.time() + 2.0
        with self._lock:
            for i in ids:
                self._freed[i] = until
            self._changed = True

    def mark_all_soon(self) -> None:
        with self._lock:
            self._full_due = True
            self._changed = True

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            if self._changed or self._freed:
                try:
                    self.snapshot()
                except Exception:
                    if self.on_error is not None:
                        self.on_error("pool_snapshot")
                    else:
                        logger.debug("labkit observer: pool snapshot failed", exc_info=True)

    def snapshot(self) -> bytes:
        """Refresh the cached states, hand them to the sink, and return them."""
        now = time.time()
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            freed = list(self._freed)
            full = self._full_due or (self._changed and now - self._last_full > self.full_every_s)
            self._full_due = False
            self._changed = False
        blocks = self.pool.blocks
        if full:
            n = self.num_blocks
            refs = np.fromiter(map(_REF, blocks), np.int32, count=n)
            hashed = np.fromiter(map(_HASH, blocks), object, count=n) != None  # noqa: E711
            self.state[:] = block_states(refs, hashed)
            self._last_full = now
        else:
            ids = np.fromiter(dirty.union(freed), np.int64)
            if ids.size:
                sel = [blocks[i] for i in ids]
                refs = np.fromiter(map(_REF, sel), np.int32, count=len(sel))
                hashed = np.fromiter(map(_HASH, sel), object, count=len(sel)) != None  # noqa: E711
                self.state[ids] = block_states(refs, hashed)
        with self._lock:
            for i in freed:
                if self.state[i] < 2 or self._freed.get(i, 0.0) < now:
                    self._freed.pop(i, None)
        out = self.state.tobytes()
        self.num_snapshots += 1
        self.sink(self.num_blocks, int(self.pool.get_num_free_blocks()), out)
        return out


class Outbox:
    """Events from any thread of the process, sent in batches by one sender thread.

    The ZMQ socket is made and used on the sender thread only (sockets are not thread-safe);
    the engine's threads only append to a bounded deque (thread-safe, never blocks). A full
    deque or a full ZMQ queue counts a drop. The publisher connects (`bind=False`) to a lab
    subscriber that binds `endpoint`, so the scheduler and every worker of every engine can
    share one address.
    """

    def __init__(self, endpoint: str, engine_id: str, role: str, flush_s: float = 0.05,
                 maxlen: int = 100_000, on_drop: Callable[[str, int], None] | None = None,
                 num_dropped: Callable[[], int] | None = None) -> None:
        self.endpoint, self.engine_id, self.role = endpoint, engine_id, role
        self.flush_s = flush_s
        self.num_dropped = 0  # events this outbox lost (queue full, send failed)
        self._on_drop = on_drop  # (cause, count): the connector's accounting
        self._total_dropped = num_dropped or (lambda: self.num_dropped)
        self.num_sent = 0
        self._q: deque[Any] = deque()
        self._maxlen = maxlen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labkit-observer-out", daemon=True)
        self._thread.start()

    def put(self, event: Any) -> None:
        if len(self._q) >= self._maxlen:
            self._dropped("outbox_full", 1)
            return
        self._q.append(event)

    def _dropped(self, cause: str, n: int) -> None:
        self.num_dropped += n
        if self._on_drop is not None:
            self._on_drop(cause, n)

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            pub = obs.ObserverPublisher(self.endpoint, engine_id=self.engine_id, role=self.role,
                                        kind="vllm", bind=False)
        except Exception:
            logger.exception("labkit observer: no publisher for %s", self.endpoint)
            return
        try:
            while True:
                stopping = self._stop.wait(self.flush_s)
                events = []
                while self._q and len(events) < 2000:
                    events.append(self._q.popleft())
                if events:
                    if pub.publish(events, num_dropped=self._total_dropped()):
                        self.num_sent += len(events)
                    else:
                        self._dropped("zmq_send", len(events))
                else:
                    pub.greet(self._total_dropped())  # a lab that just joined hears us
                if stopping and not self._q:
                    return
        finally:
            pub.close()


@dataclass
class ObserverMetadata(KVConnectorMetadata):
    """What the scheduler-side observer tells its worker-side twin for one step."""

    step: int = 0
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Prompt tokens computed this step per request (prefill work: what KV streaming is about).
    prefill_tokens: dict[str, int] = field(default_factory=dict)
    # Requests that load KV synchronously in this step's start_load_kv: req -> tokens.
    load_tokens: dict[str, int] = field(default_factory=dict)


class LabkitObserverConnector(KVConnectorBase_V1, SupportsHMA):
    """A KV connector that only watches: block ids, steps, pool state and hook timings."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.endpoint: str | None = extra.get("observer_endpoint")
        self.name: str = str(extra.get("observer_name") or self._kv_transfer_config.engine_id)
        self.bracket: str | None = extra.get("observer_bracket")  # None | "open" | "close"
        self.transfer_connector: str = str(extra.get("transfer_connector", ""))
        self.is_scheduler = role == KVConnectorRole.SCHEDULER
        self.is_passive = self.bracket == "open"
        self.block_size: int = int(vllm_config.cache_config.block_size)
        self.token_budget: int = int(vllm_config.scheduler_config.max_num_batched_tokens)
        self.num_drops = 0  # events lost, all causes (hooks that raised, outbox, ZMQ)
        self.drops_by_cause: dict[str, int] = {}
        self._step = 0
        self._lock = threading.Lock()
        # scheduler side
        self._local_hits: dict[str, int] = {}
        self._pending_alloc: dict[str, tuple[float, list[int], int, Any]] = {}
        self._req_blocks: dict[str, list[int]] = {}
        self._prompt_len: dict[str, int] = {}
        self._async_loads: dict[str, tuple[float, int]] = {}
        self._async_done: set[str] = set()  # loaded asynchronously: not a load when scheduled
        self._sched_bytes_per_token = kv_bytes_per_token(kv_cache_config, self.block_size)
        self._sends: dict[str, tuple[float, int]] = {}
        self._pool: PoolWatcher | None = None
        self._block_pool: Any = None  # vLLM's BlockPool (bind_gpu_block_pool): free count per step
        self._offload: OffloadTap | None = None  # vLLM's OffloadingConnector beside us, if any
        self._siblings: list[Any] | None = None  # MultiConnector._connectors (filled by bind time)
        if self.is_scheduler and not self.is_passive:
            try:
                self._siblings = multi_connector_children(self)
            except Exception:
                self._drop("find_multi_connector")
        # Conformance traces: RequestAdded (with prompt token ids) for every request.
        self.record_requests = bool(extra.get("observer_trace", False))
        self._vllm_config = vllm_config
        # worker side
        self._bytes_per_token_layer = 0
        self._num_layers = 0
        self._last_hook_ts = 0.0
        self._save_req_ids: list[str] = []
        self._publisher: Outbox | None = None
        if self.endpoint and not self.is_passive:
            try:
                self._publisher = Outbox(self.endpoint, self._engine_id(vllm_config, extra),
                                         str(extra.get("observer_role") or
                                             self._kv_transfer_config.kv_role or ""),
                                         on_drop=self._drop, num_dropped=lambda: self.num_drops)
            except Exception:  # never fail the engine's start-up for telemetry
                logger.exception("labkit observer: no outbox for %s", self.endpoint)

    def _engine_id(self, vllm_config: VllmConfig, extra: dict[str, Any]) -> str:
        """The engine's name; worker ranks beyond one GPU get "/rank<N>" appended."""
        if self.is_scheduler or vllm_config.parallel_config.world_size <= 1:
            return self.name
        try:
            from vllm.distributed.parallel_state import get_world_group

            return f"{self.name}/rank{get_world_group().rank_in_group}"
        except Exception:
            return f"{self.name}/worker"

    # ------------------------------------------------------------------ publishing
    def _drop(self, cause: str, n: int = 1) -> None:
        """Count `n` lost events; the first of each cause logs a warning (with the traceback
        when called from an `except` block), later ones are only counted."""
        self.num_drops += n
        first = cause not in self.drops_by_cause
        self.drops_by_cause[cause] = self.drops_by_cause.get(cause, 0) + n
        if first:
            logger.warning("labkit observer %s: dropped telemetry (%s); further drops of this "
                           "cause are only counted (ObserverBatch.num_dropped)", self.name,
                           cause, exc_info=sys.exc_info()[0] is not None)

    def _emit(self, event: Any) -> None:
        pub = self._publisher
        if pub is not None:
            pub.put(event)

    def shutdown(self) -> None:
        try:
            if self._pool is not None:
                self._pool.stop()
            if self._offload is not None:
                self._offload.stop()
            if self._publisher is not None:
                self._publisher.close()
        except Exception:
            self._drop("shutdown")

    # ================================================================== scheduler side
    def bind_gpu_block_pool(self, gpu_block_pool: Any) -> None:
        if self.is_passive or self._publisher is None:
            return
        self._block_pool = gpu_block_pool
        try:
            self._emit(self._engine_settings(gpu_block_pool))
        except Exception:
            self._drop("engine_settings")
        try:
            self._pool = PoolWatcher(gpu_block_pool, self._emit_snapshot, on_error=self._drop)
            self._pool.start()
        except Exception:
            self._drop("bind_gpu_block_pool")
        self._bind_offload()

    def _bind_offload(self) -> None:
        """Tap vLLM's OffloadingConnector when it is our sibling in the MultiConnector (its
        children are all built by now); a sibling we cannot read is a counted drop."""
        try:
            siblings = self._siblings
            if siblings is None:  # bind_gpu_block_pool is called from MultiConnector's own
                siblings = multi_connector_children(self)
            offloading = find_offloading_connector(siblings or ())
            if offloading is None:
                return
            self._offload = OffloadTap(
                offloading, self._emit, self._drop,
                gpu_block_bytes=self._sched_bytes_per_token * self.block_size,
                num_workers=int(getattr(self._vllm_config.parallel_config, "world_size", 1)))
            self._offload.install()
        except Exception:
            self._offload = None
            self._drop("bind_offload")

    def _engine_settings(self, gpu_block_pool: Any) -> obs.EngineSettings:
        """The scheduler's settings, for replaying a trace with the same ones."""
        cfg = self._vllm_config
        sc, cc, tc = cfg.scheduler_config, cfg.cache_config, cfg.kv_transfer_config
        extra = dict(getattr(tc, "kv_connector_extra_config", None) or {})
        names = [str(getattr(tc, "kv_connector", "") or "")]
        names += [str(c.get("kv_connector", "")) for c in extra.get("connectors", ()) or ()]
        return obs.EngineSettings(
            ts=time.time(),
            num_gpu_blocks=int(gpu_block_pool.num_gpu_blocks),
            block_size=int(cc.block_size),
            max_num_batched_tokens=int(sc.max_num_batched_tokens),
            max_num_seqs=int(sc.max_num_seqs),
            max_model_len=int(cfg.model_config.max_model_len),
            async_scheduling=bool(getattr(sc, "async_scheduling", False)),
            enable_chunked_prefill=bool(getattr(sc, "enable_chunked_prefill", True)),
            enable_prefix_caching=bool(getattr(cc, "enable_prefix_caching", True)),
            long_prefill_token_threshold=int(getattr(sc, "long_prefill_token_threshold", 0) or 0),
            kv_role=str(getattr(tc, "kv_role", "") or ""),
            defer_block_free=None,
            connectors=[n for n in names if n],
        )

    def on_new_request(self, request: Request) -> None:
        if self.is_passive or not self.record_requests:
            return
        try:
            sp = getattr(request, "sampling_params", None)
            self._emit(obs.RequestAdded(
                ts=time.time(), step=self._step + 1, req_id=request.request_id,
                prompt_token_ids=[int(t) for t in (request.prompt_token_ids or ())],
                max_tokens=int(getattr(request, "max_tokens", 0) or getattr(sp, "max_tokens", 0) or 0),
                ignore_eos=bool(getattr(sp, "ignore_eos", True))))
        except Exception:
            self._drop("on_new_request")

    def _emit_snapshot(self, num_blocks: int, num_free: int, state: bytes) -> None:
        self._emit(
            obs.PoolSnapshot(
                ts=time.time(), num_blocks=num_blocks, num_free=num_free, block_state=state
            )
        )

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        # num_computed_tokens here = local prefix-cache hits; remembered to tell local from
        # external tokens later (MultiConnector passes 0 external tokens to non-chosen children).
        try:
            self._local_hits[request.request_id] = int(num_computed_tokens)
        except Exception:
            self._drop("get_num_new_matched_tokens")
        return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if self.is_passive:
            return
        try:
            ids = list(blocks.get_block_ids()[0])
            rid = request.request_id
            self._pending_alloc[rid] = (time.time(), ids, int(num_external_tokens), request)
            self._prompt_len[rid] = int(request.num_prompt_tokens)
            if ids:
                self._req_blocks[rid] = ids
            if self._pool is not None:
                self._pool.mark(ids)
        except Exception:
            self._drop("update_state_after_alloc")

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = ObserverMetadata()
        if self.is_passive:
            return meta
        try:
            self._step += 1
            meta.step = self._step
            self._build_step(scheduler_output, meta)
        except Exception:
            self._drop("build_connector_meta")
        return meta

    def _build_step(self, so: SchedulerOutput, meta: ObserverMetadata) -> None:
        now = time.time()
        new_block_ids: dict[str, list[int]] = {}
        num_computed: dict[str, int] = {}
        sched = so.num_scheduled_tokens
        for req in so.scheduled_new_reqs:
            ids = list(req.block_ids[0]) if req.block_ids else []
            new_block_ids[req.req_id] = ids
            num_computed[req.req_id] = int(req.num_computed_tokens)
            self._req_blocks[req.req_id] = list(ids)
            self._note_prefill(meta, req.req_id, int(req.num_computed_tokens), sched)
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            self._note_prefill(meta, rid, int(cached.num_computed_tokens[i]), sched)
            nb = cached.new_block_ids[i]
            if nb is None:
                continue
            ids = list(nb[0])
            if not ids:
                continue
            new_block_ids[rid] = ids
            if rid in cached.resumed_req_ids:  # resumed: new_block_ids is the whole table
                self._req_blocks[rid] = list(ids)
            else:
                self._req_blocks.setdefault(rid, []).extend(ids)
        self._publish_allocations(num_computed, meta, now)
        preempted = sorted(so.preempted_req_ids or ())
        if self._pool is not None:
            for ids in new_block_ids.values():
                self._pool.mark(ids)
            for rid in preempted:
                self._pool.mark_freed(self._req_blocks.get(rid, ()))
        meta.num_scheduled_tokens = dict(so.num_scheduled_tokens)
        finished = sorted(so.finished_req_ids)
        if so.total_num_scheduled_tokens or finished or preempted:
            self._emit(
                obs.StepScheduled(
                    step=self._step,
                    ts=now,
                    token_budget=self.token_budget,
                    num_scheduled_tokens=dict(so.num_scheduled_tokens),
                    new_block_ids=new_block_ids,
                    num_computed_tokens=num_computed,
                    preempted=preempted,
                    finished=finished,
                    num_free=self._num_free(),
                )
            )

    def _num_free(self) -> int | None:
        pool = self._block_pool
        try:
            return int(pool.get_num_free_blocks()) if pool is not None else None
        except Exception:  # the step still goes out, without its free count
            self._drop("get_num_free_blocks", 0)
            return None

    def _note_prefill(self, meta: ObserverMetadata, rid: str, computed: int,
                      sched: dict[str, int]) -> None:
        """Record the prompt tokens `rid` computes this step (chunked prefill included)."""
        n = min(sched.get(rid, 0), self._prompt_len.get(rid, 0) - computed)
        if n > 0:
            meta.prefill_tokens[rid] = n

    def _publish_allocations(
        self, num_computed: dict[str, int], meta: ObserverMetadata, now: float
    ) -> None:
        """RequestAllocated for this step's allocations, with external tokens now known."""
        pending, self._pending_alloc = self._pending_alloc, {}
        for rid, (ts, ids, ext, request) in pending.items():
            local = self._local_hits.pop(rid, 0)
            if rid in self._async_done:  # its KV arrived asynchronously (KVTransfer sent then)
                self._async_done.discard(rid)
                ext = 0
            elif rid in num_computed:  # scheduled now: synchronous load (if any) this step
                total = num_computed[rid]
                ext = max(ext, total - local)
                if ext > 0:
                    meta.load_tokens[rid] = ext
            else:  # not scheduled: waiting for an asynchronous load (WAITING_FOR_REMOTE_KVS)
                ext = max(ext, int(getattr(request, "num_computed_tokens", 0)) - local)
                if ext > 0:
                    self._async_loads[rid] = (ts, ext)
            self._emit(
                obs.RequestAllocated(ts=ts, req_id=rid, block_ids=ids, num_external_tokens=ext)
            )

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        if not self.is_passive:
            try:
                rid = request.request_id
                self._emit(
                    obs.RequestFinished(
                        ts=time.time(), req_id=rid, block_ids=list(block_ids), delay_free=False
                    )
                )
                self._sends[rid] = (time.time(), int(request.num_computed_tokens))
                if self._pool is not None:
                    self._pool.mark_freed(self._req_blocks.pop(rid, block_ids))
                else:
                    self._req_blocks.pop(rid, None)
                self._local_hits.pop(rid, None)
                self._prompt_len.pop(rid, None)
                if len(self._sends) > 4096:  # sends only complete for async connectors
                    self._sends.pop(next(iter(self._sends)))
            except Exception:
                self._drop("request_finished")
        return False, None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict | None]:
        return self.request_finished(request, block_ids[0] if block_ids else [])

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Asynchronous transfers end here: the output aggregates every child's results."""
        if self.is_passive:
            return
        try:
            now = time.time()
            tap = self._offload
            for rid in connector_output.finished_recving or ():
                ts, tokens = self._async_loads.pop(rid, (now, 0))
                self._async_done.add(rid)
                if len(self._async_done) > 4096:
                    self._async_done.pop()
                # from the CPU tier when the OffloadingConnector built a load job for it
                source = ("OffloadingConnector" if tap is not None and rid in tap.load_reqs
                          else self.transfer_connector)
                self._emit(
                    obs.KVTransfer(ts=now, req_id=rid, direction="recv", num_tokens=tokens,
                                   num_bytes=tokens * self._sched_bytes_per_token, start=ts,
                                   end=now, connector=source)
                )
            for rid in connector_output.finished_sending or ():
                ts, tokens = self._sends.pop(rid, (now, 0))
                self._emit(
                    obs.KVTransfer(ts=now, req_id=rid, direction="send", num_tokens=tokens,
                                   num_bytes=tokens * self._sched_bytes_per_token, start=ts,
                                   end=now,
                                   connector=self.transfer_connector)
                )
                if self._pool is not None:
                    self._pool.mark_all_soon()
        except Exception:
            self._drop("update_connector_output")

    # ================================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        try:
            self._num_layers = len(kv_caches)
            cfg = self._kv_cache_config
            num_blocks = int(getattr(cfg, "num_blocks", 0) or 0)
            if kv_caches and num_blocks:
                t = next(iter(kv_caches.values()))
                total = t.numel() * t.element_size()
                self._bytes_per_token_layer = total // (num_blocks * self.block_size)
        except Exception:
            self._drop("register_kv_caches")

    def _now_bracketed(self, key: tuple[str, str]) -> tuple[float, float] | None:
        """(start, end) for this hook, or None for the passive "open" instance."""
        now = time.time()
        if self.bracket == "open":
            _OPEN_STAMPS[key] = now
            return None
        if self.bracket == "close":
            start = _OPEN_STAMPS.pop(key, now)
        else:
            start = self._last_hook_ts or now
        self._last_hook_ts = now
        return start, now

    def _meta(self) -> ObserverMetadata | None:
        m = self._connector_metadata
        return m if isinstance(m, ObserverMetadata) else None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        try:
            span = self._now_bracketed(("start_load_kv", ""))
            if span is None:
                return
            meta = self._meta()
            if meta is not None and meta.load_tokens and self.bracket == "close":
                # the transfer connector loaded synchronously between the two stamps
                per_token = self._bytes_per_token_layer * self._num_layers
                for rid, tokens in meta.load_tokens.items():
                    self._emit(
                        obs.KVTransfer(ts=span[1], req_id=rid, direction="recv",
                                       num_tokens=tokens, num_bytes=tokens * per_token,
                                       start=span[0], end=span[1],
                                       connector=self.transfer_connector)
                    )
        except Exception:
            self._drop("start_load_kv")

    def wait_for_layer_load(self, layer_name: str) -> None:
        try:
            span = self._now_bracketed(("load", layer_name))
            meta = self._meta()
            if span is None or meta is None or not meta.load_tokens:
                return
            tokens = sum(meta.load_tokens.values())
            self._emit(
                obs.LayerTiming(ts=span[1], op="load", layer=layer_name, start=span[0],
                                end=span[1], num_bytes=tokens * self._bytes_per_token_layer,
                                req_ids=sorted(meta.load_tokens))
            )
        except Exception:
            self._drop("wait_for_layer_load")

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        try:
            span = self._now_bracketed(("save", layer_name))
            meta = self._meta()
            if span is None or meta is None or not meta.prefill_tokens:
                return  # decode-only steps: no prompt KV to stream, no event
            tokens = sum(meta.prefill_tokens.values())
            self._emit(
                obs.LayerTiming(ts=span[1], op="save", layer=layer_name, start=span[0],
                                end=span[1], num_bytes=tokens * self._bytes_per_token_layer,
                                req_ids=sorted(meta.prefill_tokens))
            )
        except Exception:
            self._drop("save_kv_layer")

    def wait_for_save(self) -> None:
        try:
            span = self._now_bracketed(("wait_for_save", ""))
            meta = self._meta()
            self._last_hook_ts = 0.0  # end of the forward pass: solo intervals restart
            if span is None or meta is None or not meta.prefill_tokens:
                return
            self._emit(
                obs.LayerTiming(ts=span[1], op="save", layer="wait_for_save", start=span[0],
                                end=span[1], num_bytes=0, req_ids=sorted(meta.prefill_tokens))
            )
        except Exception:
            self._drop("wait_for_save")

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

