"""The proxy's per-request timeline: what happened to each request, when, as seen from the proxy.

A bounded, append-only, in-memory log of events. Every event gets a sequence number (`seq`),
so readers keep a cursor: `since(N)` returns the events from `seq >= N` and the next cursor;
`follow()` yields them as they happen (the SSE stream the views follow).

Event shape (architecture.md, contract 4)::

    {"seq": 12, "req_id": "pd-3f2a...", "ts": 1795250276.123, "event": "first_token", ...fields}

One request's events, in order::

    arrival -> prefill_start -> prefill_end -> kv_transfer_start -> kv_transfer_end
            -> first_token -> token ... token -> finish        (or `error` then `finish`)

`ts` is wall-clock seconds anchored once and advanced with `time.perf_counter()`, so the
timestamps of one Timeline never go backwards and stay comparable with engines' `time.time()`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import APIRouter

EVENTS: tuple[str, ...] = (
    "arrival",
    "prefill_start",
    "prefill_end",
    "kv_transfer_start",
    "kv_transfer_end",
    "first_token",
    "token",
    "finish",
    "error",
)


class Timeline:
    """Bounded event log with cursors, plus a bounded summary per request.

    Args:
        max_events: events kept; older ones are dropped (a reader behind them is told how many).
        max_requests: request summaries kept (oldest dropped first).
    """

    def __init__(self, max_events: int = 100_000, max_requests: int = 10_000) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self._summaries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._max_requests = max_requests
        self._next_seq = 0
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._wall0 = time.time()
        self._perf0 = time.perf_counter()

    def now(self) -> float:
        """Wall-clock seconds that never go backwards within this Timeline."""
        return self._wall0 + (time.perf_counter() - self._perf0)

    @property
    def next_seq(self) -> int:
        """The seq the next recorded event will get (a cursor for 'from now on')."""
        return self._next_seq

    def record(self, req_id: str, event: str, ts: float | None = None, **fields: Any) -> dict:
        """Append one event and wake the readers; returns the stored event."""
        if event not in EVENTS:
            raise ValueError(f"unknown timeline event {event!r}; one of {EVENTS}")
        with self._lock:
            item = {
                "seq": self._next_seq,
                "req_id": req_id,
                "ts": self.now() if ts is None else ts,
                "event": event,
            }
            item.update(fields)
            self._events.append(item)
            self._next_seq += 1
            self._summarize(item)
            waiters = list(self._waiters)
        for loop, ready in waiters:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # that reader's loop is closed
                pass
        return item

    def _summarize(self, item: dict[str, Any]) -> None:
        """Fold an event into its request's summary (engines, ids, token counts, times)."""
        summary = self._summaries.get(item["req_id"])
        if summary is None:
            summary = self._summaries[item["req_id"]] = {"req_id": item["req_id"], "num_tokens": 0}
            while len(self._summaries) > self._max_requests:
                self._summaries.popitem(last=False)
        event = item["event"]
        if event == "token":
            summary["num_tokens"] += 1
            return
        summary[f"{event}_ts"] = item["ts"]
        summary.update({k: v for k, v in item.items() if k not in ("seq", "req_id", "ts", "event")})

    def since(self, seq: int = 0, limit: int | None = None) -> dict[str, Any]:
        """Events with `seq >= seq` (at most `limit`).

        Returns:
            `{"events": [...], "next": cursor, "dropped": n}`; `dropped` counts the events the
            reader missed because the log is bounded. A cursor from the future (a restarted
            proxy) is reset to now.
        """
        with self._lock:
            first = self._events[0]["seq"] if self._events else self._next_seq
            seq = min(max(seq, 0), self._next_seq)
            dropped = max(0, first - seq)
            start = max(seq, first) - first
            stop = None if limit is None else start + max(limit, 0)
            events = list(itertools.islice(self._events, start, stop))
        nxt = events[-1]["seq"] + 1 if events else max(seq, first)
        return {"events": events, "next": nxt, "dropped": dropped}

    def request(self, req_id: str) -> dict[str, Any] | None:
        """The summary of one request (None when unknown or already dropped)."""
        with self._lock:
            summary = self._summaries.get(req_id)
            return dict(summary) if summary is not None else None

    def requests(self, limit: int = 100) -> list[dict[str, Any]]:
        """The summaries of the last `limit` requests, oldest first."""
        with self._lock:
            items = list(self._summaries.values())[-limit:] if limit > 0 else []
            return [dict(s) for s in items]

    async def wait(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until an event with `seq` or later exists; False when `timeout` ran out."""
        if self._next_seq > seq:
            return True
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.add(waiter)
        try:
            if self._next_seq > seq:  # recorded between the check and the registration
                return True
            await asyncio.wait_for(waiter[1].wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return self._next_seq > seq
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    async def follow(
        self, since: int | None = None, heartbeat: float | None = None
    ) -> AsyncIterator[dict[str, Any] | None]:
        """Yield events from `since` (default: from now on) as they are recorded, forever.

        With `heartbeat`, yields None after that many idle seconds (an SSE writer turns it
        into a keep-alive comment, which also notices a reader that went away).
        """
        cursor = self._next_seq if since is None else since
        while True:
            batch = self.since(cursor)
            cursor = batch["next"]
            for event in batch["events"]:
                yield event
            if not batch["events"] and not await self.wait(cursor, heartbeat):
                yield None


def timeline_router(timeline: Timeline) -> APIRouter:
    """The timeline's HTTP face, mounted by the proxy.

    GET /timeline?since=N&limit=M   -> `Timeline.since()` as JSON: {events, next, dropped}
    GET /timeline/requests?limit=M  -> {"requests": [summary, ...]}
    GET /timeline/stream?since=N    -> SSE, `id: seq` + `data: event`, from `since` (default:
                                       from now on), a keep-alive comment every 10 s idle
    """
    from fastapi import APIRouter
    from fastapi.responses import StreamingResponse

    router = APIRouter()

    @router.get("/timeline")
    async def events(since: int = 0, limit: int | None = None) -> dict:
        return timeline.since(since, limit)

    @router.get("/timeline/requests")
    async def requests(limit: int = 100) -> dict:
        return {"requests": timeline.requests(limit)}

    @router.get("/timeline/stream")
    async def stream(since: int | None = None) -> StreamingResponse:
        async def sse() -> AsyncIterator[bytes]:
            async for ev in timeline.follow(since, heartbeat=10.0):
                if ev is None:
                    yield b": keep-alive\n\n"
                else:
                    yield f"id: {ev['seq']}\ndata: {json.dumps(ev)}\n\n".encode()

        headers = {"Cache-Control": "no-cache"}
        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    return router
