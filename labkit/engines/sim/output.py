"""What one step decided and produced: vLLM V1's `SchedulerOutput` (vllm/v1/core/sched/output.py),
the engine's `StepResult` and its per-request `RequestOutput`s.

SchedulerOutput is the interface between the scheduler and everything that reads a step: the
engine's cost model, the KV connector's `build_connector_meta`, and the observer events the
views draw. StepResult is what `SimEngine.step` returns: what was scheduled, what it sampled,
and what left the engine during the step (with async scheduling a launch-bound step's tokens
leave during the NEXT step: labkit/engines/sim/async_sched.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from labkit.engines.sim.kv_cache_manager import KVCacheBlocks
    from labkit.engines.sim.request import Request


class AllocNote(NamedTuple):
    """`update_state_after_alloc` as labkit's observer connector sees it (RequestAllocated)."""

    kind: Literal["alloc"]
    req_id: str
    block_ids: list[int]
    num_external_tokens: int


class FinishedNote(NamedTuple):
    """`request_finished` as labkit's observer connector sees it (RequestFinished)."""

    kind: Literal["finished"]
    req_id: str
    block_ids: list[int]
    delay_free: bool


ObserverNote = AllocNote | FinishedNote


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
                 "attn_pairs", "sampling_reqs", "num_free_blocks", "_num_scheduled_tokens", "_cached")

    def __init__(self, *, scheduled: list[tuple[Request, int, int, int]], num_running_scheduled: int,
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
        # Requests whose scheduled tokens reach their end: the model samples one token each.
        self.sampling_reqs: list[Request] = []
        self.num_free_blocks: int | None = None  # the pool's free blocks once scheduled
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


@dataclass(slots=True)
class RequestOutput:
    """What one request produced in one step (vLLM's EngineCoreOutput, trimmed)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    first_token_time: float | None = None


@dataclass(slots=True)
class StepResult:
    """One engine step: what was scheduled, what it sampled, what left the engine, and when.

    `sampled`: the (request, token) pairs this step computed (its end). `emitted`: the
    (request, token, time) triples whose output left the engine core during this step: the
    previous step's (when this step's launch ended if it is launch-bound, else at its
    start), and this step's own if no step follows (at `end`). `finished`: requests freed by those emissions, with the connector's
    kv_transfer_params; each one's `finished_time` is its emission time. `outputs` are
    built from `emitted`: what a client receives.
    """

    step: int
    start: float
    end: float
    scheduler_output: SchedulerOutput
    sampled: list[tuple[Request, int]] = field(default_factory=list, repr=False)
    finished: list[tuple[Request, dict[str, Any] | None]] = field(default_factory=list, repr=False)
    kv_connector_time: float = 0.0  # synchronous connector load/save inside the step
    emitted: list[tuple[Request, int, float]] = field(default_factory=list, repr=False)
    launch_s: float = 0.0  # the step's launch part (overhead + synchronous connector I/O)
    gpu_s: float = 0.0  # its GPU part (after any wait for a GPU shared with another engine)
    _outputs: list[RequestOutput] | None = field(default=None, repr=False)

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def num_scheduled_tokens(self) -> int:
        return self.scheduler_output.total_num_scheduled_tokens

    @property
    def outputs(self) -> list[RequestOutput]:
        """One RequestOutput per emitted token (built on first access)."""
        if self._outputs is None:
            params = {r.request_id: p for r, p in self.finished}
            # Two emissions in one step (the previous step's late tokens, then this step's)
            # can carry two tokens of one request: only its last one finishes it.
            last = {r.request_id: i for i, (r, _, _) in enumerate(self.emitted)}
            outs = []
            for i, (r, token, _) in enumerate(self.emitted):
                rid = r.request_id
                done = rid in params and last[rid] == i
                outs.append(RequestOutput(
                    rid, [token], done, r.get_finished_reason() if done else None,
                    params.get(rid), r.num_prompt_tokens,
                    r.num_local_cached_tokens + r.num_external_tokens, r.first_token_time))
            self._outputs = outs
        return self._outputs
