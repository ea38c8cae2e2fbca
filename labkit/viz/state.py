"""Reducers that fold telemetry into view state. Each is cheap per event and bounded in memory
(ring buffers), so a dashboard can run for hours; the figures are pure functions of these.

    BlockMapState   physical KV blocks per engine (labkit/viz/blockstate.py)
    TransferState   per request: queue / prefill / KV transfer / decode intervals, per-layer bars
    MemoryState     per GPU: weights / KV / other per engine, other processes, free; over time
    ScheduleState   per step: tokens per request, prefill chunk vs decode, against the budget
    LatencyState    TTFT / ITL samples from the proxy timeline, and engines' histograms
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from labkit.telemetry.metrics import MetricsSnapshot
from labkit.telemetry.observer_schema import KVTransfer, LayerTiming, StepScheduled
from labkit.telemetry.source import EngineMemory, GpuSample, MetricsSample
from labkit.viz.blockstate import BlockMapState, EngineBlocks

__all__ = [
    "BlockMapState", "EngineBlocks", "TransferState", "RequestTimes", "MemoryState",
    "ScheduleState", "StepRecord", "LatencyState", "TTFT_METRIC", "ITL_METRIC",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
@dataclass
class RequestTimes:
    """One request's life through the PD pair (wall-clock seconds; None: not seen yet)."""

    req_id: str
    arrival: float | None = None
    prefill_start: float | None = None
    prefill_end: float | None = None
    transfer_start: float | None = None
    transfer_end: float | None = None
    first_token: float | None = None
    finish: float | None = None
    error: bool = False
    num_tokens: int = 0  # KV tokens moved
    num_bytes: int = 0  # KV bytes moved
    transfer_seconds: float = 0.0  # the connector's own start..end of the move
    connector: str = ""

    @property
    def gbps(self) -> float | None:
        """Achieved KV transfer rate in GB/s (1e9 bytes/s), from the connector's figures."""
        if self.num_bytes and self.transfer_seconds > 0:
            return self.num_bytes / self.transfer_seconds / 1e9
        return None


_TIMELINE_FIELDS = {
    "arrival": "arrival", "prefill_start": "prefill_start", "prefill_end": "prefill_end",
    "kv_transfer_start": "transfer_start", "kv_transfer_end": "transfer_end",
    "first_token": "first_token", "finish": "finish",
}  # fmt: skip


class TransferState:
    """Proxy timeline + KVTransfer + LayerTiming -> the streaming picture of the last requests."""

    def __init__(self, max_requests: int = 40) -> None:
        self.requests: OrderedDict[str, RequestTimes] = OrderedDict()
        self.max_requests = max_requests
        self.t0: float | None = None
        # (op, layer) -> (duration s, bytes) of the most recent pass; layer order as first seen.
        self.layers: dict[tuple[str, str], tuple[float, int]] = {}
        self.layer_order: list[str] = []
        self.layer_engine: dict[str, str] = {}  # op -> engine that reported it
        self.version = 0

    def _req(self, req_id: str) -> RequestTimes:
        r = self.requests.get(req_id)
        if r is None:
            r = self.requests[req_id] = RequestTimes(req_id)
            while len(self.requests) > self.max_requests:
                self.requests.popitem(last=False)
        return r

    def _seen(self, ts: float) -> None:
        if self.t0 is None or ts < self.t0:
            self.t0 = ts

    def apply_timeline(self, ev: dict[str, Any]) -> None:
        kind, ts = ev.get("event"), float(ev.get("ts", 0.0))
        if kind == "token":
            return  # latency's business; the Gantt only needs the first and the last
        r = self._req(str(ev["req_id"]))
        self._seen(ts)
        if kind == "error":
            r.error, r.finish = True, ts
        elif kind in _TIMELINE_FIELDS:
            setattr(r, _TIMELINE_FIELDS[kind], ts)
        self.version += 1

    def apply(self, batch) -> None:
        """Fold the KVTransfer / LayerTiming events of one ObserverBatch."""
        for ev in batch.events:
            if isinstance(ev, KVTransfer):
                r = self._req(ev.req_id)
                self._seen(ev.start)
                r.num_bytes = max(r.num_bytes, ev.num_bytes)
                r.num_tokens = max(r.num_tokens, ev.num_tokens)
                r.transfer_seconds = max(r.transfer_seconds, ev.end - ev.start)
                r.connector = ev.connector
                # The timeline's kv_transfer_* (proxy's view) wins; else the connector's times.
                r.transfer_start = r.transfer_start if r.transfer_start is not None else ev.start
                r.transfer_end = max(r.transfer_end or ev.end, ev.end)
                self.version += 1
            elif isinstance(ev, LayerTiming):
                if ev.layer not in self.layer_order:
                    self.layer_order.append(ev.layer)
                self.layers[(ev.op, ev.layer)] = (max(ev.end - ev.start, 0.0), ev.num_bytes)
                self.layer_engine[ev.op] = batch.engine_id
                self.version += 1

    def recent_gbps(self) -> list[tuple[str, float]]:
        return [(r.req_id, g) for r in self.requests.values() if (g := r.gbps) is not None]


