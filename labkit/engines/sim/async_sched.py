"""Async scheduling (vLLM 0.26's default): per step, EITHER a lookahead OR late emission.

vLLM (vllm/config/vllm.py, "Enable async scheduling unless there is an incompatible
option") uses AsyncScheduler (vllm/v1/core/sched/async_scheduler.py) and
EngineCore.step_with_batch_queue (vllm/v1/engine/core.py) with a batch queue of 2. The
engine-core thread loops:

    schedule K+1, execute_model(K+1, non_block=True)    # launches K+1's kernels (CPU time)
    future(K).result()                                  # blocks until K's GPU work is done
    update_from_output(K)                               # K's tokens leave, K's finished freed
    (read new requests from the input queue), schedule K+2, launch K+2, wait on K+1, ...

With UniProcExecutor (vllm/v1/executor/uniproc_executor.py, execute_model(non_block=True))
the launch runs on the engine-core thread itself, so K's output is processed at
max(end of K's GPU work, end of K+1's launch), and K+2 is scheduled right then. The
simulator lays each step's launch and GPU parts end to end (the calibrated sum), so each
step J behaves in one of two ways, decided by its LAUNCH part against its GPU part
(CostModel.step_parts):

- Launch-bound J (launch time > GPU time; the 1B model on an H200: ~5 ms of overhead per
  step): the previous step's tokens leave when J's launch ends (late emission), and a
  request arriving during J is read before J+1 is scheduled (no lookahead).
- GPU-bound J (GPU time >= launch time, e.g. a long prefill): J was queued while the core
  waited on the previous step, whose tokens left at its own end (= J's start), and J+1's
  batch is fixed at J's START (lookahead: a request reaching the busy engine during J
  joins J+2).

A step's tokens wait for the next step only if one runs (requests left running, waiting or
arriving); otherwise (a max_tokens=1 request alone, the last tokens) the next launch is
empty and they leave at the step's end: never late. The measured H200 run backs the rule:
an idle request's TTFT is the max_tokens=1 probe's plus about one launch (22.1 ms vs
13.8 ms for ~2,100 tokens), even after a GPU-bound prefill.

An idle engine schedules a new request at once (the core loop wakes on its input queue).
The synchronous engine (EngineCore.step) has neither: batch fixed at the step's start,
tokens out at its end.

The scheduler's state follows the same order (vllm/v1/core/sched/async_scheduler.py): the
engine keeps step K's scheduler output and sampled tokens in flight and calls
update_from_output(K) after schedule(K+1) (SimEngine.step), so schedule(K+1) sees K's
tokens as placeholders, caches only blocks of tokens it knows, and a request preempted by
schedule(K+1) gets its token of K appended but not cached. When nothing runs after K,
schedule(K+1) is empty and K's output leaves at K's end.

`RequestInbox` holds requests added to a SimEngine until the scheduler would have seen them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from labkit.engines.sim.request import Request


class RequestInbox:
    """Requests handed to an engine but not yet visible to its scheduler.

    Args:
        enabled: async scheduling on (requests wait for the next schedule call) or off
            (every added request is admitted at the next step, as vLLM's sync Scheduler).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._pending: list[tuple[float, Request]] = []  # (time added, request), in order
        # (start, end) of the last GPU-bound step with work: the next step was scheduled at its start
        self._last_busy: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def __iter__(self) -> Iterator[Request]:
        return (r for _, r in self._pending)

    def add(self, t: float, request: Request) -> None:
        self._pending.append((t, request))

    def get(self, req_id: str) -> Request | None:
        return next((r for _, r in self._pending if r.request_id == req_id), None)

    def remove(self, req_id: str) -> Request | None:
        for i, (_, r) in enumerate(self._pending):
            if r.request_id == req_id:
                del self._pending[i]
                return r
        return None

    def schedule_time(self, start: float, scheduler_busy: bool) -> float:
        """When the batch of a step starting at `start` was decided.

        Async: at the start of the previous step if that step was GPU-bound, this one follows
        it back to back and the scheduler had requests then (step_with_batch_queue filled the
        queue); else `start` (launch-bound previous step, idle engine, sync scheduling).
        """
        last = self._last_busy
        if self.enabled and scheduler_busy and last is not None and start <= last[1] + 1e-12:
            return last[0]
        return start

    def admit(self, start: float, scheduler_busy: bool, add: Callable[[Request], None]) -> int:
        """Pass the requests the scheduler of a step starting at `start` sees to `add`."""
        if not self._pending:
            return 0
        cut = self.schedule_time(start, scheduler_busy)
        keep: list[tuple[float, Request]] = []
        n = 0
        for t, r in self._pending:
            if t <= cut:
                add(r)
                n += 1
            else:
                keep.append((t, r))
        self._pending = keep
        return n

    def step_ran(self, start: float, end: float, num_tokens: int, lookahead: bool = True) -> None:
        """Record a step; only GPU-bound steps that ran tokens schedule the next one early
        (after an empty step the next one is scheduled when the step before it is processed)."""
        self._last_busy = (start, end) if num_tokens and lookahead else None


def launch_bound(launch_s: float, gpu_s: float) -> bool:
    """True when launching the step takes longer than the GPU work it launches."""
    return launch_s > gpu_s
