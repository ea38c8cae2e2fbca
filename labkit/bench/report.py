"""What a benchmark run says: latency percentiles, throughput, goodput under SLOs, and what
the engines themselves counted (read from their /metrics before and after the run).

Definitions (as vLLM's serving benchmark and DistServe use them):
- TTFT: first token - arrival. ITL: the gaps between streamed tokens (pooled over requests).
  TPOT: (finish - first token) / (output tokens - 1), one value per request. e2e: finish - arrival.
- Throughput: finished requests and output tokens per second of the run (first arrival to
  last finish).
- Goodput under an SLO: the requests whose TTFT <= `ttft_s` AND whose TPOT (their mean
  inter-token latency) <= `itl_s`; as a fraction of all requests and per second of the run.
  A request that failed meets no SLO.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labkit.bench.loadgen import RequestResult

PERCENTILES = (50, 90, 99)
KV_TRANSFER = ("vllm:prompt_tokens_by_source_total", {"source": "external_kv_transfer"})


@dataclass(frozen=True)
class SLO:
    """Latency targets a request must meet to count as goodput (seconds)."""

    ttft_s: float = 2.0
    itl_s: float = 0.05


DEFAULT_SLO = SLO()

def percentiles(values: Iterable[float], ps: Sequence[int] = PERCENTILES) -> dict[str, float]:
    """{"p50": ..., "p90": ..., "p99": ..., "mean": ...}; NaN when there is no value."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {**{f"p{p}": math.nan for p in ps}, "mean": math.nan}
    return {**{f"p{p}": float(np.percentile(arr, p)) for p in ps}, "mean": float(arr.mean())}


def meets_slo(rec: RequestResult, slo: SLO) -> bool:
    """TTFT and TPOT within the SLO (a one-token answer has no TPOT: only TTFT counts)."""
    if not rec.ok or rec.ttft is None or rec.ttft > slo.ttft_s:
        return False
    tpot = rec.tpot
    return tpot is None or tpot <= slo.itl_s


def goodput(records: Sequence[RequestResult], slo: SLO, duration_s: float) -> dict[str, float]:
    """Fraction of requests meeting both SLOs, and how many per second of the run."""
    good = sum(meets_slo(r, slo) for r in records)
    return {"goodput_fraction": good / len(records) if records else math.nan,
            "goodput_rps": good / duration_s if duration_s > 0 else math.nan,
            "num_good": float(good)}


def run_span(records: Sequence[RequestResult]) -> float:
    """Seconds from the first arrival to the last finish of the finished requests."""
    done = [r for r in records if r.ok]
    if not done:
        return 0.0
    return max(r.finish for r in done) - min(r.arrival for r in records)  # type: ignore[type-var]


def summarize(records: Sequence[RequestResult], slo: SLO = DEFAULT_SLO) -> dict[str, Any]:
    """Latency percentiles (seconds), throughput and goodput of one run."""
    done = [r for r in records if r.ok]
    span = run_span(records)
    out_tokens = sum(r.num_output_tokens for r in done)
    return {
        "num_requests": len(records), "num_ok": len(done),
        "num_errors": sum(r.error is not None for r in records),
        "duration_s": span,
        "ttft": percentiles(r.ttft for r in done),  # type: ignore[misc]
        "itl": percentiles(x for r in done for x in r.itls),
        "tpot": percentiles(r.tpot for r in done if r.tpot is not None),
        "e2e": percentiles(r.e2e for r in done),  # type: ignore[misc]
        "throughput_rps": len(done) / span if span > 0 else math.nan,
        "output_tps": out_tokens / span if span > 0 else math.nan,
        "slo": asdict(slo),
        **goodput(records, slo, span),
    }


# ------------------------------------------------------------------ engine-side figures
def engine_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, float]:
    """What the engines counted during the run, from `MetricsSnapshot`s per engine name:
    KV tokens received from the other engine, NIXL bytes, preemptions, prefix-cache hits."""
    def total(snaps: Mapping[str, Any], name: str, **labels: str) -> float:
        return sum(s.sum(name, **labels) for s in snaps.values() if s is not None)

    out = {}
    for key, name, labels in (
            ("kv_transfer_tokens", KV_TRANSFER[0], KV_TRANSFER[1]),
            ("nixl_bytes", "vllm:nixl_bytes_transferred_sum", {}),
            ("preemptions", "vllm:num_preemptions_total", {}),
            ("prefix_hit_tokens", "vllm:prefix_cache_hits_total", {}),
            ("prefix_query_tokens", "vllm:prefix_cache_queries_total", {}),
            ("prompt_tokens", "vllm:prompt_tokens_total", {})):
        out[key] = total(after, name, **labels) - total(before, name, **labels)
    return out


