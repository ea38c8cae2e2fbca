"""TTFT and ITL as CDFs: the proxy's exact samples (what a client sees, end to end) and each
engine's own histogram from /metrics (vllm:time_to_first_token_seconds,
vllm:inter_token_latency_seconds). In PD, the decode engine's TTFT excludes prefill and
transfer; the proxy's includes them: the gap is what disaggregation costs a first token."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.viz.base import View
from labkit.viz.state import ITL_METRIC, TTFT_METRIC, LatencyState
from labkit.viz.style import REQUEST_COLORS, kind_label

MAX_POINTS = 400  # CDF points per trace, whatever the number of samples


def sample_cdf(samples: Iterable[float], max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(x ms, y fraction) of the empirical CDF, at most max_points points."""
    a = np.sort(np.fromiter(samples, float)) * 1e3
    if a.size == 0:
        return a, a
    idx = np.unique(np.linspace(0, a.size - 1, min(a.size, max_points)).round().astype(int))
    return a[idx], (idx + 1) / a.size


def bucket_cdf(buckets: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(x ms, y fraction) from cumulative Prometheus buckets [(le seconds, count)].

    Only finite bounds, and none past the first that holds every sample: vLLM's buckets run
    to 2560 s and end with +Inf, which would stretch a log axis to 1e6 ms for nothing."""
    if not buckets or buckets[-1][1] <= 0:
        return np.zeros(0), np.zeros(0)
    le = np.array([b for b, _ in buckets], dtype=float) * 1e3
    c = np.array([n for _, n in buckets], dtype=float)
    y = c / c[-1]
    keep = np.isfinite(le)
    full = np.flatnonzero(keep & (c >= c[-1]))
    if full.size:
        keep &= np.arange(le.size) <= full[0]
    return le[keep], y[keep]


def percentile_note(samples: Iterable[float]) -> str:
    a = np.fromiter(samples, float)
    if a.size == 0:
        return "no samples"
    p50, p99 = np.percentile(a, [50, 99]) * 1e3
    return f"n={a.size}, p50 {p50:.0f} ms, p99 {p99:.0f} ms"


class LatencyView(View):
    """TTFT CDF and ITL CDF side by side: one line for the proxy, one per engine."""

    title = "Latency: TTFT and ITL"

    def __init__(self, state: LatencyState, engines: list[tuple[str, str, str]], kind: str) -> None:
        """engines: [(name, role, kind)]; kind: the proxy's (the source's) kind."""
        super().__init__(state, [kind, *(k for _, _, k in engines)])
        self.engines = [n for n, _, _ in engines]
        base = make_subplots(rows=1, cols=2, subplot_titles=["TTFT (ms)", "ITL (ms)"])
        fig = self.figure = go.FigureWidget(base)
        self.series = [("proxy", f"proxy ({kind_label(kind)}, end to end)")] + [
            (n, f"{n} ({r}, {kind_label(k)}, /metrics)") for n, r, k in engines
        ]
        for col in (1, 2):
            for j, (_, label) in enumerate(self.series):
                fig.add_trace(
                    go.Scatter(name=label, x=[], y=[], mode="lines", legendgroup=label,
                               showlegend=col == 1,
                               line=dict(color="black" if j == 0 else REQUEST_COLORS[j % len(REQUEST_COLORS)],
                                         shape="linear" if j == 0 else "hv",
                                         dash="solid" if j == 0 else "dot")),
                    row=1, col=col,
                )  # fmt: skip
            fig.update_xaxes(type="log", row=1, col=col)
            fig.update_yaxes(range=[0, 1.02], title_text="fraction" if col == 1 else None, row=1, col=col)
        self._label(fig, height=380)

    def draw(self) -> None:
        st: LatencyState = self.state
        n = len(self.series)
        for col, (samples, metric) in enumerate(((st.ttft, TTFT_METRIC), (st.itl, ITL_METRIC))):
            x, y = sample_cdf(samples)
            proxy = self.figure.data[col * n]
            proxy.x, proxy.y = x, y
            proxy.hovertemplate = f"%{{x:.1f}} ms: %{{y:.2f}}<extra>proxy: {percentile_note(samples)}</extra>"
            for j, name in enumerate(self.engines, start=1):
                x, y = bucket_cdf(st.hist.get(name, {}).get(metric, []))
                tr = self.figure.data[col * n + j]
                tr.x, tr.y = x, y
