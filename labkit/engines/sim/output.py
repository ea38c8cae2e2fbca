"""What one scheduler step decided: vLLM V1's `SchedulerOutput` (vllm/v1/core/sched/output.py).

The interface between the scheduler and everything that reads a step: the engine's cost
model, the KV connector's `build_connector_meta`, and the observer events the views draw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labkit.engines.sim.kv_cache_manager import KVCacheBlocks
    from labkit.engines.sim.request import Request


@dataclass(slots=True)
class NewRequestData:
    """vllm/v1/core/sched/output.py NewRequestData: first schedule of a request."""

    req_id: str
    prompt_token_ids: list[int]
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int  # prefix hits (local + external) before this step


@dataclass(slots=True)
class CachedRequestData:
    """vllm/v1/core/sched/output.py CachedRequestData: running and resumed requests."""

    req_ids: list[str] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)
    new_block_ids: list[tuple[list[int], ...] | None] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    num_output_tokens: list[int] = field(default_factory=list)


class SchedulerOutput:
    """vllm/v1/core/sched/output.py SchedulerOutput, plus the sums the cost model needs.

    `num_scheduled_tokens` and `scheduled_cached_reqs` are built on first access: the hot
    path only keeps `scheduled`, one (request, num_tokens, num_computed_tokens before,
    num_output_tokens before) entry per scheduled request, running ones first.
    """

    __slots__ = ("scheduled", "num_running_scheduled", "scheduled_new_reqs", "resumed_req_ids",
                 "req_to_new_blocks", "total_num_scheduled_tokens", "preempted_req_ids",
                 "finished_req_ids", "token_budget", "kv_connector_metadata", "sum_context",
                 "attn_pairs", "_num_scheduled_tokens", "_cached")

    def __init__(self, scheduled: list[tuple[Request, int, int, int]], num_running_scheduled: int,
                 scheduled_new_reqs: list[NewRequestData], resumed_req_ids: set[str],
                 req_to_new_blocks: dict[str, KVCacheBlocks], total_num_scheduled_tokens: int,
                 preempted_req_ids: set[str], finished_req_ids: set[str], token_budget: int) -> None:
        self.scheduled = scheduled
        self.num_running_scheduled = num_running_scheduled
        self.scheduled_new_reqs = scheduled_new_reqs
        self.resumed_req_ids = resumed_req_ids
        self.req_to_new_blocks = req_to_new_blocks
        self.total_num_scheduled_tokens = total_num_scheduled_tokens
        self.preempted_req_ids = preempted_req_ids
        self.finished_req_ids = finished_req_ids
        self.token_budget = token_budget
        self.kv_connector_metadata: Any = None
        self.sum_context = 0  # tokens whose KV the step reads or writes
        self.attn_pairs = 0   # causal (query, key) pairs
        self._num_scheduled_tokens: dict[str, int] | None = None
        self._cached: CachedRequestData | None = None

    @property
    def num_reqs(self) -> int:
        return len(self.scheduled)

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        if self._num_scheduled_tokens is None:
            self._num_scheduled_tokens = {e[0].request_id: e[1] for e in self.scheduled}
        return self._num_scheduled_tokens

    @property
    def scheduled_cached_reqs(self) -> CachedRequestData:
        """Running requests (new_block_ids None when no block was added) then resumed ones."""
        if self._cached is None:
            cached = CachedRequestData(resumed_req_ids=set(self.resumed_req_ids))
            blocks = self.req_to_new_blocks
            resumed = self.resumed_req_ids
            for i, (request, _, computed, num_output) in enumerate(self.scheduled):
                rid = request.request_id
                if i >= self.num_running_scheduled and rid not in resumed:
                    continue  # a new request: it is in scheduled_new_reqs
                cached.req_ids.append(rid)
                nb = blocks.get(rid)
                cached.new_block_ids.append(nb.get_block_ids() if nb is not None else None)
                cached.num_computed_tokens.append(computed)
                cached.num_output_tokens.append(num_output)
            self._cached = cached
        return self._cached

    def __repr__(self) -> str:
        return (f"SchedulerOutput(new={[r.req_id for r in self.scheduled_new_reqs]}, "
                f"num_scheduled_tokens={self.num_scheduled_tokens}, "
                f"preempted={self.preempted_req_ids}, finished={self.finished_req_ids})")
