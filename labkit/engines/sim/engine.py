"""SimEngine: one simulated vLLM engine (scheduler + KV cache + connector + cost model).

Each `step()` is one vLLM engine-core iteration: the worker reports finished KV transfers,
the requests the scheduler has seen by then join it, it schedules, the cost model says how
long the launch part (CPU: overhead, plus any synchronous connector load/save) and the GPU
part take, every request whose tokens are all computed samples one pseudo-random token
(vLLM's dummy weights produce noise too), and the step's outputs leave the engine (tokens
out, finished requests freed). With async scheduling (vLLM 0.26's default) step K's output
is processed (update_from_output) after step K+1 was scheduled, as vLLM's
step_with_batch_queue does; a GPU-bound step fixes the next step's batch at its start
(lookahead) and a launch-bound one emits its tokens when the next step's launch ends:
labkit/engines/sim/async_sched.py.
"""
from __future__ import annotations

import itertools
import random
from typing import Any

from labkit.engines.sim.async_sched import RequestInbox, launch_bound
from labkit.engines.sim.clock import SimClock
from labkit.engines.sim.connector import (
    InProcessTransport,
    KVTransport,
    NixlConnector,
    SimKVConnector,
    TransferRecord,
    make_connector,
    nixl_extra_config,
)
from labkit.engines.sim.cost_model import (
    CostModel,
    CostParams,
    StepCost,
    kv_cache_num_blocks,
    load_cost_params,
)
from labkit.engines.sim.kv_cache_manager import KVCacheManager
from labkit.engines.sim.offload import MultiConnector, OffloadingConnector, offload_link
from labkit.engines.sim.output import RequestOutput, StepResult
from labkit.engines.sim.request import HASH_FUNCTIONS, Request, RequestStatus
from labkit.engines.sim.scheduler import Scheduler, SchedulerOutput
from labkit.engines.sim.settings import EngineStats, _chunk, serve_defaults

__all__ = ["EngineStats", "RequestOutput", "SimEngine", "StepResult", "serve_defaults"]


