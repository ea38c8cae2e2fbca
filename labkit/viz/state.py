"""Reducers that fold telemetry into view state. Each is cheap per event and bounded in memory
(ring buffers), so a dashboard can run for hours; the figures are pure functions of these.

    BlockMapState   physical KV blocks per engine (labkit/viz/blockstate.py)
    TransferState   per request: queue / prefill / KV transfer / decode (labkit/viz/transfers.py)
    MemoryState     per GPU: weights / KV / other per engine, other processes, free; over time
    ScheduleState   per step: tokens per request, prefill chunk vs decode, against the budget
    LatencyState    TTFT / ITL samples from the proxy timeline, and engines' histograms
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from labkit.telemetry.metrics import MetricsSnapshot
from labkit.telemetry.observer_schema import StepScheduled
from labkit.telemetry.source import EngineMemory, GpuSample, MetricsSample
from labkit.viz.blockstate import BlockMapState, EngineBlocks
from labkit.viz.transfers import RequestTimes, TransferState

__all__ = [
    "BlockMapState", "EngineBlocks", "TransferState", "RequestTimes", "MemoryState",
    "ScheduleState", "StepRecord", "LatencyState", "TTFT_METRIC", "ITL_METRIC",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
class MemoryState:
    """NVML samples + engines' own weights/KV figures -> per-GPU breakdown, now and over time."""

    CATEGORIES = ("weights", "KV cache", "engine other", "other processes", "free")

    def __init__(self, history: int = 600) -> None:
        self.latest: dict[int, GpuSample] = {}
        self.engine_mem: dict[tuple[str, int], EngineMemory] = {}
        self.history: dict[int, deque[tuple[float, tuple[int, ...]]]] = {}
        self.pools: dict[str, tuple[int, int]] = {}  # engine -> (KV blocks, bytes per block)
        self.maxlen = history
        self.version = 0

    def apply_engine_memory(self, m: EngineMemory) -> None:
        self.engine_mem[(m.engine, m.gpu)] = m
        self.version += 1

    def set_pool(self, engine: str, num_blocks: int, block_bytes: int) -> None:
        """The engine's block pool (its log's "GPU KV cache size", or a block-count override):
        what it really allocates for KV on each GPU is num_blocks x block_bytes, which may be
        far less than the "Available KV cache memory" it logs (num_gpu_blocks_override)."""
        if num_blocks > 0 and block_bytes > 0:
            self.pools[engine] = (num_blocks, block_bytes)
            self.version += 1

    def kv_bytes(self, engine: str, gpu: int) -> int:
        """KV bytes the engine holds on one GPU: the pool where known, capped by its own figure."""
        m = self.engine_mem.get((engine, gpu))
        pool = self.pools.get(engine)
        logged = m.kv_bytes if m else 0
        if pool is None:
            return logged
        allocated = pool[0] * pool[1]
        return min(allocated, logged) if logged else allocated

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
        device_used = s.used_bytes
        for engine, used in sorted(s.process_bytes.items()):
            m = self.engine_mem.get((engine, gpu))
            kv_held = self.kv_bytes(engine, gpu)
            if s.kind == "sim" and m and m.kv_bytes > kv_held:
                # A simulated sample counts the plan's KV; the engine holds only its pool.
                used, device_used = used - (m.kv_bytes - kv_held), device_used - (m.kv_bytes - kv_held)
            w = min(m.weights_bytes, used) if m else 0
            kv = min(kv_held, used - w) if m else 0
            rows += [(engine, "weights", w), (engine, "KV cache", kv),
                     (engine, "engine other", max(used - w - kv, 0))]  # fmt: skip
            engines_used += used
        rows.append(("", "other processes", max(device_used - engines_used, 0)))
        rows.append(("", "free", max(s.total_bytes - device_used, 0)))
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
