"""Async scheduling (vLLM 0.26's default): the scheduler runs one step ahead of the GPU.

vLLM (vllm/config/vllm.py, "Enable async scheduling unless there is an incompatible
option") uses AsyncScheduler (vllm/v1/core/sched/async_scheduler.py) and
EngineCore.step_with_batch_queue (vllm/v1/engine/core.py) with a batch queue of 2: right
after step K is submitted to the worker, step K+1 is scheduled (decodes use output
placeholders), then the core blocks on step K's output and processes it while K+1 runs.
So the batch of step K+1 is fixed at the START of step K: a request that reaches a busy
engine during step K is not in K+1; it joins step K+2, one step later than a synchronous
engine would take it. Its token still leaves at the end of the step that computed it.
An idle engine schedules a new request at once (the core loop wakes on its input queue).

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
        self._last_busy: tuple[float, float] | None = None  # (start, end) of the last step with work

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

        Async: at the start of the previous step if this one follows it back to back and the
        scheduler had requests then (step_with_batch_queue filled the queue); else `start`.
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

    def step_ran(self, start: float, end: float, num_tokens: int) -> None:
        """Record a step; only steps that ran tokens keep the pipeline full."""
        if num_tokens:
            self._last_busy = (start, end)
