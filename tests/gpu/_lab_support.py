"""Helpers for the product-path GPU tests: drive a running Lab, collect what its telemetry
delivers, and reduce it to plain figures (saved as JSON under $OUT)."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from labkit.telemetry import nvml
from labkit.telemetry.metrics import MetricsSnapshot

GIB = 1 << 30
PROMPT_TOKENS = 1081


def prompt_ids(n: int, seed: int = 0, vocab: int = 30000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, vocab) for _ in range(n)]


def stream(url: str, model: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    """One streamed completion (labkit.demo's client); client-side TTFT and end to end."""
    from labkit.demo import stream_completion

    r = stream_completion(url, model, ids, max_tokens)
    return {"chunks": r["tokens"], "ttft_s": r["ttft"] if r["tokens"] else None,
            "e2e_s": r["e2e"]}


def metrics(url: str) -> MetricsSnapshot:
    return MetricsSnapshot.parse(httpx.get(f"{url}/metrics", timeout=10).text)


def by_source(snap: MetricsSnapshot) -> dict[str, float]:
    return {s: snap.get("vllm:prompt_tokens_by_source_total", source=s) or 0.0
            for s in ("local_compute", "local_cache_hit", "external_kv_transfer")}


def num_gpu_blocks(snap: MetricsSnapshot) -> int:
    info = snap.info("vllm:cache_config_info") or {}
    return int(float(info.get("num_gpu_blocks", 0)))


class Poller:
    """Polls a TelemetrySource (LiveTelemetry or a Recorder around it) on a side thread and
    keeps every delta: what a dashboard would have been shown."""

    def __init__(self, source: Any, interval: float = 0.2) -> None:
        self.source, self.interval = source, interval
        self.observer: list[Any] = []
        self.timeline: list[dict[str, Any]] = []
        self.metrics: list[Any] = []
        self.gpu: list[Any] = []
        self.memory: list[Any] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.poll_once()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval)

    def poll_once(self) -> None:
        with self._lock:
            d = self.source.poll()
            self.observer += d.observer
            self.timeline += d.timeline
            self.metrics += d.metrics
            self.gpu += d.gpu_samples
            self.memory += d.engine_memory

    def events(self, kind: str, engine: str | None = None) -> list[tuple[str, Any]]:
        with self._lock:
            return [(b.engine_id, e) for b in self.observer for e in b.events
                    if type(e).__name__ == kind and (engine is None or b.engine_id == engine)]

    def summary(self) -> dict[str, Any]:
        """Counts per engine and kind: the JSON-able gist of what the telemetry delivered."""
        with self._lock:
            obs = Counter(f"{b.engine_id}:{type(e).__name__}" for b in self.observer
                          for e in b.events)
            return {
                "observer_engines": sorted({b.engine_id for b in self.observer}),
                "observer_roles": sorted({f"{b.engine_id}={b.role}" for b in self.observer}),
                "observer_events": dict(obs),
                "timeline_events": dict(Counter(e.get("event") for e in self.timeline)),
                "metrics_engines": dict(Counter(m.engine for m in self.metrics)),
                "gpu_samples": len(self.gpu),
                "gpu_sample_kinds": sorted({g.kind for g in self.gpu}),
                "engine_memory": [{"engine": m.engine, "gpu": m.gpu, "weights": m.weights_bytes,
                                   "kv": m.kv_bytes} for m in self.memory],
            }

    def peak_process_bytes(self) -> dict[str, dict[int, int]]:
        """engine -> GPU -> the largest per-process sum NVML showed."""
        out: dict[str, dict[int, int]] = {}
        with self._lock:
            for g in self.gpu:
                for eng, b in g.process_bytes.items():
                    per = out.setdefault(eng, {})
                    per[g.gpu] = max(per.get(g.gpu, 0), b)
        return out


def layer_stats(poller: Poller, engine: str, op: str) -> dict[str, Any]:
    """Per-layer LayerTiming of one engine and op: count, median ms, GB/s at the median."""
    evs = [e for _, e in poller.events("LayerTiming", engine)
           if e.op == op and e.layer != "wait_for_save"]
    if not evs:
        return {"count": 0}
    ms = sorted((e.end - e.start) * 1e3 for e in evs)
    med = ms[len(ms) // 2]
    big = max(e.num_bytes for e in evs)
    return {"count": len(evs), "median_ms": round(med, 3), "first_ms": round(ms[-1], 3),
            "max_layer_bytes": big,
            "gbps_at_median": round(big / (med / 1e3) / 1e9, 2) if med > 0 else None}


def transfers(poller: Poller, engine: str) -> list[dict[str, Any]]:
    out = []
    for _, e in poller.events("KVTransfer", engine):
        dt = e.end - e.start
        out.append({"req_id": e.req_id, "direction": e.direction, "tokens": e.num_tokens,
                    "bytes": e.num_bytes, "ms": round(dt * 1e3, 3), "connector": e.connector,
                    "gbps": round(e.num_bytes / dt / 1e9, 2) if dt > 0 else None})
    return out


def gpu_used() -> list[int]:
    return [g.used_bytes for g in nvml.read_sample().gpus]


def wait_gpu_back(before: list[int], gpus: list[int] | None = None, slack: int = 512 << 20,
                  timeout: float = 20.0) -> list[int]:
    """Wait until the used memory of `gpus` (default: all) is back near `before`; return the
    last reading of every GPU (others may be busy with another run)."""
    watch = range(len(before)) if gpus is None else gpus
    end = time.time() + timeout
    now = gpu_used()
    while time.time() < end and any(now[g] > before[g] + slack for g in watch):
        time.sleep(0.5)
        now = gpu_used()
    return now


def recorder(tel: Any, lab: Any, name: str, out: Path, meta: dict[str, Any]) -> Any:
    """A Recorder around `tel` writing out/name, or `tel` itself where recording is missing."""
    try:
        from labkit.telemetry.recording import Recorder
    except ImportError:
        return tel
    return Recorder(tel, out / name, lab=lab, meta=meta)
