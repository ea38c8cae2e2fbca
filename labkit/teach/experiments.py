"""Simulated-cluster experiments the notebooks run: chunk-size sweep, PD vs colocated.

Each runs labkit's simulator (vLLM v1's scheduler and block pool, a roofline cost model for
step times) in simulated time, so a sweep takes well under a second on a laptop CPU and
every number is labelled SIMULATED. The same knobs on a GPU machine are `labkit.Lab(...)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from labkit.teach.result import Result

WorkItem = tuple[float, int, int]  # (arrival s, prompt tokens, output tokens)


def workload(
    num_requests: int = 60,
    rate: float = 6.0,
    prompt_len: tuple[int, int] = (1024, 6144),
    output_len: int = 128,
    seed: int = 0,
) -> list[WorkItem]:
    """Poisson arrivals at `rate` req/s, prompt lengths uniform in `prompt_len`."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, num_requests))
    lens = rng.integers(prompt_len[0], prompt_len[1] + 1, num_requests)
    return [(float(t), int(n), int(output_len)) for t, n in zip(arrivals, lens, strict=True)]


def _ms(values: list[float], q: float) -> float:
    return (
        float(np.percentile(np.asarray(values, dtype=float), q) * 1e3) if values else float("nan")
    )


def _latency_row(cluster: Any, records: list[Any]) -> dict[str, float]:
    """TTFT per request; ITL per token (every decode engine's inter-token samples)."""
    ttft = [r.ttft for r in records if r.ttft is not None]
    engines = cluster.decode_engines or cluster.prefill_engines
    itl = [x for e in engines for x in e.stats.samples["inter_token_latency_seconds"]]
    return {
        "ttft_p50_ms": _ms(ttft, 50),
        "ttft_p99_ms": _ms(ttft, 99),
        "itl_p50_ms": _ms(itl, 50),
        "itl_p99_ms": _ms(itl, 99),
        "finished": sum(r.finish is not None for r in records),
    }


def _cost_note(cluster_or_engine: Any) -> str:
    engines = getattr(cluster_or_engine, "engines", [cluster_or_engine])
    return (
        "cost model calibrated on real vLLM"
        if engines[0].cost_params.calibrated
        else "cost model: uncalibrated roofline defaults (trends, not absolute times)"
    )


def chunk_sweep(
    chunks: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192),
    model: str = "llama-3.1-8b",
    gpu: str = "h100",
    work: list[WorkItem] | None = None,
    max_num_seqs: int = 128,
) -> Result:
    """One colocated engine serving the same workload with each chunk size
    (--max-num-batched-tokens): TTFT and ITL p50/p99, and the longest step."""
    from labkit.engines.sim.cluster import SimCluster

    work = work if work is not None else workload()
    rows = []
    note = ""
    for chunk in chunks:
        cluster = SimCluster(
            model,
            gpu,
            num_prefill=1,
            num_decode=0,
            max_num_batched_tokens=chunk,
            max_num_seqs=min(max_num_seqs, chunk),
        )
        durations: list[float] = []
        records = cluster.run(work, on_step=lambda e, r, d=durations: d.append(r.duration))
        rows.append(
            {
                "chunk": chunk,
                **_latency_row(cluster, records),
                "longest_step_ms": max(durations, default=0.0) * 1e3,
                "steps": cluster.engines[0].stats.num_steps,
            }
        )
        note = _cost_note(cluster)
    return Result(
        f"chunk-size sweep: {model} on one {gpu.upper()}, {len(work)} requests",
        "sim",
        rows,
        note=note,
    )


