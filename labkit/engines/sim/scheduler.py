"""The simulated scheduler: vLLM V1's `Scheduler.schedule()` / `update_from_output()` rules.

Copied from vllm/v1/core/sched/scheduler.py (FCFS policy, no speculative decoding, no
encoder inputs) and vllm/v1/core/sched/async_scheduler.py (AsyncScheduler):

- One token budget per step (max_num_batched_tokens). RUNNING requests go first, in order:
  decodes take 1 token each, unfinished prefills take a chunk (long_prefill_token_threshold,
  then the budget). If allocate_slots fails, the LAST running request is preempted (blocks
  freed, num_computed_tokens = 0, back to the head of WAITING) until it fits.
- Then WAITING requests (only if nobody was preempted this step), while running <
  max_num_seqs: local prefix hits (get_computed_blocks), connector hits
  (get_num_new_matched_tokens), allocate_slots with the whole-prompt admission gate
  (scheduler_reserve_full_isl), update_state_after_alloc. Async KV loads park the request
  in WAITING_FOR_REMOTE_KVS until the connector reports finished_recving. Chunked prefill
  off: a waiting request whose new tokens exceed the budget left is not split, scheduling
  stops there (it waits a step, whole).
- update_from_output (labkit/engines/sim/update_output.py): every request whose tokens are
  all computed samples one token; a stopped request is freed, unless the connector delays
  the free (P/D prefill).
- Async scheduling (AsyncScheduler): step K+1 is scheduled before step K's output is
  processed. A request's in-flight token is a placeholder (`num_output_placeholders`), so
  `allocate_slots` caches only blocks of tokens the scheduler knows, and the output of a
  request preempted meanwhile is appended but not cached (`_update_request_with_output`).
- Deferred block frees (`defer_block_free`: more than one batch in flight and a connector
  that consumes KV, kv_consumer / kv_both): a preempted or aborted request's blocks go back
  to the pool only once the last step that scheduled it has been processed
  (`_free_request_blocks`, `_drain_deferred_frees`). Under pressure a step may preempt
  request after request, get nothing back, and end up scheduling nothing:

      schedule(K+1): R needs a block, 0 free -> preempt the last running request
                     (its blocks are fenced at K: deferred) -> still 0 free -> ... -> R
      update(K):     processed_step_seq = K -> the deferred blocks return to the pool
      schedule(K+2): the preempted requests resume from WAITING
"""
from __future__ import annotations

from collections import deque
from typing import Any

from labkit.engines.sim.block_pool import KVCacheBlock
from labkit.engines.sim.connector import SimKVConnector
from labkit.engines.sim.kv_cache_manager import KVCacheBlocks, KVCacheManager, PrefixCacheStats
from labkit.engines.sim.output import (
    AllocNote,
    FinishedNote,
    NewRequestData,
    ObserverNote,
    SchedulerOutput,
)
from labkit.engines.sim.request import Request, RequestStatus
from labkit.engines.sim.update_output import OutputUpdates

_WAITING = RequestStatus.WAITING
_RUNNING = RequestStatus.RUNNING
_PREEMPTED = RequestStatus.PREEMPTED
_WAITING_FOR_REMOTE_KVS = RequestStatus.WAITING_FOR_REMOTE_KVS