# ---------------------------------------------------------------------------------------------
class MemoryState:
    """NVML samples + engines' own weights/KV figures -> per-GPU breakdown, now and over time."""

    CATEGORIES = ("weights", "KV cache", "engine other", "other processes", "free")

    def __init__(self, history: int = 600) -> None:
        self.latest: dict[int, GpuSample] = {}
        self.engine_mem: dict[tuple[str, int], EngineMemory] = {}
        self.history: dict[int, deque[tuple[float, tuple[int, ...]]]] = {}
        self.maxlen = history
        self.version = 0

    def apply_engine_memory(self, m: EngineMemory) -> None:
        self.engine_mem[(m.engine, m.gpu)] = m
        self.version += 1

    def apply_sample(self, s: GpuSample) -> None:
        self.latest[s.gpu] = s
        totals = self.totals(s.gpu)
        self.history.setdefault(s.gpu, deque(maxlen=self.maxlen)).append((s.ts, totals))
        self.version += 1

    def breakdown(self, gpu: int) -> list[tuple[str, str, int]]:
        """[(engine or '', category, bytes)] stacking to the GPU's total."""
        s = self.latest.get(gpu)
        if s is None:
            return []
        rows: list[tuple[str, str, int]] = []
        engines_used = 0
        for engine, used in sorted(s.process_bytes.items()):
            m = self.engine_mem.get((engine, gpu))
            w = min(m.weights_bytes, used) if m else 0
            kv = min(m.kv_bytes, used - w) if m else 0
            rows += [(engine, "weights", w), (engine, "KV cache", kv),
                     (engine, "engine other", max(used - w - kv, 0))]  # fmt: skip
            engines_used += used
        rows.append(("", "other processes", max(s.used_bytes - engines_used, 0)))
        rows.append(("", "free", max(s.total_bytes - s.used_bytes, 0)))
        return rows

    def totals(self, gpu: int) -> tuple[int, ...]:
        """Bytes per CATEGORY (summed over engines) on one GPU."""
        acc = dict.fromkeys(self.CATEGORIES, 0)
        for _, cat, b in self.breakdown(gpu):
            acc[cat] += b
        return tuple(acc[c] for c in self.CATEGORIES)


# ---------------------------------------------------------------------------------------------
@dataclass
class StepRecord:
    """One scheduler step: who got how many tokens, and of what kind."""

    step: int
    ts: float
    token_budget: int
    prefill: list[tuple[str, int]] = field(default_factory=list)  # (req, chunk tokens)
    decode: list[tuple[str, int]] = field(default_factory=list)  # (req, tokens)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefill) + sum(n for _, n in self.decode)


