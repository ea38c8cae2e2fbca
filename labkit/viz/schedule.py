"""Per-step scheduled tokens: one stacked bar per scheduler step, a segment per request's
prefill chunk (in the request's colour) plus the step's decode tokens, under the token-budget
line (max_num_batched_tokens). With chunked prefill a long prompt shows as a run of chunks
that fill the budget beside the decodes; without it, one tall prefill bar stalls the decodes.
Both engines share one time axis (s since the first step seen), so a prefill's chunks line up
with the decode steps that ran beside them; hover names the step number.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.viz.base import SUBTITLE_LINE_PX, View
from labkit.viz.requests import RequestIds
from labkit.viz.state import ScheduleState, StepRecord
from labkit.viz.style import kind_label

DECODE_COLOR = "#adb5bd"


def step_segments(steps: list[StepRecord], ids: RequestIds | None = None, t0: float = 0.0) -> dict[str, list]:
    """The bars of a run of steps, as flat arrays (one element per segment); x in seconds
    since `t0`, the step number in the hover text.

    Prefill segments are stacked from 0 in the order the scheduler listed them; the decode
    segment of a step (all its decoding requests together) sits on top.
    """
    ids = ids if ids is not None else RequestIds()
    px, pbase, py, pcolor, ptext = [], [], [], [], []
    dx, dbase, dy, dtext = [], [], [], []
    bx, by = [], []
    for s in steps:
        acc = 0
        t = s.ts - t0
        for req, n in s.prefill:
            px.append(t)
            pbase.append(acc)
            py.append(n)
            pcolor.append(ids.color(req))
            ptext.append(f"step {s.step}<br>request {ids.label(req)}: prefill chunk {n} tokens")
            acc += n
        if s.decode:
            n_dec = sum(n for _, n in s.decode)
            dx.append(t)
            dbase.append(acc)
            dy.append(n_dec)
            dtext.append(f"step {s.step}<br>decode: {len(s.decode)} requests, {n_dec} tokens")
        bx.append(t)
        by.append(s.token_budget)
    return dict(px=px, pbase=pbase, py=py, pcolor=pcolor, ptext=ptext,
                dx=dx, dbase=dbase, dy=dy, dtext=dtext, bx=bx, by=by)  # fmt: skip


class ScheduleView(View):
    """One row per engine: prefill-chunk bars, decode bar, budget line."""

    title = "Scheduled tokens per step"

    def __init__(self, state: ScheduleState, engines: list[tuple[str, str, str]],
                 ids: RequestIds | Callable[[], RequestIds] | None = None) -> None:  # fmt: skip
        """engines: [(name, role, kind)]; ids: the request names and colours the views share."""
        super().__init__(state, [k for _, _, k in engines])
        self._ids = ids if ids is not None else RequestIds()
        self.names = [n for n, _, _ in engines]
        n = max(len(self.names), 1)
        self.titles = [f"<b>{e}</b> ({r}, {kind_label(k)})" for e, r, k in engines] or [" "]
        gap = (2 * SUBTITLE_LINE_PX + 14) / (240 * n + 120 - 86 - 40)  # a title and its note
        base = make_subplots(rows=n, cols=1, vertical_spacing=min(0.4, gap), subplot_titles=self.titles,
                             shared_xaxes=True)  # one time range for every engine
        fig = self.figure = go.FigureWidget(base)
        for i, _ in enumerate(self.names):
            first = i == 0
            fig.add_trace(go.Bar(name="prefill chunk", x=[], y=[], base=[], legendgroup="p",
                                 showlegend=first, hovertemplate="%{text}<extra></extra>"),
                          row=i + 1, col=1)  # fmt: skip
            fig.add_trace(go.Bar(name="decode", x=[], y=[], base=[], legendgroup="d",
                                 marker_color=DECODE_COLOR, showlegend=first,
                                 hovertemplate="%{text}<extra></extra>"),
                          row=i + 1, col=1)  # fmt: skip
            fig.add_trace(go.Scatter(name="token budget", x=[], y=[], mode="lines",
                                     line=dict(color="#c92a2a", dash="dash", shape="hvh"),
                                     legendgroup="b", showlegend=first),
                          row=i + 1, col=1)  # fmt: skip
            fig.update_yaxes(title_text="tokens", row=i + 1, col=1)
        fig.update_xaxes(title_text="s since the first step (a bar per step)", row=n, col=1)
        fig.update_layout(barmode="overlay", bargap=0.1)
        self._label(fig, height=240 * n + 120, subtitle_lines=2)

    @property
    def ids(self) -> RequestIds:
        """The request names and colours shared with the other views (a dashboard passes a
        getter: its reducers, and so its RequestIds, are new after a replay seeks back)."""
        return self._ids() if callable(self._ids) else self._ids

    def draw(self) -> None:
        st: ScheduleState = self.state
        self.set_kinds(k for _, k in st.kinds.values())
        rings = {name: list(st.steps.get(name, ())) for name in self.names}
        t0 = min((r[0].ts for r in rings.values() if r), default=0.0)
        for i, name in enumerate(self.names):
            ring = rings[name]
            seg = step_segments(ring, self.ids, t0)
            gaps = np.diff([s.ts for s in ring]) if len(ring) > 1 else np.array([0.01])
            width = 0.8 * float(np.median(gaps[gaps > 0])) if (gaps > 0).any() else 0.01
            pre, dec, bud = self.figure.data[3 * i : 3 * i + 3]
            pre.update(x=seg["px"], y=seg["py"], base=seg["pbase"], text=seg["ptext"], width=width,
                       marker_color=seg["pcolor"], textposition="none")  # fmt: skip
            dec.update(x=seg["dx"], y=seg["dy"], base=seg["dbase"], text=seg["dtext"], width=width,
                       textposition="none")  # fmt: skip
            # A decode engine uses a sliver of its budget: drawing the line would flatten the
            # bars, so the title says it instead.
            peak = max([*(b + y for b, y in zip(seg["pbase"], seg["py"], strict=True)),
                        *(b + y for b, y in zip(seg["dbase"], seg["dy"], strict=True)), 0])
            budget = max(seg["by"], default=0)
            off_scale = 0 < peak < budget / 4
            bud.update(x=seg["bx"], y=[] if off_scale else seg["by"])
            note = f"<br>token budget {budget} (off scale: peak {peak})" if off_scale else ""
            self.figure.layout.annotations[i].text = self.titles[i] + note
