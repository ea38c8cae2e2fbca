"""KV streaming prefill -> decode: a Gantt of the last requests (queue, prefill, KV transfer,
decode), the per-layer save/load times of the latest pass, and the achieved GB/s of each
transfer against the link's peak (labkit.hardware.LINKS)."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.viz.base import View
from labkit.viz.state import RequestTimes, TransferState
from labkit.viz.style import short_req

PHASES = (  # (name, colour) in the order a PD request lives them
    ("queue", "#ced4da"),
    ("prefill", "#f08c00"),
    ("KV transfer", "#d6336c"),
    ("decode", "#1971c2"),
)
RATE_COLOR = "#0c8599"  # not KV transfer's colour: a rate bar is not a Gantt phase
_HOVER = "%{y}<br>%{customdata[0]}: %{x:.1f} ms from %{base:.1f} ms%{customdata[1]}<extra></extra>"


def link_peak(link: str | None) -> tuple[str, float] | None:
    """(name, peak GB/s) of a link named by the source's describe()['link'], if known."""
    from labkit.hardware import LINKS

    spec = LINKS.get(link) if link else None
    return (spec.name, spec.bandwidth / 1e9) if spec is not None else None


def phases(r: RequestTimes, now: float) -> list[tuple[float, float] | None]:
    """[start, end] of each PHASE for one request (None: not reached); open phases end `now`."""
    def span(a: float | None, b: float | None) -> tuple[float, float] | None:
        return None if a is None else (a, b if b is not None else max(now, a))

    queue = span(r.arrival, r.prefill_start)
    prefill = span(r.prefill_start, r.prefill_end)
    transfer = span(r.transfer_start, r.transfer_end)
    decode_start = next(
        (t for t in (r.transfer_end, r.prefill_end) if t is not None), r.first_token
    )
    decode = span(decode_start, r.finish) if decode_start is not None else None
    return [queue, prefill, transfer, decode]


class StreamingView(View):
    """Gantt on the left; per-layer bars and GB/s-vs-peak on the right."""

    title = "KV streaming prefill → decode"

    def __init__(self, state: TransferState, kinds: list[str], link: str | None = None) -> None:
        super().__init__(state, kinds)
        self.peak = link_peak(link)
        base = make_subplots(
            rows=2, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.1,
            specs=[[{"rowspan": 2}, {}], [None, {}]],
            subplot_titles=["per request (ms since start)", "per layer, last pass (ms)",
                            "KV transfer rate (GB/s)"],
        )  # fmt: skip
        fig = self.figure = go.FigureWidget(base)
        for name, color in PHASES:
            fig.add_trace(
                go.Bar(name=name, orientation="h", marker_color=color, hovertemplate=_HOVER,
                       x=[], y=[], base=[]), row=1, col=1,
            )  # fmt: skip
        # Side by side by hand: the figure's barmode is "overlay" for the Gantt.
        fig.add_trace(go.Bar(name="save (prefill)", marker_color="#f08c00", x=[], y=[],
                             offset=-0.4, width=0.4), 1, 2)  # fmt: skip
        fig.add_trace(go.Bar(name="load (decode)", marker_color="#1971c2", x=[], y=[],
                             offset=0.0, width=0.4), 1, 2)  # fmt: skip
        fig.add_trace(go.Bar(name="achieved GB/s", marker_color=RATE_COLOR, x=[], y=[]), 2, 2)
        label = f"peak: {self.peak[0]} {self.peak[1]:.3g} GB/s" if self.peak else "peak: unknown link"
        fig.add_trace(
            go.Scatter(name=label, mode="lines+markers", line=dict(color="black", dash="dash"),
                       x=[], y=[]), row=2, col=2,
        )  # fmt: skip
        fig.update_layout(barmode="overlay")
        fig.update_yaxes(autorange="reversed", row=1, col=1)
        fig.update_xaxes(title_text="ms", row=1, col=1)
        self._label(fig, height=520)

    def draw(self) -> None:
        st: TransferState = self.state
        reqs = list(st.requests.values())
        t0 = st.t0 or 0.0
        now = max(
            (t for r in reqs for t in (r.finish, r.first_token, r.transfer_end, r.prefill_end,
                                       r.prefill_start, r.arrival) if t is not None),
            default=t0,
        )  # fmt: skip
        spans = [phases(r, now) for r in reqs]
        for i, (name, _) in enumerate(PHASES):
            rows = [(r, s[i]) for r, s in zip(reqs, spans, strict=True) if s[i] is not None]
            tr = self.figure.data[i]
            tr.y = [short_req(r.req_id, 14) for r, _ in rows]
            tr.base = [1e3 * (a - t0) for _, (a, _) in rows]
            tr.x = [1e3 * (b - a) for _, (a, b) in rows]
            tr.customdata = [[name, _transfer_note(r) if i == 2 else ""] for r, _ in rows]
        layers = st.layer_order
        for j, op in enumerate(("save", "load")):
            tr = self.figure.data[len(PHASES) + j]
            pts = [(lay, st.layers[(op, lay)]) for lay in layers if (op, lay) in st.layers]
            tr.x = [_layer_label(lay) for lay, _ in pts]
            tr.y = [1e3 * d for _, (d, _) in pts]
            tr.customdata = [[b / 1e6, b / d / 1e9 if d > 0 else 0.0] for _, (d, b) in pts]
            tr.hovertemplate = "%{x}: %{y:.2f} ms, %{customdata[0]:.1f} MB, %{customdata[1]:.1f} GB/s<extra></extra>"
        rates = st.recent_gbps()
        bars = self.figure.data[len(PHASES) + 2]
        labels = [short_req(r, 14) for r, _ in rates]  # (inside batch_update, reads are stale)
        bars.x, bars.y = labels, [g for _, g in rates]
        peak = self.figure.data[len(PHASES) + 3]
        if self.peak and rates:
            peak.x = [labels[0], labels[-1]]
            peak.y = [self.peak[1], self.peak[1]]
        if rates:
            best = float(np.max([g for _, g in rates]))
            top = max(best, self.peak[1] if self.peak else 0.0) * 1.1
            self.figure.update_yaxes(range=[0, top], row=2, col=2)


def _transfer_note(r: RequestTimes) -> str:
    if not r.num_bytes:
        return ""
    g = r.gbps
    rate = f", {g:.2f} GB/s" if g else ""
    return f"<br>{r.num_tokens} tokens, {r.num_bytes / 1e6:.1f} MB{rate} ({r.connector})"


def _layer_label(layer: str) -> str:
    """'model.layers.12.self_attn.attn' -> 'L12' (the full name stays in hover via x)."""
    parts = [p for p in layer.split(".") if p.isdigit()]
    return f"L{parts[0]}" if parts else layer
