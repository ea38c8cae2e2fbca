"""The scheduler's half after the forward pass: vLLM V1's `Scheduler.update_from_output`.

Split in two, because with async scheduling a step's tokens may leave the engine later than
they were sampled (labkit/engines/sim/async_sched.py): `sample_tokens` appends one token to
every request whose tokens are all computed and takes stopped ones out of `running`;
`emit_outputs` stamps the tokens when they leave and frees the stopped requests
(vllm/v1/core/sched/scheduler.py update_from_output, vllm/v1/core/sched/utils.py check_stop).
`Scheduler` (labkit/engines/sim/scheduler.py) mixes this in.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from labkit.engines.sim.request import Request, RequestStatus

if TYPE_CHECKING:
    from labkit.engines.sim.output import SchedulerOutput

_PREEMPTED = RequestStatus.PREEMPTED


class OutputUpdates:
    """update_from_output for a Scheduler (needs `running`, `max_model_len`, `free_request`)."""

    running: list[Request]
    max_model_len: int

    def free_request(self, request: Request, delay_free_blocks: bool = False) -> dict[str, Any] | None:
        raise NotImplementedError

    def update_from_output(self, out: SchedulerOutput, next_token: Callable[[], int], now: float,
                           itl: list[float], on_first_token: Callable[[Request, float], None]
                           ) -> tuple[list[tuple[Request, int]], list[tuple[Request, dict[str, Any] | None]]]:
        """Sample (`sample_tokens`) and report (`emit_outputs`) one step's tokens at `now`.

        Returns (sampled (request, token) pairs, finished (request, kv_transfer_params) pairs).
        """
        sampled, stopped = self.sample_tokens(out, next_token)
        return sampled, self.emit_outputs(sampled, stopped, now, itl, on_first_token)

    def sample_tokens(self, out: SchedulerOutput, next_token: Callable[[], int]
                      ) -> tuple[list[tuple[Request, int]], list[Request]]:
        """Append one sampled token to every request whose tokens are all computed (a partial
        prefill chunk samples nothing) and take stopped ones out of `running`.

        Stopped requests are not freed here: `emit_outputs` does that, as vLLM's
        update_from_output frees (and calls the connector's request_finished) while it
        builds the outputs. Taking them out of `running` at once is AsyncScheduler's
        "don't schedule an extra step when max_tokens is reached" (vllm/v1/core/sched/
        scheduler.py, num_output_placeholders check). Returns (sampled pairs, stopped).
        """
        sampled: list[tuple[Request, int]] = []
        stopped: list[Request] = []
        max_model_len = self.max_model_len
        for entry in out.scheduled:
            request = entry[0]
            if request.status > _PREEMPTED or request.num_computed_tokens < request.num_tokens:
                continue
            token = next_token()
            # Request.append_output_token_id, inlined (hot path).
            request.all_token_ids.append(token)
            num_tokens = request.num_tokens = request.num_tokens + 1
            num_output = request.num_output_tokens = request.num_output_tokens + 1
            if num_tokens >= request._next_hash_at:
                request.update_block_hashes()
            sampled.append((request, token))
            # vllm/v1/core/sched/utils.py check_stop
            if not request.ignore_eos and token == request.eos_token_id:
                request.status = RequestStatus.FINISHED_STOPPED
            elif num_output >= request.max_tokens or num_tokens >= max_model_len:
                request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            else:
                continue
            stopped.append(request)
        if stopped:
            stopped_set = set(stopped)
            self.running = [r for r in self.running if r not in stopped_set]
        return sampled, stopped

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
