"""Scrape an engine's Prometheus `/metrics` and read vLLM's numbers from it.

Parsing is prometheus_client's own `text_string_to_metric_families`. Two things to know:
- a counter's FAMILY is named without `_total` but its SAMPLES keep it
  (family `vllm:prompt_tokens_by_source`, sample `vllm:prompt_tokens_by_source_total`);
  `MetricsSnapshot` is keyed by sample name and accepts either;
- vLLM names contain ':' (`vllm:kv_cache_usage_perc`), which the text format allows.
Info-like metrics (`vllm:cache_config_info`) are gauges of value 1 whose labels carry the data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from labkit import auth

logger = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs: hashable, order-free



def freeze(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram: cumulative `buckets` as `(le, count)` ascending (last le=inf)."""

    buckets: list[tuple[float, float]]
    count: float
    sum: float

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else float("nan")

    def quantile(self, q: float) -> float:
        """Estimate like PromQL's `histogram_quantile`: linear inside the bucket."""
        if not self.count or not self.buckets:
            return float("nan")
        rank = q * self.count
        prev_le, prev_count = 0.0, 0.0
        for le, cum in self.buckets:
            if cum >= rank:
                if le == float("inf"):
                    return prev_le  # Prometheus returns the last finite bound
                if cum == prev_count:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_count) / (cum - prev_count)
            prev_le, prev_count = le, cum
        return prev_le


@dataclass
class MetricsSnapshot:
    """One scrape: `samples[(sample_name, frozen labels)] = value` taken at `ts`."""

    ts: float
    samples: dict[tuple[str, Labels], float]
    types: dict[str, str] = field(default_factory=dict)  # family name -> type

    @classmethod
    def parse(cls, text: str, ts: float | None = None) -> MetricsSnapshot:
        """Parse Prometheus text exposition format."""
        samples: dict[tuple[str, Labels], float] = {}
        types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            types[family.name] = family.type
            for s in family.samples:
                samples[(s.name, freeze(s.labels))] = float(s.value)
        return cls(time.time() if ts is None else ts, samples, types)

    def _sample_name(self, name: str) -> str:
        # Accept a counter's family name for its `_total` samples.
        if self.types.get(name) == "counter":
            return name + "_total"
        return name

    def series(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Every sample named `name` whose labels include `labels`: `(labels, value)`."""
        name = self._sample_name(name)
        want = {k: str(v) for k, v in labels.items()}
        out = []
        for (sname, frozen), value in self.samples.items():
            if sname != name:
                continue
            d = dict(frozen)
            if all(d.get(k) == v for k, v in want.items()):
                out.append((d, value))
        return out

    def get(self, name: str, **labels: str) -> float | None:
        """The one sample matching; None if none; ValueError if several (add labels)."""
        found = self.series(name, **labels)
        if not found:
            return None
        if len(found) > 1:
            options = [lab for lab, _ in found]
            raise ValueError(f"{name} {labels} matches {len(found)} series: {options}")
        return found[0][1]

    def sum(self, name: str, **labels: str) -> float:
        """Sum over every matching sample (0.0 if none)."""
        return sum(v for _, v in self.series(name, **labels))

    def histogram(self, name: str, **labels: str) -> Histogram | None:
        """Buckets, count and sum of histogram `name`, summed over matching label sets."""
        counts: dict[float, float] = {}
        for lab, value in self.series(name + "_bucket", **labels):
            le = float(lab["le"])
            counts[le] = counts.get(le, 0.0) + value
        if not counts:
            return None
        return Histogram(
            buckets=sorted(counts.items()),
            count=self.sum(name + "_count", **labels),
            sum=self.sum(name + "_sum", **labels),
        )

    def info(self, name: str, **labels: str) -> dict[str, str] | None:
        """Labels of an info-style metric (e.g. `vllm:cache_config_info`), or None."""
        found = self.series(name, **labels)
        return dict(found[0][0]) if found else None

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


def metrics_url(url: str) -> str:
    """`http://host:port` or `.../metrics` -> the `/metrics` URL."""
    url = url.rstrip("/")
    return url if url.endswith("/metrics") else url + "/metrics"


def scrape(url: str, client: httpx.Client | None = None, timeout: float = 5.0) -> MetricsSnapshot:
    """GET `/metrics` once and parse it. Raises `httpx.HTTPError` when the engine is not up."""
    target = metrics_url(url)
    if client is None:
        with httpx.Client(timeout=timeout, headers=auth.headers()) as c:
            response = c.get(target)
    else:
        response = client.get(target, timeout=timeout)
    response.raise_for_status()
    return MetricsSnapshot.parse(response.text)


class MetricsScraper:
    """Polls an engine's `/metrics` every `interval` seconds on a background thread.

    Each snapshot becomes `.latest` and is passed to `on_snapshot`. An engine that is down only counts `num_errors`
    and sets `last_error`; the poller keeps trying until `close()`.
    """

    def __init__(
        self,
        url: str,
        interval: float = 1.0,
        *,
        on_snapshot: Callable[[MetricsSnapshot], None] | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.url = metrics_url(url)
        self.interval = interval
        self.latest: MetricsSnapshot | None = None
        self.num_scrapes = 0
        self.num_errors = 0
        self.last_error: str | None = None
        self._on_snapshot = on_snapshot
        self._timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="metrics-scraper")
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=self._timeout, headers=auth.headers()) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                self.scrape_once(client)
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def scrape_once(self, client: httpx.Client) -> MetricsSnapshot | None:
        """One poll: scrape, notify. Never raises."""
        try:
            snap = scrape(self.url, client, self._timeout)
        except (httpx.HTTPError, ValueError) as exc:
            self.num_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return None
        self.latest = snap
        self.num_scrapes += 1
        if self._on_snapshot is not None:
            try:
                self._on_snapshot(snap)
            except Exception:
                logger.exception("metrics on_snapshot callback failed")
        return snap

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop polling and join the thread. Idempotent."""
        self._stop.set()
        self._thread.join(timeout)

    def __enter__(self) -> MetricsScraper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
