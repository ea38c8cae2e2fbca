"""LiveTelemetry: every reader of one running lab, behind the views' `poll()` protocol.

One object subscribes to everything a running PD pair says — observer events (ZMQ, bound
here, the engines connect), KV events (ZMQ, one reader per engine: bound here when the
engine's endpoint is a concrete address, which vLLM connects to), /metrics (one scraper
per engine), the proxy's timeline (HTTP, polled with a cursor) and GPU memory (NVML for real
engines; the simulator's own figures, labelled "sim", for simulated ones) — and hands the
views what is new since the last `poll()` (labkit.telemetry.source.TelemetrySource). That
delta is the one path: the views, the recorder and `labkit demo` all read it.

Nothing here grows without bound. Between two polls each stream waits in a bounded queue;
when nobody polls (a lab under `labkit up` with no dashboard attached) the oldest items fall
off and are counted (`dropped()`). vLLM's KV events are not part of the delta (they name
blocks by hash; the views draw physical blocks from the observer): the last
`KV_EVENTS_KEPT` batches are kept for inspection (`recent_kv_events()`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from labkit.telemetry.kv_events import publisher_binds
from labkit.telemetry.metrics import MetricsScraper, MetricsSnapshot
from labkit.telemetry.source import EngineMemory, GpuSample, MetricsSample, TelemetryDelta
from labkit.telemetry.subscriber import KVEventMessage, KVEventSubscriber, ObserverSubscriber

logger = logging.getLogger(__name__)

# What waits between two polls (per LiveTelemetry). A /metrics sample is ~300 KB of parsed
# families in memory, so only the newest few per engine are kept; a pool snapshot is one
# byte per block (255,300 for a TP=2 engine on an H200), so the observer queue is bounded in
# bytes as well as in batches.
OBSERVER_KEPT, OBSERVER_BYTES_KEPT = 20_000, 64 << 20
TIMELINE_KEPT = 20_000
METRICS_KEPT_PER_ENGINE = 8
GPU_SAMPLES_KEPT = 1_024
KV_EVENTS_KEPT = 1_024


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
    # The --kv-events-config endpoint the engine was given. vLLM binds wildcard endpoints
    # and CONNECTS to concrete ones (`publisher_binds`); the reader takes the other side.
    kv_events_endpoint: str | None = None
    pids: list[int] = field(default_factory=list)
    weights_bytes: int = 0  # per GPU (rank), the engine's own figure or the plan's
    kv_bytes: int = 0
    kv_bytes_per_block: int = 0  # one block on one GPU in the KV cache's dtype (fp8: half)


class _Drain:
    """A thread-safe queue that poll() empties, bounded in items (and in bytes where `size`
    is given): the oldest items fall off first and are counted in `dropped`."""

    def __init__(self, name: str, maxlen: int, max_bytes: int | None = None,
                 size: Callable[[Any], int] | None = None) -> None:
        self.name = name
        self.maxlen, self.max_bytes, self._size = maxlen, max_bytes, size
        self._q: deque[tuple[Any, int]] = deque()
        self._bytes = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def put(self, item: Any) -> None:
        n = self._size(item) if self._size is not None else 0
        with self._lock:
            self._q.append((item, n))
            self._bytes += n
            first_drop = self.dropped == 0
            while len(self._q) > self.maxlen or (
                    self.max_bytes is not None and self._bytes > self.max_bytes
                    and len(self._q) > 1):
                _, m = self._q.popleft()
                self._bytes -= m
                self.dropped += 1
        if first_drop and self.dropped:
            logger.info("telemetry: nobody polled for a while; dropping the oldest %s items "
                        "(kept: %d)", self.name, len(self._q))

    def take(self) -> list[Any]:
        with self._lock:
            items = [item for item, _ in self._q]
            self._q.clear()
            self._bytes = 0
        return items

    def __len__(self) -> int:
        return len(self._q)


def _batch_bytes(batch: Any) -> int:
    """Rough bytes an ObserverBatch holds: its pool snapshots' block states dominate."""
    events = getattr(batch, "events", ())
    return 200 + sum(100 + len(getattr(ev, "block_state", b"") or b"") for ev in events)


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
        self._observer = _Drain("observer", OBSERVER_KEPT, OBSERVER_BYTES_KEPT, _batch_bytes)
        self._timeline = _Drain("timeline", TIMELINE_KEPT)
        self._metrics = _Drain("metrics", METRICS_KEPT_PER_ENGINE * max(1, len(engines)))
        self._gpu = _Drain("gpu", GPU_SAMPLES_KEPT)
        self._kv: deque[tuple[str, KVEventMessage]] = deque(maxlen=KV_EVENTS_KEPT)
        self._observer_drops: dict[str, int] = {}
        self._heard: set[str] = set()  # engines whose observer reached us (any batch)
        self._heard_cv = threading.Condition()
        self._memory_sent = False
        self.num_gpu_errors = 0
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
                                        callback=lambda m, n=e.name: self._on_kv(n, m),
                                        bind=not publisher_binds(e.kv_events_endpoint))
                self.kv_subs[e.name] = sub
                self._closers.append(sub)
            scraper = MetricsScraper(f"{e.base_url}/metrics", interval=max(interval, 0.25),
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
        if batch.events:  # an empty batch is a publisher's hello (ObserverPublisher.greet)
            self._observer.put(batch)
        name = batch.engine_id.split("/")[0]  # "decode/rank1" is a worker of "decode"
        if name not in self._heard:
            with self._heard_cv:
                self._heard.add(name)
                self._heard_cv.notify_all()
        n = getattr(batch, "num_dropped", 0)
        if n > self._observer_drops.get(batch.engine_id, 0):
            self._observer_drops[batch.engine_id] = n

    def _on_kv(self, name: str, msg: KVEventMessage) -> None:
        self._kv.append((name, msg))

    def _on_metrics(self, engine: EngineTap, snap: MetricsSnapshot) -> None:
        self._metrics.put(MetricsSample(engine=engine.name, ts=snap.ts, snapshot=snap,
                                        role=engine.role, kind=self.kind))

    def _follow_timeline(self) -> None:
        cursor = 0
        from labkit.auth import headers

        with httpx.Client(timeout=2.0, headers=headers()) as client:
            while not self._stop.is_set():
                try:
                    r = client.get(f"{self.proxy_url}/timeline", params={"since": cursor})
                    if r.status_code == 200:
                        body = r.json()
                        for ev in body.get("events", []):
                            self._timeline.put(ev)
                        cursor = int(body.get("next", cursor))
                except (httpx.HTTPError, ValueError):
                    pass
                self._stop.wait(self.interval)

    def _sample_gpus(self) -> None:
        if self.kind == "vllm":
            from labkit.telemetry import nvml

            if not nvml.available():
                logger.info("telemetry: NVML is not available; no GPU memory samples")
                return
            while not self._stop.is_set():
                try:
                    self._put_nvml(nvml.read_sample())
                except Exception:  # NVML hiccups must not kill the reader: say so, go on
                    self.num_gpu_errors += 1
                    if self.num_gpu_errors == 1:
                        logger.warning("telemetry: an NVML sample failed (further failures "
                                       "only counted in num_gpu_errors)", exc_info=True)
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

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Block until every reader hears its engines, at most `timeout` seconds.

        ZMQ joins late: a PUB drops what it sends before a SUB's subscription reaches it. So:
        the observer reader has had a batch from every engine (each observer publisher says
        hello when a subscriber joins: ObserverPublisher.greet), and each KV-event reader has
        completed its handshake with its engine (vLLM's KV publisher cannot say hello; its
        subscription follows the handshake by a loopback round trip). vLLM connects its KV
        publisher to a concrete endpoint, so that reader binds it (`publisher_binds`): with
        both sides connecting no handshake ever happens. Returns True if connected, False on
        timeout (the views still work; the first events may be missed); `missing()` then
        says which readers were still waiting.
        """
        deadline = time.monotonic() + timeout
        names = {e.name for e in self.engines}
        if self.obs_sub is not None:
            with self._heard_cv:
                while not names <= self._heard:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._heard_cv.wait(left)
        for sub in self.kv_subs.values():
            if not sub.connected.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def missing(self) -> list[str]:
        """Readers that have not heard their engine yet: "observer:NAME", "kv-events:NAME"."""
        out = []
        if self.obs_sub is not None:
            out += [f"observer:{e.name}" for e in self.engines if e.name not in self._heard]
        out += [f"kv-events:{n}" for n, sub in self.kv_subs.items() if not sub.connected.is_set()]
        return out

    def reconnecting(self, name: str) -> None:
        """Engine `name` restarts: `wait_connected` waits for its new publishers again."""
        with self._heard_cv:
            self._heard.discard(name)
        if name in self.kv_subs:
            self.kv_subs[name].connected.clear()

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

    def dropped(self) -> dict[str, int]:
        """Items each stream lost because nobody polled in time (0 when a view keeps up)."""
        return {d.name: d.dropped for d in (self._observer, self._timeline, self._metrics,
                                            self._gpu)}

    def observer_drops(self) -> dict[str, int]:
        """Events each engine process's observer lost, as its latest batch said (the running
        total it carries: `ObserverBatch.num_dropped`); absent engines dropped nothing."""
        return dict(self._observer_drops)

    def recent_kv_events(self) -> list[tuple[str, KVEventMessage]]:
        """The last `KV_EVENTS_KEPT` KV-event batches as (engine name, message), oldest
        first: vLLM's own KV events, for inspection; no view reads them."""
        return list(self._kv)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "engines": [{"name": e.name, "role": e.role, "kind": e.kind, "gpus": e.gpus,
                         "num_blocks": e.num_blocks, "block_size": e.block_size,
                         "model": e.model, "kv_bytes_per_block": e.kv_bytes_per_block}
                        for e in self.engines],
            "gpus": self.gpus,
            "link": self.link,
        }

    def close(self) -> None:
        self._stop.set()
        for c in self._closers:
            try:
                c.close()
            except Exception:  # close the others all the same
                logger.exception("telemetry: closing %r failed", c)
        for t in self._threads:
            t.join(timeout=3)
