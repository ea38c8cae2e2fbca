"""The one time-series store the views read.

Every reader (metrics scraper, KV-event and observer subscribers, NVML sampler, the proxy
timeline) writes here; every view reads from here and never from an engine. Two kinds of data:

- numeric series: `(source, series) -> ring buffer of (ts, value)`, append-only, bounded
  (the oldest points fall off), read as numpy arrays with `window()` / `latest()`;
- event logs ("kv", "obs", "proxy", ...): bounded deques of structured events, each with a
  cursor that increases by one per event, so a view asks "everything since cursor N" and
  learns how many it missed if it fell behind.

A source is one engine (or proxy, or GPU sampler) with its `kind` ("vllm" | "sim" | "replay")
and labels (role, GPU ...): `add_source()`; the views show the kind, never branch on it.
Thread-safe: readers run on background threads, views on the notebook's thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

SOURCE_KINDS = ("vllm", "sim", "replay")


@dataclass(frozen=True)
class SourceInfo:
    """Who produced a series or event: engine name, kind, and free-form labels."""

    name: str
    kind: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One event in a log: its cursor, when it happened, who sent it, and the event itself."""

    cursor: int
    ts: float
    source: str
    event: Any


@dataclass(frozen=True, slots=True)
class EventSlice:
    """Answer to `since(log, cursor)`: the events, the cursor to ask with next time, and how
    many events between the asked cursor and the oldest kept one were already evicted."""

    events: list[LoggedEvent]
    cursor: int
    missed: int


class _Ring:
    """Fixed-capacity (ts, value) ring of float64; `n` counts every append ever made."""

    __slots__ = ("ts", "values", "capacity", "n")

    def __init__(self, capacity: int) -> None:
        self.ts = np.empty(capacity, dtype=np.float64)
        self.values = np.empty(capacity, dtype=np.float64)
        self.capacity = capacity
        self.n = 0

    def append(self, ts: float, value: float) -> None:
        i = self.n % self.capacity
        self.ts[i] = ts
        self.values[i] = value
        self.n += 1

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the kept points, oldest first."""
        if self.n <= self.capacity:
            return self.ts[: self.n].copy(), self.values[: self.n].copy()
        i = self.n % self.capacity
        return np.roll(self.ts, -i), np.roll(self.values, -i)


class _EventLog:
    """A bounded deque of `LoggedEvent`; cursors are 0, 1, 2, ... over the log's lifetime."""

    def __init__(self, capacity: int) -> None:
        self.events: deque[LoggedEvent] = deque(maxlen=capacity)
        self.next_cursor = 0
        self.lock = threading.Lock()


