"""The scheduler's half after the forward pass: vLLM V1's `Scheduler.update_from_output`.

Three parts, because with async scheduling a step's output reaches the scheduler after the
next step was scheduled (labkit/engines/sim/async_sched.py):

- `sample_tokens` is the model: at the end of step K it draws one token for every request
  whose scheduled tokens reached its end (`SchedulerOutput.sampling_reqs`); the requests
  do not see them yet.
- `update_from_output` is vllm/v1/core/sched/scheduler.py update_from_output: the deferred
  frees whose fence step is now processed go back to the pool, each token is appended
  (`_update_request_with_output`, AsyncScheduler's override included), stops are checked
  (vllm/v1/core/sched/utils.py check_stop), stopped requests leave `running` (or `waiting`,
  for one preempted meanwhile). Synchronous engines call it right after `sample_tokens`;
  async engines after the NEXT step's schedule().
- `emit_outputs` stamps the tokens when they leave the engine and frees the stopped requests
  (vLLM frees, and calls the connector's request_finished, while it builds the outputs).

`Scheduler` (labkit/engines/sim/scheduler.py) mixes this in.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from labkit.engines.sim.request import Request, RequestStatus

if TYPE_CHECKING:
    from labkit.engines.sim.kv_cache_manager import KVCacheManager
    from labkit.engines.sim.output import SchedulerOutput

_PREEMPTED = RequestStatus.PREEMPTED
_RUNNING = RequestStatus.RUNNING


class OutputUpdates:
    """update_from_output for a Scheduler (needs `running`, `waiting`, `max_model_len`,
    `kv_cache_manager`, `async_scheduling`, the deferred-free state and `free_request`)."""

    running: list[Request]
    waiting: deque[Request]
    max_model_len: int
    kv_cache_manager: KVCacheManager
    async_scheduling: bool
    defer_block_free: bool
    processed_step_seq: int

    def free_request(self, request: Request, delay_free_blocks: bool = False) -> dict[str, Any] | None:
        raise NotImplementedError

    def _drain_deferred_frees(self) -> None:
        raise NotImplementedError

    @staticmethod
    def sample_tokens(out: SchedulerOutput, next_token: Callable[[], int]) -> list[tuple[Request, int]]:
        """The model's sampler for step `out`: one (request, token) per sampling request."""
        return [(request, next_token()) for request in out.sampling_reqs]

    def update_from_output(self, out: SchedulerOutput, sampled: list[tuple[Request, int]]
                           ) -> tuple[list[tuple[Request, int]], list[Request]]:
        """Fold step `out`'s sampled tokens into the requests (scheduler.py update_from_output).

        Stopped requests are not freed here: `emit_outputs` does that. Returns (the pairs of
        requests still unfinished, which leave the engine as outputs; the stopped requests).
        """
        # "Every GPU write enqueued by this and earlier steps has completed, so it is safe to
        # return deferred-free blocks to the pool."
        if self.defer_block_free and out.total_num_scheduled_tokens > 0:
            self.processed_step_seq += 1
            if self.deferred_frees:  # type: ignore[attr-defined]
                self._drain_deferred_frees()
        kept: list[tuple[Request, int]] = []
        stopped_running: list[Request] = []
        stopped_preempted: list[Request] = []
        max_model_len = self.max_model_len
        is_async = self.async_scheduling
        kv = self.kv_cache_manager
        for pair in sampled:
            request, token = pair
            status = request.status
            if status > _PREEMPTED:
                # Already finished: aborted while the step ran (EngineCore processes aborts
                # before update_from_output), or stopped on an earlier step's token.
                continue
            # Request.append_output_token_ids, inlined (hot path).
            request.all_token_ids.append(token)
            num_tokens = request.num_tokens = request.num_tokens + 1
            num_output = request.num_output_tokens = request.num_output_tokens + 1
            if num_tokens >= request._next_hash_at:
                request.update_block_hashes()
            kept.append(pair)
            if is_async:
                # AsyncScheduler._update_request_with_output: one placeholder resolved; cache
                # the new tokens. Preempted requests are skipped (their blocks are gone).
                placeholders = request.num_output_placeholders = request.num_output_placeholders - 1
                if status == _RUNNING:
                    kv.cache_blocks(request, request.num_computed_tokens - placeholders)
            # vllm/v1/core/sched/utils.py check_stop
            if not request.ignore_eos and token == request.eos_token_id:
                request.status = RequestStatus.FINISHED_STOPPED
            elif num_output >= request.max_tokens or num_tokens >= max_model_len:
                request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            else:
                continue
            (stopped_running if status == _RUNNING else stopped_preempted).append(request)
        if stopped_running:
            stopped_set = set(stopped_running)
            self.running = [r for r in self.running if r not in stopped_set]
        if stopped_preempted:  # rare: stopped on the token of a step it was preempted after
            stopped_set = set(stopped_preempted)
            self.waiting = deque(r for r in self.waiting if r not in stopped_set)
            stopped_running.extend(stopped_preempted)
        return kept, stopped_running

    def emit_outputs(self, sampled: list[tuple[Request, int]], stopped: list[Request], now: float,
                     itl: list[float], on_first_token: Callable[[Request, float], None]
                     ) -> list[tuple[Request, dict[str, Any] | None]]:
        """Report sampled tokens at `now` and free the stopped requests.

        Token times are stamped `now` (when the output leaves the engine core): inter-token
        latencies go to `itl`, a request's first token to `on_first_token(request, now)`.
        Returns the finished (request, kv_transfer_params) pairs.
        """
        for request, _ in sampled:
            last = request.last_token_time
            if last is None:
                on_first_token(request, now)
            else:
                itl.append(now - last)
            request.last_token_time = now
        return [(request, self.free_request(request)) for request in stopped]
