"""KV streaming prefill -> decode: a Gantt of the last requests (queue, prefill, KV transfer,
decode; each phase from the side that knows it, labkit/viz/transfers.py), what the connector
does per layer, and the achieved GB/s of each transfer on a log axis against the link's
datasheet peak (labkit.hardware.LINKS) and the path's measured peak (labkit.bench.link_peak)."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.viz.base import SUBTITLE_LINE_PX, View
from labkit.viz.state import RequestTimes, TransferState

PHASES = (  # (name, colour) in the order a PD request lives them
    ("queue", "#ced4da"),
    ("prefill", "#f08c00"),
    ("KV transfer", "#d6336c"),
    ("decode", "#1971c2"),
)
CLOCKS = (  # where each phase's ends come from (all: the host's wall clock)
    "proxy arrival → prefill's first step",
    "prefill engine: first step → request_finished",
    "",  # the transfer says its own source (RequestTimes.transfer)
    "decode's first step after the transfer → proxy finish",
)
RATE_COLOR = "#0c8599"  # not KV transfer's colour: a rate bar is not a Gantt phase
HEIGHT = 860  # px: the Gantt, the per-layer bars and the rate, one under the other
NOOP_S = 20e-6  # a per-layer hook that returns within 20 µs does no per-layer work
_HOVER = "%{customdata[0]}<br>%{customdata[1]}: %{customdata[2]:.2f} ms from %{base:.3f} s%{customdata[3]}<extra></extra>"

# Peaks measured with `python -m labkit.bench.link_peak` (torch copies of 1 GiB, median of 5,
# 2x H200, docs/benchmarks.md): the fastest a connector could move KV on that path here.
MEASURED_PEAKS: dict[str, tuple[str, float]] = {
    "nvlink": ("GPU 0 → GPU 1 peer copy, H200", 390.1),
    "same-gpu": ("GPU → pinned host copy, H200", 55.4),
}


def link_peak(link: str | None) -> tuple[str, float] | None:
    """(name, datasheet peak GB/s) of a link named by the source's describe()['link']."""
    from labkit.hardware import LINKS

    spec = LINKS.get(link) if link else None
    return (spec.name, spec.bandwidth / 1e9) if spec is not None else None


def phases(r: RequestTimes, now: float) -> list[tuple[float, float] | None]:
    """[start, end] of each PHASE for one request (None: not reached); open phases end `now`."""
    return r.spans(now)