class ScheduleState:
    """StepScheduled -> the last N steps per engine, each split into prefill chunks and decodes.

    A request's tokens count as a prefill chunk when it gets more than one token, or when it
    is scheduled for the first time with nothing computed yet; otherwise as decode (vLLM's
    scheduler, vllm/v1/core/sched/scheduler.py, makes no other distinction: both draw from one
    token budget). A prefill whose last chunk is one token shows as decode: rare, harmless.
    """

    def __init__(self, max_steps: int = 60) -> None:
        self.steps: dict[str, deque[StepRecord]] = {}
        self.kinds: dict[str, tuple[str, str]] = {}  # engine -> (role, kind)
        self.max_steps = max_steps
        self._seen: dict[str, set[str]] = {}
        self.version = 0

    def apply(self, batch) -> None:
        # Only the scheduler schedules: with TP/PP the worker ranks ("prefill/rank1") send
        # layer events only, and get no row of their own here.
        events = [ev for ev in batch.events if isinstance(ev, StepScheduled)]
        if not events:
            return
        name = batch.engine_id
        self.kinds[name] = (batch.role, batch.kind)
        ring = self.steps.setdefault(name, deque(maxlen=self.max_steps))
        seen = self._seen.setdefault(name, set())
        for ev in events:
            rec = StepRecord(ev.step, ev.ts, ev.token_budget, num_preempted=len(ev.preempted))
            for req_id, n in ev.num_scheduled_tokens.items():
                first = req_id not in seen and ev.num_computed_tokens.get(req_id, 0) == 0
                (rec.prefill if n > 1 or first else rec.decode).append((req_id, n))
                seen.add(req_id)
            seen.difference_update(ev.finished)
            seen.difference_update(ev.preempted)  # a preempted request prefills again
            ring.append(rec)
            self.version += 1


# ---------------------------------------------------------------------------------------------
TTFT_METRIC = "vllm:time_to_first_token_seconds"
ITL_METRIC = "vllm:inter_token_latency_seconds"


class LatencyState:
    """TTFT / ITL: exact samples from the proxy timeline, bucket counts from engines' /metrics."""

    def __init__(self, max_samples: int = 20000) -> None:
        self.ttft: deque[float] = deque(maxlen=max_samples)
        self.itl: deque[float] = deque(maxlen=max_samples)
        self._arrival: OrderedDict[str, float] = OrderedDict()
        self._last_token: dict[str, float] = {}
        # engine -> metric -> [(upper bound s, cumulative count)]
        self.hist: dict[str, dict[str, list[tuple[float, float]]]] = {}
        self.kinds: dict[str, tuple[str, str]] = {}
        self.version = 0

    def apply_timeline(self, ev: dict[str, Any]) -> None:
        kind, req, ts = ev.get("event"), str(ev.get("req_id")), float(ev.get("ts", 0.0))
        if kind == "arrival":
            self._arrival[req] = ts
            while len(self._arrival) > 10000:  # requests that never finished
                self._arrival.popitem(last=False)
        elif kind == "first_token":
            if req in self._arrival:
                self.ttft.append(ts - self._arrival[req])
            self._last_token[req] = ts
            self.version += 1
        elif kind == "token":
            last = self._last_token.get(req)
            if last is not None:
                self.itl.append(ts - last)
            self._last_token[req] = ts
            self.version += 1
        elif kind in ("finish", "error"):
            self._arrival.pop(req, None)
            self._last_token.pop(req, None)

    def apply_metrics(self, m: MetricsSample) -> None:
        self.kinds[m.engine] = (m.role, m.kind)
        per = self.hist.setdefault(m.engine, {})
        for name in (TTFT_METRIC, ITL_METRIC):
            buckets = histogram_buckets(m.snapshot, name)
            if buckets:
                per[name] = buckets
        self.version += 1


def histogram_buckets(snapshot: MetricsSnapshot, name: str) -> list[tuple[float, float]]:
    """[(le, cumulative count)] of a Prometheus histogram (summed over label sets), +Inf dropped."""
    h = snapshot.histogram(name)
    if h is None:
        return []
    return [(le, c) for le, c in h.buckets if le != float("inf")]