class TelemetryStore:
    """Thread-safe, bounded time-series store plus event logs.

    Args:
        capacity: points kept per series (oldest dropped first).
        log_capacity: events kept per event log.
    """

    def __init__(self, capacity: int = 8192, log_capacity: int = 100_000) -> None:
        if capacity < 1 or log_capacity < 1:
            raise ValueError("capacities must be >= 1")
        self.capacity = capacity
        self.log_capacity = log_capacity
        self._series: dict[tuple[str, str], _Ring] = {}
        self._sources: dict[str, SourceInfo] = {}
        self._logs: dict[str, _EventLog] = {}
        self._lock = threading.Lock()

    # --- sources --------------------------------------------------------------------------
    def add_source(self, name: str, kind: str, **labels: str) -> SourceInfo:
        """Register (or re-label) a source; `kind` is one of "vllm", "sim", "replay"."""
        if kind not in SOURCE_KINDS:
            raise ValueError(f"kind must be one of {SOURCE_KINDS}, got {kind!r}")
        info = SourceInfo(name, kind, {k: str(v) for k, v in labels.items()})
        with self._lock:
            self._sources[name] = info
        return info

    def sources(self) -> dict[str, SourceInfo]:
        with self._lock:
            return dict(self._sources)

    def source(self, name: str) -> SourceInfo | None:
        return self._sources.get(name)

    # --- numeric series -------------------------------------------------------------------
    def append(self, series: str, ts: float, value: float, source: str = "") -> None:
        """Add one point to `(source, series)`; points should come in time order."""
        key = (source, series)
        with self._lock:
            ring = self._series.get(key)
            if ring is None:
                ring = self._series[key] = _Ring(self.capacity)
            ring.append(ts, value)

    def append_many(self, points: list[tuple[str, float, float]], source: str = "") -> None:
        """Add `(series, ts, value)` points under one lock (one scrape, one sample)."""
        with self._lock:
            for series, ts, value in points:
                ring = self._series.get((source, series))
                if ring is None:
                    ring = self._series[(source, series)] = _Ring(self.capacity)
                ring.append(ts, value)

    def latest(self, series: str, source: str = "") -> tuple[float, float] | None:
        """The newest `(ts, value)` of a series, or None if it has no point."""
        with self._lock:
            ring = self._series.get((source, series))
            if ring is None or ring.n == 0:
                return None
            i = (ring.n - 1) % ring.capacity
            return float(ring.ts[i]), float(ring.values[i])

    def window(
        self, series: str, since: float = float("-inf"), source: str = ""
    ) -> tuple[np.ndarray, np.ndarray]:
        """Arrays `(ts, values)` of the kept points with `ts >= since`, oldest first."""
        with self._lock:
            ring = self._series.get((source, series))
            if ring is None:
                return np.empty(0), np.empty(0)
            ts, values = ring.ordered()
        keep = ts >= since
        return ts[keep], values[keep]

    def num_appended(self, series: str, source: str = "") -> int:
        """Points ever appended to a series (kept or not)."""
        with self._lock:
            ring = self._series.get((source, series))
            return 0 if ring is None else ring.n

    def series(self, source: str | None = None) -> list[tuple[str, str]]:
        """`(source, series)` keys, optionally of one source."""
        with self._lock:
            keys = list(self._series)
        return sorted(k for k in keys if source is None or k[0] == source)

    # --- event logs -----------------------------------------------------------------------
    def _log(self, name: str) -> _EventLog:
        log = self._logs.get(name)
        if log is None:
            with self._lock:
                log = self._logs.setdefault(name, _EventLog(self.log_capacity))
        return log

    def log(self, name: str, event: Any, source: str = "", ts: float | None = None) -> int:
        """Append `event` to log `name` ("kv", "obs", "proxy", ...); returns its cursor.
        `ts` defaults to now (time.time())."""
        if ts is None:
            ts = time.time()
        log = self._log(name)
        with log.lock:
            cursor = log.next_cursor
            log.events.append(LoggedEvent(cursor, ts, source, event))
            log.next_cursor = cursor + 1
        return cursor

    def log_many(self, name: str, events: list[tuple[float, Any]], source: str = "") -> int:
        """Append `(ts, event)` pairs under one lock; returns the next cursor."""
        log = self._log(name)
        with log.lock:
            cursor = log.next_cursor
            log.events.extend(
                LoggedEvent(cursor + i, ts, source, ev) for i, (ts, ev) in enumerate(events)
            )
            log.next_cursor = cursor + len(events)
            return log.next_cursor

    def since(self, name: str, cursor: int = 0, limit: int | None = None) -> EventSlice:
        """Events of log `name` with cursor >= `cursor` (at most `limit`, oldest first).

        Pass the returned `.cursor` next time to get only newer events. `.missed` says how
        many wanted events had already fallen off the bounded log.
        """
        log = self._log(name)
        with log.lock:
            first = log.next_cursor - len(log.events)  # cursor of the oldest kept event
            start = min(max(cursor, first), log.next_cursor)
            missed = max(0, first - cursor)
            skip = start - first
            stop = None if limit is None else skip + limit
            # A reader is usually near the end: walk from the right when that is shorter.
            if skip > len(log.events) // 2 and stop is None:
                tail = len(log.events) - skip
                events = list(islice(reversed(log.events), tail))[::-1]
            else:
                events = list(islice(log.events, skip, stop))
            next_cursor = start + len(events)
        return EventSlice(events, next_cursor, missed)

    def cursor(self, name: str) -> int:
        """The cursor the next event of log `name` will get (ask `since` with it to skip
        everything so far)."""
        return self._log(name).next_cursor

    def logs(self) -> list[str]:
        with self._lock:
            return sorted(self._logs)