class StreamingView(View):
    """Gantt on the left; per-layer bars and GB/s-vs-peak on the right."""

    title = "KV streaming prefill → decode"

    def __init__(self, state: TransferState, kinds: list[str], link: str | None = None,
                 measured_peak: tuple[str, float] | None = None) -> None:  # fmt: skip
        super().__init__(state, kinds)
        self.peak = link_peak(link)
        self.measured = measured_peak or MEASURED_PEAKS.get(link or "")
        # One column: the Gantt, then per layer, then the rate. Each gets the figure's whole
        # width, so a 360 px cell reads as well as a wide page.
        base = make_subplots(
            rows=3, cols=1, row_heights=[0.5, 0.22, 0.28],
            vertical_spacing=(6 * SUBTITLE_LINE_PX) / (HEIGHT - 54 - 2 * SUBTITLE_LINE_PX - 40),
            subplot_titles=["per request<br>s since the run started (host clock)",
                            "per layer, last pass (ms)", "KV transfer rate (GB/s, log)"],
        )  # fmt: skip
        fig = self.figure = go.FigureWidget(base)
        for name, color in PHASES:
            fig.add_trace(
                go.Bar(name=name, orientation="h", marker_color=color, hovertemplate=_HOVER,
                       x=[], y=[], base=[]), row=1, col=1,
            )  # fmt: skip
        # Side by side by hand: the figure's barmode is "overlay" for the Gantt.
        fig.add_trace(go.Bar(name="save per layer (prefill)", marker_color="#f08c00", x=[], y=[],
                             offset=-0.4, width=0.4), 2, 1)  # fmt: skip
        fig.add_trace(go.Bar(name="load per layer (decode)", marker_color="#1971c2", x=[], y=[],
                             offset=0.0, width=0.4), 2, 1)  # fmt: skip
        fig.add_trace(go.Bar(name="achieved GB/s", marker_color=RATE_COLOR, x=[], y=[]), 3, 1)
        label = (f"datasheet peak:<br>{self.peak[0]} {self.peak[1]:.4g} GB/s" if self.peak
                 else "datasheet peak: unknown link")  # fmt: skip
        fig.add_trace(go.Scatter(name=label, mode="lines", line=dict(color="black", dash="dash"),
                                 x=[], y=[]), row=3, col=1)  # fmt: skip
        mlabel = (f"measured path peak:<br>{self.measured[0]} {self.measured[1]:.4g} GB/s"
                  if self.measured else "measured path peak: not measured for this link")  # fmt: skip
        fig.add_trace(go.Scatter(name=mlabel, mode="lines", line=dict(color="#c92a2a", dash="dot"),
                                 x=[], y=[]), row=3, col=1)  # fmt: skip
        fig.update_layout(barmode="overlay", legend=dict(orientation="h", y=-0.06, yanchor="top"))
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=1)
        fig.update_xaxes(title_text="s since the run started", row=1, col=1)
        fig.update_yaxes(type="log", row=3, col=1)
        fig.update_xaxes(type="category", row=3, col=1)
        fig.add_annotation(text="", name="layer-note", xref="x2 domain", yref="y2 domain",
                           x=0.5, y=0.5, showarrow=False, font=dict(size=11, color="#495057"),
                           align="center")  # fmt: skip
        self._label(fig, height=HEIGHT, subtitle_lines=2)

    def draw(self) -> None:
        st: TransferState = self.state
        reqs = st.rows()
        t0 = st.t0 or 0.0
        now = max(
            (t for r in reqs for t in (r.finish, r.first_token, r.recv_end, r.prefill_end,
                                       r.prefill_start, r.arrival) if t is not None),
            default=t0,
        )  # fmt: skip
        spans = [r.spans(now) for r in reqs]
        labels = {r.req_id: st.label(r.req_id) for r in reqs}
        for i, (name, _) in enumerate(PHASES):
            rows = [(r, s[i]) for r, s in zip(reqs, spans, strict=True) if s[i] is not None]
            tr = self.figure.data[i]
            tr.y = [labels[r.req_id] for r, _ in rows]
            tr.base = [a - t0 for _, (a, _) in rows]
            tr.x = [b - a for _, (a, b) in rows]
            tr.customdata = [[labels[r.req_id], name, 1e3 * (b - a), _note(r, i)] for r, (a, b) in rows]
        order = [labels[r.req_id] for r in reqs]
        self.figure.update_yaxes(
            categoryorder="array", categoryarray=order, tickvals=order, row=1, col=1,
            ticktext=[f'<span style="color:{st.ids.color(r.req_id)}">■</span> {labels[r.req_id]}'
                      for r in reqs],
        )  # fmt: skip
        self._draw_layers(st)
        self._draw_rates(st, labels)

    def _draw_layers(self, st: TransferState) -> None:
        """Bars for the hooks that do per-layer work; a note for those that return at once."""
        notes, shown = [], {}
        for series in sorted({s for s, _ in st.layers}):
            pts = [(lay, st.layers[(series, lay)]) for lay in st.layer_order if (series, lay) in st.layers]
            worst = max((d for _, (d, _) in pts), default=0.0)
            if worst < NOOP_S:
                notes.append(f"{series}: returns at once (≤ {worst * 1e6:.0f} µs), no per-layer work")
            else:
                shown[series] = pts
        for j, series in enumerate(("save (prefill)", "load (decode)")):
            tr = self.figure.data[len(PHASES) + j]
            pts = shown.get(series, [])
            tr.x = [_layer_label(lay) for lay, _ in pts]
            tr.y = [1e3 * d for _, (d, _) in pts]
            tr.customdata = [[lay, b / 1e6, b / d / 1e9 if d > 0 else 0.0] for lay, (d, b) in pts]
            tr.hovertemplate = ("%{customdata[0]}: %{y:.2f} ms, %{customdata[1]:.1f} MB, "
                                "%{customdata[2]:.1f} GB/s<extra></extra>")  # fmt: skip
        conn = st.connector or "connector"
        if not st.layers:
            head = f"{conn}: no per-layer events yet"
        elif not shown:
            head = f"<b>{conn} has no per-layer phase here</b>"
        else:
            head = ""
        if "nixl" in conn.lower():
            notes.append("NIXL: decode pulls every layer of a request in one read<br>"
                         "after prefill finished (the KV transfer bar, above)")  # fmt: skip
        elif "example" in conn.lower() and "load (decode)" not in shown:
            notes.append("ExampleConnector: decode loads all layers before its forward<br>"
                         "(start_load_kv: the KV transfer bar, above)")  # fmt: skip
        text = "<br>".join([t for t in (head, *notes) if t])
        for a in self.figure.layout.annotations:
            if a.name == "layer-note":
                a.text = text
                a.y = 0.5 if not shown else 0.98
                a.yanchor = "middle" if not shown else "top"

    def _draw_rates(self, st: TransferState, labels: dict[str, str]) -> None:
        rates = [(labels.get(rid, st.label(rid)), g, r) for r in st.rows()
                 if (g := r.gbps) is not None for rid in (r.req_id,)]  # fmt: skip
        bars = self.figure.data[len(PHASES) + 2]
        xs = [x for x, _, _ in rates]  # (inside batch_update, reads are stale)
        bars.x, bars.y = xs, [g for _, g, _ in rates]
        bars.customdata = [[r.num_bytes / 1e6, 1e3 * r.transfer_seconds] for _, _, r in rates]
        bars.hovertemplate = ("%{x}: %{y:.3g} GB/s (%{customdata[0]:.1f} MB in "
                              "%{customdata[1]:.2f} ms)<extra></extra>")  # fmt: skip
        for k, peak in ((3, self.peak), (4, self.measured)):
            tr = self.figure.data[len(PHASES) + k]
            if peak and xs:
                tr.x, tr.y = [xs[0], xs[-1]], [peak[1], peak[1]]


def _note(r: RequestTimes, phase: int) -> str:
    """Hover text after the duration: which clock the phase comes from, and the KV moved."""
    if phase == 2:
        _, _, source = r.transfer()
        rate = f", {g:.3g} GB/s" if (g := r.gbps) else ""
        moved = f"<br>{r.num_tokens} tokens, {r.num_bytes / 1e6:.1f} MB{rate}" if r.num_bytes else ""
        return f"<br>measured by {source}{moved}"
    note = f"<br>{CLOCKS[phase]}"
    if phase == 1 and r.save_start is not None and r.save_end is not None and r.save_end - r.save_start > NOOP_S:
        note += f"<br>KV saved per layer inside it: {1e3 * (r.save_end - r.save_start):.1f} ms"
    return note


def _layer_label(layer: str) -> str:
    """'model.layers.12.self_attn.attn' -> 'L12' (the full name stays in hover)."""
    parts = [p for p in layer.split(".") if p.isdigit()]
    return f"L{parts[0]}" if parts else layer
