"""The routing panel (xPyD): which engine the proxy's router sent each request to, and what
it bought in prefix-cache hits, per engine over time.

    top:    requests routed to each engine so far (the proxy's `prefill_start` /
            `kv_transfer_start` events: `engine_name`, `routing` = the router's Decision)
    bottom: prefix-cache hit tokens so far on each prefill engine (its own /metrics:
            vllm:prefix_cache_hits_total), the number the routing policy is meant to raise

Switching the policy (`lab.set_routing_policy("kv-aware")`) shows as a dotted vertical line
named after the new policy; the latest decision's reason stands under the title.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.viz.base import View
from labkit.viz.style import REQUEST_COLORS

HITS_METRIC, QUERIES_METRIC = "vllm:prefix_cache_hits", "vllm:prefix_cache_queries"


@dataclass
class RoutingState:
    """Folds the timeline's routing decisions and the prefill engines' prefix-cache counters.

    Times are the host's wall clock (`time.time()`); `t0` is the first one seen.
    """

    engines: list[tuple[str, str]] = field(default_factory=list)  # (name, role)
    t0: float | None = None
    routed: dict[str, list[float]] = field(default_factory=dict)  # engine -> decision times
    hits: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)  # (ts, hit, q)
    switches: list[tuple[float, str]] = field(default_factory=list)  # (ts, new policy)
    last_reason: dict[str, str] = field(default_factory=dict)  # phase -> reason
    version: int = 0

    def __post_init__(self) -> None:
        for name, _ in self.engines:
            self.routed.setdefault(name, [])

    def _at(self, ts: float) -> None:
        if self.t0 is None or ts < self.t0:
            self.t0 = ts

    def apply_timeline(self, ev: dict[str, Any]) -> None:
        """One proxy timeline event; only routing decisions count."""
        if ev.get("event") not in ("prefill_start", "kv_transfer_start"):
            return
        name, decision, ts = ev.get("engine_name"), ev.get("routing"), ev.get("ts")
        if not name or not isinstance(ts, (int, float)):
            return
        self._at(ts)
        self.routed.setdefault(name, []).append(ts)
        if isinstance(decision, dict):
            policy = decision.get("policy")
            if policy and (not self.switches or self.switches[-1][1] != policy):
                self.switches.append((ts, str(policy)))
            self.last_reason[str(decision.get("phase", ""))] = str(decision.get("reason", ""))
        self.version += 1

    def apply_metrics(self, sample: Any) -> None:
        """One /metrics scrape (labkit.telemetry.source.MetricsSample) of a prefill engine."""
        if getattr(sample, "role", "prefill") != "prefill":
            return
        snap = sample.snapshot
        hit, q = snap.sum(HITS_METRIC), snap.sum(QUERIES_METRIC)
        series = self.hits.setdefault(sample.engine, [])
        if series and series[-1][1:] == (hit, q):
            return  # nothing new: keep the traces short
        self._at(sample.ts)
        series.append((sample.ts, hit, q))
        self.version += 1

    def hit_rate(self) -> float:
        """All prefill engines' hit tokens over looked-up tokens, as of their last scrape."""
        hit = sum(s[-1][1] for s in self.hits.values() if s)
        q = sum(s[-1][2] for s in self.hits.values() if s)
        return hit / q if q else 0.0


class RoutingView(View):
    """Requests routed per engine and prefix-hit tokens per prefill engine, over time."""

    title = "Routing: requests and prefix-cache hits per engine"

    def __init__(self, state: RoutingState, kinds: Iterable[str] = ("sim",)) -> None:
        super().__init__(state, kinds)
        names = [n for n, _ in state.engines]
        self.prefill = [n for n, r in state.engines if r == "prefill"]
        self.names = names
        base = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.14,
                             subplot_titles=["requests routed (so far)",
                                             "prefix-cache hit tokens on prefill (so far)"])
        fig = self.figure = go.FigureWidget(base)
        for j, name in enumerate(names):
            fig.add_trace(go.Scatter(name=name, x=[], y=[], mode="lines", legendgroup=name,
                                     line=dict(shape="hv", color=_color(j))), row=1, col=1)
        for name in self.prefill:
            j = names.index(name)
            fig.add_trace(go.Scatter(name=f"{name} hits", x=[], y=[], mode="lines",
                                     legendgroup=name, showlegend=False,
                                     line=dict(shape="hv", color=_color(j))), row=2, col=1)
        fig.update_xaxes(title_text="s since the first request", row=2, col=1)
        fig.update_yaxes(title_text="requests", row=1, col=1, rangemode="tozero")
        fig.update_yaxes(title_text="tokens", row=2, col=1, rangemode="tozero")
        self._label(fig, height=460)

    def draw(self) -> None:
        st: RoutingState = self.state
        t0 = st.t0 or 0.0
        fig = self.figure
        for j, name in enumerate(self.names):
            times = st.routed.get(name, [])
            fig.data[j].x = [t - t0 for t in times]
            fig.data[j].y = list(range(1, len(times) + 1))
        base = len(self.names)
        for k, name in enumerate(self.prefill):
            series = st.hits.get(name, [])
            first = series[0][1] if series else 0.0
            tr = fig.data[base + k]
            tr.x = [ts - t0 for ts, _, _ in series]
            tr.y = [h - first for _, h, _ in series]
            last = series[-1] if series else (0.0, 0.0, 0.0)
            tr.name = f"{name} hits"
            tr.hovertemplate = (f"%{{y:,.0f}} hit tokens<extra>{name}: "
                                f"{last[1]:,.0f} of {last[2]:,.0f} looked up</extra>")
        fig.layout.shapes = [dict(type="line", xref="x", yref="paper", x0=ts - t0, x1=ts - t0,
                                  y0=0, y1=1, line=dict(dash="dot", color="#868e96"))
                             for ts, _ in st.switches]
        notes = [a for a in fig.layout.annotations if a.name != "policy"]
        notes += [go.layout.Annotation(x=ts - t0, xref="x", y=1.0, yref="paper", text=policy,
                                       showarrow=False, yanchor="bottom", name="policy",
                                       font=dict(size=10, color="#495057"))
                  for ts, policy in st.switches]
        fig.layout.annotations = notes

    def summary(self) -> str:
        """One line per engine: requests routed, prefix hits (for notebooks and tests)."""
        st: RoutingState = self.state
        lines = []
        for name in self.names:
            line = f"{name}: {len(st.routed.get(name, []))} requests"
            s = st.hits.get(name)
            if s:
                line += f", prefix-cache hits {s[-1][1]:,.0f} of {s[-1][2]:,.0f} tokens"
            lines.append(line)
        return "\n".join(lines)


def _color(j: int) -> str:
    return REQUEST_COLORS[j % len(REQUEST_COLORS)]


def routing_panel(source: Any) -> RoutingView:
    """A RoutingView for a TelemetrySource (a lab's `telemetry()`, a replay): its engines
    from `describe()`; call `follow(panel, source)` to fold what is new and redraw."""
    info = source.describe()
    engines = [(e["name"], e["role"]) for e in info.get("engines", [])]
    kinds = [info.get("kind", "sim"), *(e.get("kind", "sim") for e in info.get("engines", []))]
    return RoutingView(RoutingState(engines), kinds)


def follow(panel: RoutingView, source: Any) -> RoutingView:
    """Fold one `poll()` of `source` into the panel's state and redraw (what a dashboard
    refresh does for its views)."""
    delta = source.poll()
    for ev in delta.timeline:
        panel.state.apply_timeline(ev)
    for m in delta.metrics:
        panel.state.apply_metrics(m)
    panel.update()
    return panel
