"""LiveTelemetry: every reader of one running lab, behind the views' `poll()` protocol.

One object subscribes to everything a running PD pair says — observer events (ZMQ, bound
here, the engines connect), KV events (ZMQ, one subscriber per engine), /metrics (one scraper
per engine), the proxy's timeline (HTTP, polled with a cursor) and GPU memory (NVML for real
engines; the simulator's own figures, labelled "sim", for simulated ones) — keeps it in one
`TelemetryStore` (what a recording saves) and hands the views what is new since the last
`poll()` (labkit.telemetry.source.TelemetrySource).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx

from labkit.telemetry.metrics import MetricsScraper, MetricsSnapshot
from labkit.telemetry.source import EngineMemory, GpuSample, MetricsSample, TelemetryDelta
from labkit.telemetry.store import TelemetryStore
from labkit.telemetry.subscriber import KVEventSubscriber, ObserverSubscriber


@dataclass
class EngineTap:
    """What LiveTelemetry needs of one engine."""

    name: str
    role: str
    kind: str  # "vllm" | "sim"
    base_url: str
    gpus: list[int]
    num_blocks: int
    block_size: int
    model: str
    kv_events_endpoint: str | None = None
    pids: list[int] = field(default_factory=list)
    weights_bytes: int = 0  # per GPU (rank), the engine's own figure or the plan's
    kv_bytes: int = 0


class _Drain:
    """A thread-safe bounded queue drained by poll()."""

    def __init__(self, maxlen: int = 50_000) -> None:
        self._q: deque[Any] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def put(self, item: Any) -> None:
        with self._lock:
            self._q.append(item)

    def take(self) -> list[Any]:
        with self._lock:
            items = list(self._q)
            self._q.clear()
        return items


class LiveTelemetry:
    """Readers for one lab; `poll()` / `describe()` feed `labkit.viz.Dashboard`.

    Args:
        kind: "vllm" or "sim" (every item is labelled with it).
        engines: the engines to watch.
        proxy_url: the PD proxy (its /timeline is followed), or None.
        observer_endpoint: where to BIND the observer subscriber (engines connect to it).
        gpus: describe()'s GPU list: [{"index", "name", "total_bytes"}].
        link: a labkit.hardware.LINKS key for the KV path (for GB/s against the peak).
        interval: seconds between metrics scrapes / timeline polls / GPU samples.
    """

    def __init__(self, kind: str, engines: list[EngineTap], *, proxy_url: str | None = None,
                 observer_endpoint: str | None = None, gpus: list[dict[str, Any]] | None = None,
                 link: str | None = None, interval: float = 0.25) -> None:
        self.kind = kind
        self.engines = engines
        self.proxy_url = proxy_url
        self.gpus = gpus or []
        self.link = link
        self.interval = interval
        self.store = TelemetryStore()
        for e in engines:
            self.store.add_source(e.name, kind, role=e.role)
        self._observer = _Drain()
        self._timeline = _Drain()
        self._metrics = _Drain()
        self._gpu = _Drain()
        self._memory_sent = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._closers: list[Any] = []
        self.obs_sub: ObserverSubscriber | None = None
        if observer_endpoint:
            self.obs_sub = ObserverSubscriber(observer_endpoint, callback=self._on_observer,
                                              bind=True)
            self._closers.append(self.obs_sub)
        self.kv_subs: dict[str, KVEventSubscriber] = {}
        for e in engines:
            if e.kv_events_endpoint:
                sub = KVEventSubscriber(e.kv_events_endpoint,
                                        callback=lambda m, n=e.name: self._on_kv(n, m))
                self.kv_subs[e.name] = sub
                self._closers.append(sub)
            scraper = MetricsScraper(f"{e.base_url}/metrics", interval=max(interval, 0.25),
                                     store=self.store, source=e.name,
                                     on_snapshot=lambda s, eng=e: self._on_metrics(eng, s))
            self._closers.append(scraper)
        if proxy_url:
            self._spawn(self._follow_timeline)
        self._spawn(self._sample_gpus)

    # ------------------------------------------------------------------ readers
    def _spawn(self, fn: Any) -> None:
        t = threading.Thread(target=fn, name=f"labkit-{fn.__name__}", daemon=True)
        t.start()
        self._threads.append(t)

    def _on_observer(self, batch: Any) -> None:
        self._observer.put(batch)
        self.store.log("obs", batch, source=getattr(batch, "engine_id", ""))

    def _on_kv(self, name: str, msg: Any) -> None:
        self.store.log("kv", msg, source=name)

    def _on_metrics(self, engine: EngineTap, snap: MetricsSnapshot) -> None:
        self._metrics.put(MetricsSample(engine=engine.name, ts=snap.ts, snapshot=snap,
                                        role=engine.role, kind=self.kind))

    def _follow_timeline(self) -> None:
        cursor = 0
        with httpx.Client(timeout=2.0) as client:
            while not self._stop.is_set():
                try:
                    r = client.get(f"{self.proxy_url}/timeline", params={"since": cursor})
                    if r.status_code == 200:
                        body = r.json()
                        for ev in body.get("events", []):
                            self._timeline.put(ev)
                            self.store.log("proxy", ev, source="proxy", ts=ev.get("ts"))
                        cursor = int(body.get("next", cursor))
                except (httpx.HTTPError, ValueError):
                    pass
                self._stop.wait(self.interval)

    def _sample_gpus(self) -> None:
        if self.kind == "vllm":
            from labkit.telemetry import nvml

            if not nvml.available():
                return
            while not self._stop.is_set():
                try:
                    self._put_nvml(nvml.read_sample())
                except Exception:  # NVML hiccups must not kill the reader
                    pass
                self._stop.wait(max(self.interval, 0.25))
        else:
            # Simulated GPUs: the simulator holds what its plan says (weights + KV,
            # preallocated as vLLM does). Labelled kind="sim" so no view mistakes it for NVML.
            while not self._stop.is_set():
                now = time.time()
                for g in self.gpus:
                    per = {e.name: e.weights_bytes + e.kv_bytes
                           for e in self.engines if g["index"] in e.gpus}
                    self._gpu.put(GpuSample(ts=now, gpu=g["index"], used_bytes=sum(per.values()),
                                            total_bytes=int(g.get("total_bytes", 0)),
                                            process_bytes=per, name=g.get("name", ""),
                                            kind="sim"))
                self._stop.wait(1.0)

    def _put_nvml(self, sample: Any) -> None:
        """NVML's per-process figures summed per engine (an engine's pids: its process group)."""
        owner = {pid: e.name for e in self.engines for pid in e.pids}
        for g in sample.gpus:
            per: dict[str, int] = {}
            for p in sample.processes:
                if p.gpu == g.index and p.pid in owner and p.used_bytes is not None:
                    per[owner[p.pid]] = per.get(owner[p.pid], 0) + p.used_bytes
            # g.index is logical (plan GPU k), as engines' gpus are: nvml.read_sample numbers
            # the GPUs CUDA_VISIBLE_DEVICES names; g.physical is NVML's index, for labels
            self._gpu.put(GpuSample(ts=sample.ts, gpu=g.index, used_bytes=g.used_bytes,
                                    total_bytes=g.total_bytes, process_bytes=per, name=g.name,
                                    kind="vllm", physical=g.physical))

    def refresh_pids(self, pids: dict[str, list[int]]) -> None:
        """vLLM's EngineCore / worker children appear after start: map them again."""
        for e in self.engines:
            if e.name in pids:
                e.pids = list(pids[e.name])

    # ------------------------------------------------------------------ the protocol
    def poll(self) -> TelemetryDelta:
        delta = TelemetryDelta(observer=self._observer.take(), timeline=self._timeline.take(),
                               metrics=self._metrics.take(), gpu_samples=self._gpu.take())
        if not self._memory_sent:
            delta.engine_memory = [
                EngineMemory(engine=e.name, gpu=g, weights_bytes=e.weights_bytes,
                             kv_bytes=e.kv_bytes, role=e.role, kind=self.kind)
                for e in self.engines for g in e.gpus]
            self._memory_sent = True
        return delta

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "engines": [{"name": e.name, "role": e.role, "kind": e.kind, "gpus": e.gpus,
                         "num_blocks": e.num_blocks, "block_size": e.block_size,
                         "model": e.model} for e in self.engines],
            "gpus": self.gpus,
            "link": self.link,
        }

    def close(self) -> None:
        self._stop.set()
        for c in self._closers:
            try:
                c.close()
            except Exception:
                pass
        for t in self._threads:
            t.join(timeout=3)