# ------------------------------------------------------------------ results and tables
@dataclass
class BenchResult:
    """One variant of one comparison: what ran, where, and what it measured."""

    variant: str
    kind: str  # "vllm" | "sim"
    device: str  # e.g. "NVIDIA H100 80GB HBM3" (real) or "SIMULATED 2x NVIDIA H100 ..."
    engine: str  # "http" (Lab + load generator) | "cluster" (in-process SimCluster)
    workload: str
    num_gpus: int
    summary: dict[str, Any]
    engine_side: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    records: list[RequestResult] = field(default_factory=list, repr=False)

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "records"}
        if with_records:
            d["records"] = [{**asdict(r), "ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
                            for r in self.records]
        return d


def source_line(results: Sequence[BenchResult]) -> str:
    """The line every table starts with: real vLLM on which device, or SIMULATED."""
    kinds = {(r.kind, r.device, r.engine) for r in results}
    parts = []
    for kind, device, engine in sorted(kinds):
        how = "over HTTP (Lab + load generator)" if engine == "http" else "in-process SimCluster"
        parts.append(f"REAL vLLM on {device}, {how}" if kind == "vllm"
                     else f"SIMULATED ({device}), {how}")
    return "; ".join(parts)


_COLUMNS = [  # header, width, getter
    ("variant", 24, lambda r: r.variant),
    ("GPUs", 4, lambda r: str(r.num_gpus)),
    ("ok/n", 9, lambda r: f"{r.summary['num_ok']}/{r.summary['num_requests']}"),
    ("TTFT p50", 9, lambda r: _ms(r.summary["ttft"]["p50"])),
    ("TTFT p99", 9, lambda r: _ms(r.summary["ttft"]["p99"])),
    ("ITL p50", 8, lambda r: _ms(r.summary["itl"]["p50"])),
    ("ITL p99", 8, lambda r: _ms(r.summary["itl"]["p99"])),
    ("TPOT p50", 9, lambda r: _ms(r.summary["tpot"]["p50"])),
    ("e2e p50", 8, lambda r: _s(r.summary["e2e"]["p50"])),
    ("e2e p99", 8, lambda r: _s(r.summary["e2e"]["p99"])),
    ("req/s", 6, lambda r: f"{r.summary['throughput_rps']:.2f}"),
    ("tok/s", 7, lambda r: f"{r.summary['output_tps']:.0f}"),
    ("good%", 6, lambda r: f"{100 * r.summary['goodput_fraction']:.0f}%"),
    ("good/s", 6, lambda r: f"{r.summary['goodput_rps']:.2f}"),
    ("KV xfer tok", 11, lambda r: f"{r.engine_side.get('kv_transfer_tokens', 0):,.0f}"),
    ("preempt", 7, lambda r: f"{r.engine_side.get('preemptions', 0):,.0f}"),
    ("prefix hit", 10, lambda r: f"{r.engine_side.get('prefix_hit_tokens', 0):,.0f}"),
]


def _ms(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{1e3 * v:.1f}ms" if v < 10 else f"{v:.1f}s"


def _s(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}s"


def format_table(results: Sequence[BenchResult], title: str = "") -> str:
    """One row per variant, headed by what ran (REAL vLLM on <device> or SIMULATED)."""
    if not results:
        return "(no results)"
    slo = results[0].summary["slo"]
    head = [title] if title else []
    head.append(source_line(results))
    head.append(f"workload: {results[0].workload}; goodput SLO: TTFT <= {slo['ttft_s'] * 1e3:g} ms"
                f" and TPOT <= {slo['itl_s'] * 1e3:g} ms; {_clock(results)}")
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w, _) in enumerate(_COLUMNS))]
    for r in results:
        lines.append("  ".join(g(r).rjust(w) if i else g(r).ljust(w)
                               for i, (_, w, g) in enumerate(_COLUMNS)))
    return "\n".join(head + lines)


def _clock(results: Sequence[BenchResult]) -> str:
    """Which clock the latencies are on."""
    if all(r.engine == "cluster" for r in results):
        return "latencies in simulated time"
    if all(r.kind == "vllm" for r in results):
        return "latencies in wall time"
    speeds = {r.config.get("speed", 1.0) for r in results if r.kind == "sim"}
    return ("latencies measured on the wall clock against paced simulated engines "
            f"(speed {', '.join(f'{s:g}' for s in sorted(speeds))}; scaled to simulated seconds), "
            "HTTP and process overheads included")


def write_json(results: Sequence[BenchResult], path: str | Path, *, title: str = "",
               with_records: bool = False) -> Path:
    """The results (and optionally every request's timings) as one JSON file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"title": title, "source": source_line(results),
           "results": [r.to_dict(with_records) for r in results]}
    path.write_text(json.dumps(_plain(doc), indent=2, allow_nan=False))
    return path


def _plain(o: Any) -> Any:
    """Strict JSON: NaN/inf -> null, numpy scalars -> Python numbers."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def cdf_figure(results: Sequence[BenchResult], metric: str = "ttft") -> Any:
    """A plotly figure: the CDF of `metric` ("ttft" | "tpot" | "e2e" | "itl") per variant."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in results:
        done = [x for x in r.records if x.ok]
        if metric == "itl":
            vals = [v for x in done for v in x.itls]
        else:
            vals = [getattr(x, metric) for x in done]
        arr = np.sort(np.asarray([v for v in vals if v is not None], dtype=float)) * 1e3
        y = np.arange(1, arr.size + 1) / max(arr.size, 1)
        fig.add_trace(go.Scatter(x=arr, y=y, mode="lines", name=r.variant))
    what = "SIMULATED" if all(r.kind == "sim" for r in results) else "real vLLM"
    fig.update_layout(title=f"{metric.upper()} CDF ({what})", xaxis_title=f"{metric.upper()} (ms)",
                      yaxis_title="fraction of requests", yaxis_range=[0, 1.02])
    return fig