def chunk_sweep_figure(result: Result) -> Any:
    """TTFT and ITL (p50 and p99) against the chunk size."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    x = result.column("chunk")
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("time to first token", "inter-token latency")
    )
    for col, metric in ((1, "ttft"), (2, "itl")):
        for q, dash in (("p50", "solid"), ("p99", "dot")):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=result.column(f"{metric}_{q}_ms"),
                    name=f"{metric} {q}",
                    mode="lines+markers",
                    line=dict(dash=dash),
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="chunk (max_num_batched_tokens)", type="log", row=1, col=col)
        fig.update_yaxes(title_text="ms", row=1, col=col)
    fig.update_layout(title=f"{result.label}: {result.title}", height=380)
    return fig


def pd_vs_colocated(
    model: str = "llama-3.1-8b",
    gpu: str = "h100",
    work: list[WorkItem] | None = None,
    chunk: int = 8192,
    connectors: tuple[str, ...] = ("nixl", "example"),
    link: str = "nvlink",
    max_num_seqs: int = 128,
) -> Result:
    """The same workload on two GPUs, two ways: two colocated engines (each does prefill and
    decode, requests round-robin) vs one prefill + one decode engine with a KV connector."""
    from labkit.engines.sim.cluster import SimCluster

    work = work if work is not None else workload()
    kw = dict(max_num_batched_tokens=chunk, max_num_seqs=max_num_seqs)
    rows = []
    colo = SimCluster(model, gpu, num_prefill=2, num_decode=0, **kw)
    rec = colo.run(work)
    rows.append(
        {
            "setup": "colocated x2",
            "connector": "-",
            **_latency_row(colo, rec),
            "kv_moved_GB": 0.0,
            "transfer_p50_ms": 0.0,
        }
    )
    for conn in connectors:
        pd = SimCluster(model, gpu, num_prefill=1, num_decode=1, connector=conn, link=link, **kw)
        rec = pd.run(work)
        moved = [r.transfer_end - r.transfer_start for r in rec if r.transfer_end is not None]
        rows.append(
            {
                "setup": "PD 1P+1D",
                "connector": conn,
                **_latency_row(pd, rec),
                "kv_moved_GB": sum(r.transfer_bytes for r in rec) / 1e9,
                "transfer_p50_ms": _ms(moved, 50),
            }
        )
    return Result(
        f"PD vs colocated on 2 x {gpu.upper()}: {model}, {len(work)} requests",
        "sim",
        rows,
        note=f"{_cost_note(colo)}; nixl over {link}, example through host "
        "shared memory (synchronous in the step)",
    )


def pd_figure(result: Result) -> Any:
    """TTFT and ITL p99 per setup (grouped bars)."""
    import plotly.graph_objects as go

    x = [
        f"{r['setup']} ({r['connector']})" if r["connector"] != "-" else r["setup"]
        for r in result.rows
    ]
    fig = go.Figure()
    for metric in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
        fig.add_bar(x=x, y=result.column(metric), name=metric.replace("_ms", ""))
    fig.update_layout(
        barmode="group",
        yaxis=dict(title="ms", type="log"),
        height=380,
        title=f"{result.label}: {result.title}",
    )
    return fig


def parallel_step_times(
    model: str = "llama-3.1-70b",
    gpu: str = "h100",
    layouts: tuple[tuple[int, int], ...] = ((2, 1), (4, 1), (8, 1), (2, 2), (4, 2)),
    prefill_tokens: int = 4096,
    decode_batch: int = 64,
    context_len: int = 2048,
) -> Result:
    """The simulator's step time of one prefill chunk and one decode step per (tp, pp): what
    splitting each layer (TP, all-reduces) or the layer stack (PP, one batch crosses every
    stage) does to latency."""
    from labkit.engines.sim.engine import SimEngine

    rows, eng = [], None
    for tp, pp in layouts:
        eng = SimEngine(model, gpu, tp=tp, pp=pp, num_gpu_blocks=64)
        pre = eng.cost_model.step_cost(
            prefill_tokens, 1, prefill_tokens, prefill_tokens * (prefill_tokens + 1) / 2
        )
        dec = eng.cost_model.step_cost(
            decode_batch, decode_batch, decode_batch * context_len, decode_batch * context_len
        )
        rows.append(
            {
                "tp": tp,
                "pp": pp,
                "gpus": tp * pp,
                "prefill_ms": pre.total_s * 1e3,
                "decode_step_ms": dec.total_s * 1e3,
                "kv_bytes_per_token_per_gpu": eng.cost_model.kv_bytes_per_token,
            }
        )
    return Result(
        f"step times of {model} on {gpu.upper()} by layout",
        "sim",
        rows,
        note=f"prefill: one {prefill_tokens}-token chunk; decode: {decode_batch} "
        f"requests at {context_len} tokens of context; "
        f"{_cost_note(eng) if eng is not None else ''}",
    )