class Scheduler(OutputUpdates):
    """FCFS continuous-batching scheduler over a KVCacheManager.

    Args:
        kv_cache_manager: the block allocator.
        max_num_batched_tokens: token budget per step (vLLM's chunk size).
        max_num_seqs: cap on running requests.
        max_model_len: cap on a request's tokens.
        long_prefill_token_threshold: cap on one prefill chunk (0: none, vLLM's default).
        connector: KV connector (scheduler side) or None.
        scheduler_reserve_full_isl: admit a new request only if its whole prompt fits.
        enable_chunked_prefill: False: never split a waiting request's prompt over steps.
        record_observer_events: keep alloc / finished events for the lab's observer.
        async_scheduling: AsyncScheduler's rules (output placeholders, caching known tokens).
        max_concurrent_batches: batches in flight (2 with async scheduling, PP size with PP);
            with more than one and a KV-consuming connector, block frees are deferred.
        use_v2_model_runner: vLLM 0.26 runs dense decoder models (every model in
            labkit.models) on Model Runner V2 (vllm/config/vllm.py
            `VllmConfig.use_v2_model_runner`, VLLM_USE_V2_MODEL_RUNNER overrides it); the
            scheduler then sends a resumed request as a new one (NewRequestData with its
            num_computed_tokens and its whole block table), not in scheduled_cached_reqs.
    """

    async_scheduling = False

    def __init__(self, kv_cache_manager: KVCacheManager, *, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256, max_model_len: int = 8192, long_prefill_token_threshold: int = 0,
                 connector: SimKVConnector | None = None, scheduler_reserve_full_isl: bool = True,
                 enable_chunked_prefill: bool = True, record_observer_events: bool = False,
                 async_scheduling: bool = False, max_concurrent_batches: int = 1,
                 use_v2_model_runner: bool = True) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.max_num_scheduled_tokens = max_num_batched_tokens
        self.max_num_running_reqs = max_num_seqs
        self.max_model_len = max_model_len
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.connector = connector
        self.scheduler_reserve_full_isl = scheduler_reserve_full_isl
        self.enable_chunked_prefill = enable_chunked_prefill
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.skipped_waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()
        self.reset_preempted_req_ids: set[str] = set()
        self.finished_recving_kv_req_ids: set[str] = set()
        self._inflight_prefills: set[Request] = set()
        self.connector_prefix_cache_stats = PrefixCacheStats()
        self.num_preemptions = 0
        self.record_observer_events = record_observer_events
        self.observer_events: list[ObserverNote] = []
        self.async_scheduling = async_scheduling
        self.use_v2_model_runner = use_v2_model_runner
        # vllm/v1/core/sched/scheduler.py __init__: "With overlapping batches (async
        # scheduling or PP), a step may still be writing a freed request's KV blocks. A
        # consumer KV Connector can reallocate and fill those blocks via a load that isn't
        # ordered against that write, so defer freeing them."
        self.defer_block_free = (connector is not None and max_concurrent_batches > 1
                                 and getattr(connector, "is_kv_consumer", True))
        # Counts of non-empty steps scheduled / processed; update_from_output is called once
        # per scheduled step in FIFO order, so these stay in sync.
        self.sched_step_seq = 0
        self.processed_step_seq = 0
        # FIFO of (fence_seq, blocks): blocks become safe to free once
        # processed_step_seq >= fence_seq.
        self.deferred_frees: deque[tuple[int, list[KVCacheBlock]]] = deque()

    # -- queue management ---------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if self.connector is not None:
            self.connector.on_new_request(request)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.skipped_waiting) + len(self.running)

    def has_requests(self) -> bool:
        """Unfinished requests, or finished ones still holding blocks for a transfer."""
        return bool(self.requests) or bool(self.finished_req_ids)

    def has_schedulable_running(self) -> bool:
        """A running request the next schedule() would give tokens. When there is none (and
        nothing waits), vLLM's next schedule() is empty and the step in flight is processed
        right after it: the simulator then processes the step at once, to the same effect."""
        for r in self.running:
            p = r.num_output_placeholders
            if not (p > 0 and r.num_computed_tokens + 2 - p >= r.num_prompt_tokens + r.max_tokens):
                return True
        return False

    @property
    def num_deferred_free_blocks(self) -> int:
        """Blocks freed by the scheduler but not yet back in the pool (defer_block_free)."""
        return sum(len(blocks) for _, blocks in self.deferred_frees)

    # -- schedule -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        kv = self.kv_cache_manager
        empty = kv.empty_kv_cache_blocks
        threshold = self.long_prefill_token_threshold
        max_model_len = self.max_model_len
        scheduled_new_reqs: list[Request] = []
        scheduled_resumed_reqs: list[Request] = []
        preempted_reqs: list[Request] = []
        req_to_new_blocks: dict[str, KVCacheBlocks] = {}
        # (request, tokens, computed before, outputs before) in schedule order.
        scheduled: list[tuple[Request, int, int, int]] = []
        token_budget = self.max_num_scheduled_tokens
        running = self.running
        allocate_slots = kv.allocate_slots
        req_to_blocks = kv.req_to_blocks
        bs, caching = kv.block_size, kv.enable_caching
        inflight = self._inflight_prefills
        sum_ctx = pairs = 0
        # Requests whose scheduled tokens reach their end: they sample a token this step.
        sampling: list[Request] = []
        is_async = self.async_scheduling
        # The seq this step gets if it schedules anything (sched_step_seq advances after
        # build_connector_meta, only for non-empty steps); _update_after_schedule stamps it.
        step_seq = self.sched_step_seq + 1
        num_cached_block = kv.num_cached_block

        # First, the RUNNING requests.
        req_index = 0
        while req_index < len(running) and token_budget > 0:
            request = running[req_index]
            computed = request.num_computed_tokens
            placeholders = request.num_output_placeholders
            if placeholders > 0 and (computed + 2 - placeholders
                                     >= request.num_prompt_tokens + request.max_tokens):
                # Async scheduling: avoid scheduling an extra step when the previous step
                # has reached max_tokens (scheduler.py schedule()).
                req_index += 1
                continue
            num_new_tokens = request.num_tokens + placeholders - computed
            if 0 < threshold < num_new_tokens:
                num_new_tokens = threshold
            if num_new_tokens > token_budget:
                num_new_tokens = token_budget
            if num_new_tokens > max_model_len - computed - 1:
                num_new_tokens = max_model_len - computed - 1
            if num_new_tokens <= 0:
                req_index += 1
                continue
            rid = request.request_id
            total = computed + num_new_tokens
            blocks = req_to_blocks.get(rid)
            if blocks is not None and total <= len(blocks) * bs:
                # allocate_slots' result when no new block is needed (most decode steps):
                # cache full blocks up to min(total, request.num_tokens), the tokens the
                # scheduler knows (an in-flight sampled token is not one of them).
                new_blocks = empty
                if caching:
                    num_tokens_to_cache = total if total < request.num_tokens else request.num_tokens
                    if num_tokens_to_cache // bs > num_cached_block.get(rid, 0):
                        kv.cache_blocks(request, num_tokens_to_cache)
            else:
                while True:
                    new_blocks = allocate_slots(request, num_new_tokens)
                    if new_blocks is not None:
                        break
                    # FCFS: preempt the lowest-priority (last) running request. It is never
                    # one already scheduled this step (those sit before req_index).
                    preempted_req = running.pop()
                    self._preempt_request(preempted_req)
                    preempted_reqs.append(preempted_req)
                    if preempted_req is request:
                        break
                if new_blocks is None:
                    break
            scheduled.append((request, num_new_tokens, computed, request.num_output_tokens))
            if new_blocks.blocks:
                req_to_new_blocks[rid] = new_blocks
            token_budget -= num_new_tokens
            req_index += 1
            # _update_after_schedule for running requests, done here to save a pass (the
            # simulated connectors' build_connector_meta does not read num_computed_tokens).
            sum_ctx += total
            pairs += num_new_tokens * computed + (num_new_tokens * (num_new_tokens + 1) >> 1)
            request.num_computed_tokens = total
            request.last_sched_seq = step_seq
            if total >= request.num_tokens + placeholders:
                if request.is_prefill_chunk:
                    request.is_prefill_chunk = False
                    inflight.discard(request)
                sampling.append(request)
                if is_async:  # AsyncScheduler._update_after_schedule
                    request.num_output_placeholders = placeholders + 1
            else:
                request.is_prefill_chunk = True

        # Next, the WAITING requests.
        num_running_scheduled = len(scheduled)
        if not preempted_reqs and (self.waiting or self.skipped_waiting):
            token_budget = self._schedule_waiting(token_budget, scheduled, req_to_new_blocks,
                                                  scheduled_new_reqs, scheduled_resumed_reqs)

        # vllm/v1/core/sched/scheduler.py Scheduler.schedule, "Construct the scheduler output":
        # Model Runner V2 takes resumed requests as new ones.
        if self.use_v2_model_runner and scheduled_resumed_reqs:
            scheduled_new_reqs.extend(scheduled_resumed_reqs)
            scheduled_resumed_reqs.clear()
        new_reqs_data = [
            NewRequestData(r.request_id, r.prompt_token_ids,
                           req_to_new_blocks[r.request_id].get_block_ids(), r.num_computed_tokens)
            for r in scheduled_new_reqs
        ] if scheduled_new_reqs else []
        out = SchedulerOutput(
            scheduled=scheduled, num_running_scheduled=num_running_scheduled,
            scheduled_new_reqs=new_reqs_data,
            resumed_req_ids=({r.request_id for r in scheduled_resumed_reqs}
                             if scheduled_resumed_reqs else set()),
            req_to_new_blocks=req_to_new_blocks,
            total_num_scheduled_tokens=self.max_num_scheduled_tokens - token_budget,
            preempted_req_ids=self.reset_preempted_req_ids,
            finished_req_ids=self.finished_req_ids, token_budget=self.max_num_scheduled_tokens)
        out.sum_context, out.attn_pairs = sum_ctx, pairs
        out.sampling_reqs = sampling
        if self.connector is not None:
            out.kv_connector_metadata = self.connector.build_connector_meta(out)
        # Advance the fence only for non-empty steps (those that write KV and have their
        # output processed later in update_from_output).
        if self.defer_block_free and out.total_num_scheduled_tokens > 0:
            self.sched_step_seq += 1
        self._update_after_schedule(out)
        return out

    def _schedule_waiting(self, token_budget: int, scheduled: list[tuple[Request, int, int, int]],
                          req_to_new_blocks: dict[str, KVCacheBlocks],
                          scheduled_new_reqs: list[Request], scheduled_resumed_reqs: list[Request]) -> int:
        """The WAITING half of schedule(); returns the token budget left."""
        kv = self.kv_cache_manager
        empty = kv.empty_kv_cache_blocks
        threshold = self.long_prefill_token_threshold
        running = self.running
        step_skipped: deque[Request] = deque()
        connector = self.connector
        while (self.waiting or self.skipped_waiting) and token_budget > 0:
            if len(running) >= self.max_num_running_reqs:
                break
            queue = self.skipped_waiting or self.waiting
            request = queue[0]
            if request.status == _WAITING_FOR_REMOTE_KVS and not self._try_promote_blocked_waiting_request(request):
                queue.popleft()
                step_skipped.appendleft(request)
                continue

            num_external_computed_tokens = 0
            load_kv_async = False
            conn_queries = conn_hits = 0
            if request.num_computed_tokens == 0:
                new_computed_blocks, num_new_local_computed_tokens = kv.get_computed_blocks(request)
                if connector is not None:
                    ext_tokens, load_kv_async = connector.get_num_new_matched_tokens(
                        request, num_new_local_computed_tokens)
                    if ext_tokens is None:
                        queue.popleft()
                        step_skipped.appendleft(request)
                        continue
                    num_external_computed_tokens = ext_tokens
                    conn_queries = request.num_tokens - num_new_local_computed_tokens
                    conn_hits = num_external_computed_tokens
                num_computed_tokens = num_new_local_computed_tokens + num_external_computed_tokens
                if request.num_preemptions <= 0:
                    # PrefillStats.set: overwritten at each attempt, taken at first output.
                    request.num_local_cached_tokens = num_new_local_computed_tokens
                    request.num_external_tokens = num_external_computed_tokens
            else:
                # KV transfer: a WAITING request with num_computed_tokens > 0 finished its load.
                new_computed_blocks = empty
                num_new_local_computed_tokens = 0
                num_computed_tokens = request.num_computed_tokens

            if load_kv_async:
                num_new_tokens = 0
            else:
                num_new_tokens = request.num_tokens - num_computed_tokens
                if 0 < threshold < num_new_tokens:
                    num_new_tokens = threshold
                if num_new_tokens > token_budget and not self.enable_chunked_prefill:
                    break  # not split: scheduling stops here (v1/core/sched/scheduler.py)
                num_new_tokens = min(num_new_tokens, token_budget)

            reserved_blocks = self._inflight_prefill_reserved_blocks() if load_kv_async else 0
            new_blocks = kv.allocate_slots(
                request, num_new_tokens,
                num_new_computed_tokens=num_new_local_computed_tokens,
                new_computed_blocks=new_computed_blocks,
                num_external_computed_tokens=num_external_computed_tokens,
                delay_cache_blocks=load_kv_async,
                full_sequence_must_fit=self.scheduler_reserve_full_isl,
                reserved_blocks=reserved_blocks,
            )
            if new_blocks is None:
                break

            rid = request.request_id
            if connector is not None:
                connector.update_state_after_alloc(request, kv.get_blocks(rid), num_external_computed_tokens)
                if conn_queries:
                    self.connector_prefix_cache_stats.record(conn_queries, conn_hits,
                                                             request.num_preemptions > 0)
            if self.record_observer_events:
                self.observer_events.append(
                    AllocNote("alloc", rid, kv.get_block_ids(rid)[0], num_external_computed_tokens))

            queue.popleft()
            if load_kv_async:
                request.status = _WAITING_FOR_REMOTE_KVS
                step_skipped.appendleft(request)
                request.num_computed_tokens = num_computed_tokens
                self._inflight_prefills.add(request)
                continue

            running.append(request)
            if request.status == _WAITING:
                scheduled_new_reqs.append(request)
            else:
                scheduled_resumed_reqs.append(request)
            req_to_new_blocks[rid] = kv.get_blocks(rid)
            scheduled.append((request, num_new_tokens, num_computed_tokens, request.num_output_tokens))
            token_budget -= num_new_tokens
            request.status = _RUNNING
            request.num_computed_tokens = num_computed_tokens
            if num_computed_tokens + num_new_tokens < request.num_tokens:
                self._inflight_prefills.add(request)
        # Re-queue the requests skipped in this pass ahead of older skipped ones, in order.
        if step_skipped:
            self.skipped_waiting.extendleft(step_skipped)
        return token_budget

    def _update_after_schedule(self, out: SchedulerOutput) -> None:
        """Advance num_computed_tokens now, so a prefill can get its next chunk next step
        (the running requests were advanced in schedule())."""
        self.finished_req_ids = set()
        self.reset_preempted_req_ids = set()
        if out.num_running_scheduled == len(out.scheduled):
            return
        sum_ctx, pairs = out.sum_context, out.attn_pairs
        inflight = self._inflight_prefills
        sampling = out.sampling_reqs
        is_async = self.async_scheduling
        seq = self.sched_step_seq
        for request, n, c, _ in out.scheduled[out.num_running_scheduled:]:
            sum_ctx += c + n
            pairs += n * c + (n * (n + 1) >> 1)
            c += n
            request.num_computed_tokens = c
            request.last_sched_seq = seq  # the in-flight step, to fence deferred block freeing
            if c >= request.num_tokens + request.num_output_placeholders:
                request.is_prefill_chunk = False
                if inflight:
                    inflight.discard(request)
                sampling.append(request)
                if is_async:  # AsyncScheduler._update_after_schedule
                    request.num_output_placeholders += 1
            else:
                request.is_prefill_chunk = True
        out.sum_context, out.attn_pairs = sum_ctx, pairs

    def _preempt_request(self, request: Request) -> None:
        """Free its blocks (maybe deferred) and send it back to the head of WAITING
        (scheduler.py _preempt_request)."""
        self._free_request_blocks(request)
        self._inflight_prefills.discard(request)
        request.status = _PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self.reset_preempted_req_ids.add(request.request_id)

    def _inflight_prefill_reserved_blocks(self) -> int:
        remaining = self.kv_cache_manager.remaining_blocks
        return sum(remaining(r) for r in self._inflight_prefills)

    def _try_promote_blocked_waiting_request(self, request: Request) -> bool:
        """WAITING_FOR_REMOTE_KVS -> WAITING once the load finished (_update_waiting_for_remote_kv)."""
        rid = request.request_id
        if rid not in self.finished_recving_kv_req_ids:
            return False
        self.kv_cache_manager.cache_blocks(request, request.num_computed_tokens)
        # On a full prompt hit the last token is recomputed to sample the next one.
        if request.num_computed_tokens == request.num_tokens:
            request.num_computed_tokens = request.num_tokens - 1
        self.finished_recving_kv_req_ids.discard(rid)
        request.status = _PREEMPTED if request.num_preemptions else _WAITING
        return True

    def free_request(self, request: Request, delay_free_blocks: bool = False) -> dict[str, Any] | None:
        """_free_request: connector.request_finished decides whether blocks outlive the request."""
        self._inflight_prefills.discard(request)
        connector_delay, params = False, None
        block_ids: list[int] = []
        if self.connector is not None or self.record_observer_events:
            block_ids = self.kv_cache_manager.get_block_ids_for_computed_tokens(
                request.request_id, request.num_computed_tokens)[0]
        if self.connector is not None:
            connector_delay, params = self.connector.request_finished(request, block_ids)
        rid = request.request_id
        self.finished_req_ids.add(rid)
        delay = delay_free_blocks or connector_delay
        if self.record_observer_events:
            self.observer_events.append(FinishedNote("finished", rid, block_ids, bool(delay)))
        if not delay:
            self._free_blocks(request)
        return params

    def _free_blocks(self, request: Request) -> None:
        self._free_request_blocks(request)
        self.requests.pop(request.request_id, None)

    def _free_request_blocks(self, request: Request) -> None:
        """Free the request's KV blocks, deferring the return to the pool when an in-flight
        step may still write them (scheduler.py _free_request_blocks)."""
        if not self.defer_block_free or request.last_sched_seq <= self.processed_step_seq:
            # Last scheduled step already processed: no in-flight write remains (always the
            # case for a normal finish), so free now.
            self.kv_cache_manager.free(request)
            return
        blocks = self.kv_cache_manager.pop_blocks_for_free(request)
        if blocks:
            self.deferred_frees.append((self.sched_step_seq, blocks))

    def _drain_deferred_frees(self) -> None:
        """Return deferred blocks whose fence step has completed (scheduler.py
        _drain_deferred_frees): stop at the first pending fence."""
        deferred = self.deferred_frees
        while deferred:
            fence, _ = deferred[0]
            if fence > self.processed_step_seq:
                break
            _, blocks = deferred.popleft()
            # Free in reverse order so that the tail blocks are evicted first.
            self.kv_cache_manager.block_pool.free_blocks(reversed(blocks))

    def finish_requests(self, request_ids: list[str], finished_status: RequestStatus) -> list[Request]:
        """Abort from outside (client went away): out of the queues, then freed."""
        valid = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None or request.is_finished():
                continue
            valid.append(request)
        running_set = {r for r in valid if r.status == _RUNNING}
        if running_set:
            self.running = [r for r in self.running if r not in running_set]
        waiting_set = {r for r in valid if r.status != _RUNNING}
        if waiting_set:
            self.waiting = deque(r for r in self.waiting if r not in waiting_set)
            self.skipped_waiting = deque(r for r in self.skipped_waiting if r not in waiting_set)
        for request in valid:
            delay = False
            if request.status == _WAITING_FOR_REMOTE_KVS:
                # Blocks are being written by an async load: free them when it lands.
                delay = request.request_id not in self.finished_recving_kv_req_ids
                self.finished_recving_kv_req_ids.discard(request.request_id)
            request.status = finished_status
            self.free_request(request, delay_free_blocks=delay)
        return valid

    def update_from_kv_xfer_finished(self, finished_sending: set[str], finished_recving: set[str]) -> None:
        """_update_from_kv_xfer_finished: loads landed (promote next step), sends done (free)."""
        for rid in finished_recving:
            request = self.requests.get(rid)
            if request is None:
                continue
            if request.status == _WAITING_FOR_REMOTE_KVS:
                self.finished_recving_kv_req_ids.add(rid)
            else:
                self._free_blocks(request)
        for rid in finished_sending:
            request = self.requests.get(rid)
            if request is not None:
                self._free_blocks(request)