class SimEngine:
    """A simulated vLLM V1 engine.

    Args:
        model: a labkit.models preset name / path, or a ModelShape.
        gpu: a labkit.hardware.GPU_TYPES key, or a GPUType.
        tp, pp: tensor / pipeline parallel sizes.
        kv_cache_dtype: "auto" | "fp8" | ...
        block_size: tokens per KV block.
        max_num_batched_tokens: token budget per step (chunk size); None: vLLM's serve default.
        max_num_seqs: running-request cap; None: vLLM's serve default.
        max_model_len: None: the model's max_position_embeddings.
        num_gpu_blocks: pool size; None: computed from gpu_memory_utilization.
        connector: "example" | "nixl" | a SimKVConnector | None.
        transport: how the connector reaches other engines (default: a private in-process one).
        clock: shared SimClock (default: a fast private one).
        seed: seeds the sampled token ids.
        async_scheduling: schedule one step ahead like vLLM 0.26's default AsyncScheduler
            (a request reaching a busy engine joins one step later); False: vLLM's sync loop.
        enable_chunked_prefill: False: a prompt is never split over steps (it waits for a
            step with room); the chunk must then hold max_model_len (vLLM's rule).
        kv_offloading_size: GiB of host memory for vLLM's CPU tier (--kv-offloading-size):
            the OffloadingConnector, alone or in a MultiConnector after `connector`
            (labkit/engines/sim/offload.py). None: no CPU tier.
        kv_connector_extra_config: vLLM's kv_transfer_config["kv_connector_extra_config"];
            the NIXL connector reads "kv_lease_duration" (seconds a prefill engine holds a
            finished request's blocks for decode, default 30).
    """

    def __init__(self, model: Any = "lab-1b", gpu: Any = "h100", *, tp: int = 1, pp: int = 1,
                 kv_cache_dtype: str = "auto", block_size: int = 16,
                 max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
                 max_model_len: int | None = None, long_prefill_token_threshold: int = 0,
                 num_gpu_blocks: int | None = None, gpu_memory_utilization: float = 0.92,
                 enable_prefix_caching: bool = True, connector: str | SimKVConnector | None = None,
                 transport: KVTransport | None = None, engine_id: str | None = None,
                 clock: SimClock | None = None, seed: int = 0, enable_kv_cache_events: bool = False,
                 record_observer_events: bool = False, cost_params: CostParams | None = None,
                 hash_algo: str = "builtin", eos_token_id: int | None = None,
                 side_channel_port: int = 5600, tp_link_bw: float | None = None,
                 async_scheduling: bool = True, enable_chunked_prefill: bool = True,
                 kv_offloading_size: float | None = None,
                 kv_connector_extra_config: dict[str, Any] | None = None) -> None:
        from labkit.hardware import GPU_TYPES, LINKS
        from labkit.models import get_model, normalize_kv_dtype

        self.model = get_model(model) if isinstance(model, str) else model
        self.gpu = GPU_TYPES[gpu] if isinstance(gpu, str) else gpu
        self.tp, self.pp = tp, pp
        self.kv_cache_dtype = normalize_kv_dtype(kv_cache_dtype)
        self.block_size = block_size
        d_tokens, d_seqs = serve_defaults(self.gpu.key, self.gpu.memory_bytes)
        self.max_num_seqs = max_num_seqs or d_seqs
        self.max_model_len = max_model_len or self.model.max_position_embeddings
        self.max_num_batched_tokens = _chunk(max_num_batched_tokens, d_tokens, self.max_model_len,
                                             enable_chunked_prefill)
        self.enable_chunked_prefill = enable_chunked_prefill
        self.cost_params = cost_params or load_cost_params(self.gpu.key)
        self.cost_model = CostModel(self.model, self.gpu, tp, pp, self.kv_cache_dtype,
                                    self.cost_params, tp_link_bw)
        conn_name = connector if isinstance(connector, str) else getattr(connector, "name", None)
        if num_gpu_blocks is None:
            num_gpu_blocks = kv_cache_num_blocks(
                self.model, self.gpu, gpu_memory_utilization=gpu_memory_utilization, tp=tp, pp=pp,
                kv_cache_dtype=self.kv_cache_dtype, block_size=block_size,
                max_num_batched_tokens=self.max_num_batched_tokens, connector=conn_name,
                params=self.cost_params)
        self.num_gpu_blocks = num_gpu_blocks
        self.clock = clock or SimClock()
        self.engine_id = engine_id or f"sim-{random.Random(seed).getrandbits(64):016x}"
        if isinstance(connector, str):
            self.transport = transport or InProcessTransport(LINKS["nvlink"], LINKS["same-gpu"])
            connector = make_connector(
                connector, block_size=block_size,
                kv_bytes_per_token=self.cost_model.kv_bytes_per_token,
                transport=self.transport, engine_id=self.engine_id,
                num_layers=max(self.model.layers_per_stage(pp)),
                **({"tp_size": tp, "side_channel_port": side_channel_port,
                    **nixl_extra_config(kv_connector_extra_config)}
                   if conn_name in ("nixl", "NixlConnector") else {}))
        else:
            self.transport = transport or (connector.transport if connector else None)
        self.offload: OffloadingConnector | None = None
        self.kv_offloading_size = kv_offloading_size
        if kv_offloading_size:
            self.offload = OffloadingConnector(
                self.engine_id, block_size, self.cost_model.kv_bytes_per_token, self.transport,
                cpu_bytes=int(kv_offloading_size * 2**30), world_size=tp * pp,
                link=offload_link(self.gpu))
            connector = self.offload if connector is None else MultiConnector([connector, self.offload])
        self.connector: SimKVConnector | None = connector
        self.kv_cache_manager = KVCacheManager(num_gpu_blocks, block_size, self.max_model_len,
                                               enable_prefix_caching, enable_kv_cache_events)
        self.scheduler = Scheduler(
            self.kv_cache_manager, max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len,
            long_prefill_token_threshold=long_prefill_token_threshold, connector=connector,
            enable_chunked_prefill=enable_chunked_prefill, record_observer_events=record_observer_events,
            async_scheduling=async_scheduling,
            # vLLM's max_concurrent_batches: the batch queue (2) with async scheduling, PP size
            # with PP. The simulator runs one batch at a time per engine otherwise.
            max_concurrent_batches=2 if async_scheduling else 1)
        self._hash_fn = HASH_FUNCTIONS[hash_algo]
        self.eos_token_id = eos_token_id
        rng = random.Random(seed)
        # Pseudo-random "sampled" ids, like dummy weights produce; deterministic per seed.
        self._next_token = itertools.cycle(
            [rng.randrange(self.model.vocab_size) for _ in range(4093)]).__next__
        self.stats = EngineStats()
        self.async_scheduling = async_scheduling
        self._inbox = RequestInbox(async_scheduling)
        # (scheduler output, sampled pairs) of the step in flight: processed after the next
        # step is scheduled (async scheduling's batch queue).
        self._inflight: tuple[SchedulerOutput, list[tuple[Request, int]]] | None = None
        # (step whose schedule sees it, finished_sending, finished_recving) per connector poll
        self._kv_polled: list[tuple[int, set[str], set[str]]] = []
        # None: the GPU is this engine's alone; else a SharedGPU's reserve(engine, start,
        # launch_s, gpu_s) -> when the step's GPU part ends (labkit/engines/sim/shared_gpu.py).
        self.gpu_share: Any = None
        self.step_count = 0
        self.busy_until = self.clock.now()

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> SimEngine:
        """Build from a labkit.plan.EngineConfig (or anything with those attribute names)."""
        kw: dict[str, Any] = {}
        for name in ("model", "tp", "pp", "kv_cache_dtype", "block_size", "max_num_batched_tokens",
                     "max_num_seqs", "max_model_len", "enable_prefix_caching",
                     "enable_chunked_prefill"):
            if getattr(cfg, name, None) is not None:
                kw[name] = getattr(cfg, name)
        if getattr(cfg, "gpu_memory_utilization", None) is not None:
            kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if getattr(cfg, "num_gpu_blocks_override", None) is not None:
            kw["num_gpu_blocks"] = cfg.num_gpu_blocks_override
        if getattr(cfg, "kv_offloading_size_gb", None) is not None:
            kw["kv_offloading_size"] = cfg.kv_offloading_size_gb
        kw.update(overrides)
        return cls(**kw)

    # -- requests -----------------------------------------------------------------------
    def add_request(self, req_id: str, prompt_token_ids: list[int], max_tokens: int, *,
                    ignore_eos: bool = True, kv_transfer_params: dict[str, Any] | None = None,
                    arrival_time: float | None = None, block_hashes: list[int] | None = None,
                    admit_after: float | None = None) -> None:
        """Queue a request (vLLM rejects prompts over max_model_len at the API; so does this).

        `admit_after` (async scheduling): the request reaches the scheduler only for a step
        scheduled after that time (trace replays: it arrived while the current step ran).

        `block_hashes`: the prompt's chained block hashes if already known (same block size
        and hash algorithm, e.g. from another SimEngine of the cluster); computed otherwise.
        """
        if req_id in self.scheduler.requests or self._inbox.get(req_id) is not None:
            raise ValueError(f"duplicate request id {req_id!r}")
        if len(prompt_token_ids) == 0:
            raise ValueError("empty prompt")
        if len(prompt_token_ids) + 1 > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens is longer than the maximum "
                             f"model length of {self.max_model_len}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        request = Request(
            req_id, prompt_token_ids, max_tokens, block_size=self.block_size, hash_fn=self._hash_fn,
            ignore_eos=ignore_eos, eos_token_id=self.eos_token_id,
            arrival_time=self.clock.now() if arrival_time is None else arrival_time,
            kv_transfer_params=kv_transfer_params,
            block_hashes=block_hashes[: len(prompt_token_ids) // self.block_size] if block_hashes else None)
        if self.async_scheduling:
            self._inbox.add(self.clock.now() if admit_after is None else admit_after, request)
        else:
            self.scheduler.add_request(request)

    def abort(self, req_id: str) -> bool:
        """Abort a request (the client went away); True if it was unfinished."""
        if self._inbox.remove(req_id) is not None:
            return True
        # A token of the step in flight is skipped by update_from_output (finished request).
        return bool(self.scheduler.finish_requests([req_id], RequestStatus.FINISHED_ABORTED))

    def admit_pending(self) -> int:
        """Hand every request added so far to the scheduler now (trace replays: the trace
        says before which step each request entered the scheduler)."""
        return self._inbox.admit(float("inf"), False, self.scheduler.add_request)

    def has_unfinished(self) -> bool:
        return (self.scheduler.get_num_unfinished_requests() > 0 or len(self._inbox) > 0
                or (self._inflight is not None and (
                    bool(self.scheduler.deferred_frees)
                    or any(not r.is_finished() for r, _ in self._inflight[1])))
                or (self.offload is not None and self.offload.has_pending_push_work()))

    def get_request(self, req_id: str) -> Request | None:
        return self.scheduler.requests.get(req_id) or self._inbox.get(req_id)

    def next_lease_expiry(self) -> float | None:
        """When the first NIXL lease on held prefill blocks runs out (its connector's lease
        clock), or None."""
        conn = self.connector
        for c in getattr(conn, "connectors", None) or [conn]:
            if isinstance(c, NixlConnector):
                return c.next_lease_expiry()
        return None

    def next_event_time(self) -> float | None:
        """When a pending async KV load lands (an idle engine should step again then)."""
        return self.connector.next_event_time() if self.connector is not None else None

    def _apply_kv_finished(self, start: float, idle: bool) -> None:
        """Hand the connector's finished transfers to the scheduler as vLLM's engine core does.

        The worker polls `get_finished` once per step (kv_connector_model_runner_mixin.py,
        after the forward); the scheduler sees the result in `update_from_output` of that
        step and promotes a WAITING_FOR_REMOTE_KVS request in the NEXT schedule call
        (`_update_waiting_for_remote_kv`). With async scheduling (step_with_batch_queue,
        v1/engine/core.py) step K's output is processed after K+1 was scheduled, so a load
        polled done in step K joins K+2 (sync: K+1). An engine with nothing running loops
        empty steps (kv_connector_no_forward) that poll at once: it sees a load land when
        it lands and schedules it in the next (immediate) step.
        """
        connector, sched = self.connector, self.scheduler
        due = [x for x in self._kv_polled if idle or x[0] <= self.step_count + 1]
        if idle:
            sending, recving = connector.get_finished(start)  # type: ignore[union-attr]
            if sending or recving:
                due.append((0, sending, recving))
        if not due:
            return
        self._kv_polled = [x for x in self._kv_polled if x not in due]
        for _, sending, recving in due:
            sched.update_from_kv_xfer_finished(sending, recving)

    # -- one iteration --------------------------------------------------------------------
    def step(self, now: float | None = None) -> StepResult:
        """Run one engine iteration starting at `now` (default: the clock, which is then
        advanced to the step's end; paced clocks sleep)."""
        standalone = now is None
        start = self.clock.now() if standalone else now
        if start < self.busy_until:
            start = self.busy_until
        sched = self.scheduler
        connector = self.connector
        if len(self._inbox):
            self._inbox.admit(start, bool(sched.running or sched.waiting or sched.skipped_waiting),
                              sched.add_request)
        if connector is not None:
            self._apply_kv_finished(start, idle=not sched.running)
        so = sched.schedule()
        so.num_free_blocks = self.kv_cache_manager.block_pool.free_block_queue.num_free_blocks
        self.step_count += 1
        sync = connector.start_step(so.kv_connector_metadata, start) if connector is not None else 0.0
        total = so.total_num_scheduled_tokens
        # The connector's synchronous loads/saves run on the engine-core thread (ExampleConnector's
        # safetensors I/O after a .cpu() copy): they belong to the launch part.
        launch, gpu = sync, 0.0
        if total:
            launch_s, gpu = self.cost_model.step_parts(total, len(so.scheduled), so.sum_context, so.attn_pairs)
            launch += launch_s
        end = start + launch + gpu
        # Launch- or GPU-bound by the step's own parts: a wait for a shared GPU comes after
        # the launch, so it does not delay the previous step's output.
        bound = launch_bound(launch, gpu)
        if gpu and self.gpu_share is not None:  # another engine's GPU work may come first
            end = self.gpu_share(self, start, launch, gpu)
            gpu = end - start - launch
        if total:
            self.stats.num_steps += 1
            self.stats.busy_time += end - start
            self.stats.samples["iteration_tokens_total"].append(total)
        for new_req in so.scheduled_new_reqs:
            request = sched.requests[new_req.req_id]
            if request.scheduled_time is None:
                request.scheduled_time = start
        emitted: list[tuple[Request, int, float]] = []
        finished: list[tuple[Request, dict[str, Any] | None]] = []
        if self._inflight is not None:
            # update_from_output of the previous step, after this one was scheduled; its
            # tokens leave when this launch ends (launch-bound), or at once.
            prev, prev_sampled = self._inflight
            self._inflight = None
            self._emit(*sched.update_from_output(prev, prev_sampled),
                       start + launch if bound and total else start, emitted, finished)
        sampled = sched.sample_tokens(so, self._next_token)
        if self.async_scheduling and total and (sched.waiting or sched.skipped_waiting
                                                or len(self._inbox) or sched.has_schedulable_running()):
            self._inflight = (so, sampled)  # processed after the next schedule()
        elif sampled or total:
            self._emit(*sched.update_from_output(so, sampled), end, emitted, finished)
        if connector is not None:  # the worker polls once per step, after the forward's launch
            sending, recving = connector.get_finished(start + launch)
            if sending or recving:
                self._kv_polled.append((self.step_count + (2 if self.async_scheduling else 1),
                                        sending, recving))
        self._inbox.step_ran(start, end, total, lookahead=not bound)
        self.busy_until = end
        if standalone:
            self.clock.advance_to(end)
        return StepResult(self.step_count, start, end, so, sampled, finished, sync, emitted, launch, gpu)

    def _emit(self, sampled: list[tuple[Request, int]], stopped: list[Request], t: float,
              emitted: list[tuple[Request, int, float]],
              finished: list[tuple[Request, dict[str, Any] | None]]) -> None:
        """update_from_output's second half at `t`: tokens out, stopped requests freed."""
        done = self.scheduler.emit_outputs(sampled, stopped, t,
                                           self.stats.samples["inter_token_latency_seconds"],
                                           self._on_first_token)
        self.stats.generation_tokens += len(sampled)
        for request, _ in done:
            self._on_finished(request, t)
        emitted.extend([(r, tok, t) for r, tok in sampled])
        finished.extend(done)

    def _on_first_token(self, request: Request, t: float) -> None:
        request.first_token_time = t
        self._take_prefill_stats(request, t)

    def _take_prefill_stats(self, request: Request, t: float) -> None:
        """First output of a request: PrefillStats -> prompt tokens by source, TTFT."""
        if request.prefill_stats_taken:
            return
        request.prefill_stats_taken = True
        by = self.stats.prompt_tokens_by_source
        local, ext = request.num_local_cached_tokens, request.num_external_tokens
        by["local_cache_hit"] += local
        by["external_kv_transfer"] += ext
        by["local_compute"] += request.num_prompt_tokens - local - ext
        self.stats.prompt_tokens += request.num_prompt_tokens
        self.stats.samples["time_to_first_token_seconds"].append(t - request.arrival_time)

    def _on_finished(self, request: Request, t: float) -> None:
        request.finished_time = t
        reason = request.get_finished_reason() or "length"
        s = self.stats
        s.request_success[reason] = s.request_success.get(reason, 0) + 1
        sm = s.samples
        sched_t = request.scheduled_time if request.scheduled_time is not None else request.arrival_time
        first = request.first_token_time if request.first_token_time is not None else t
        sm["e2e_request_latency_seconds"].append(t - request.arrival_time)
        sm["request_queue_time_seconds"].append(sched_t - request.arrival_time)
        sm["request_prefill_time_seconds"].append(first - sched_t)
        sm["request_decode_time_seconds"].append(t - first)
        sm["request_inference_time_seconds"].append(t - sched_t)
        sm["request_prompt_tokens"].append(request.num_prompt_tokens)
        sm["request_generation_tokens"].append(request.num_output_tokens)

    # -- observability ------------------------------------------------------------------
    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache_manager.usage

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.skipped_waiting) + len(self._inbox)

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def prefix_cache_stats(self) -> tuple[int, int]:
        """(queries, hits) in tokens, cumulative (vllm:prefix_cache_queries/hits_total)."""
        s = self.kv_cache_manager.prefix_cache_stats
        return s.queries + s.preempted_queries, s.hits + s.preempted_hits

    @property
    def external_prefix_cache_stats(self) -> tuple[int, int]:
        """(queries, hits) of the connector (vllm:external_prefix_cache_queries/hits_total)."""
        s = self.scheduler.connector_prefix_cache_stats
        return s.queries + s.preempted_queries, s.hits + s.preempted_hits

    def step_cost(self, so: SchedulerOutput) -> StepCost:
        """The roofline breakdown of a scheduled step (for views)."""
        return self.cost_model.step_cost(so.total_num_scheduled_tokens, len(so.scheduled),
                                         so.sum_context, so.attn_pairs)

    def take_kv_events(self) -> list:
        """BlockStored / BlockRemoved / AllBlocksCleared since the last call (needs
        enable_kv_cache_events=True)."""
        return self.kv_cache_manager.take_events()

    def take_transfers(self) -> list[TransferRecord]:
        return self.connector.take_transfers() if self.connector is not None else []

    def take_observer_events(self) -> list[tuple]:
        events, self.scheduler.observer_events = self.scheduler.observer_events, []
        return events

    def block_states(self) -> bytes:
        return self.kv_cache_manager.block_pool.block_states()

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()
