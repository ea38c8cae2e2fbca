"""Per-step scheduled tokens: one stacked bar per scheduler step, a segment per request's
prefill chunk (in the request's colour) plus the step's decode tokens, under the token-budget
line (max_num_batched_tokens). With chunked prefill a long prompt shows as a run of chunks
that fill the budget beside the decodes; without it, one tall prefill bar stalls the decodes.
"""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.viz.base import View
from labkit.viz.state import ScheduleState, StepRecord
from labkit.viz.style import kind_label, request_color, short_req

DECODE_COLOR = "#adb5bd"


def step_segments(steps: list[StepRecord]) -> dict[str, list]:
    """The bars of a run of steps, as flat arrays (one element per segment).

    Prefill segments are stacked from 0 in the order the scheduler listed them; the decode
    segment of a step (all its decoding requests together) sits on top.
    """
    px, pbase, py, pcolor, ptext = [], [], [], [], []
    dx, dbase, dy, dtext = [], [], [], []
    bx, by = [], []
    for s in steps:
        acc = 0
        for req, n in s.prefill:
            px.append(s.step)
            pbase.append(acc)
            py.append(n)
            pcolor.append(request_color(req))
            ptext.append(f"{short_req(req, 18)}: prefill chunk {n} tokens")
            acc += n
        if s.decode:
            n_dec = sum(n for _, n in s.decode)
            dx.append(s.step)
            dbase.append(acc)
            dy.append(n_dec)
            dtext.append(f"decode: {len(s.decode)} requests, {n_dec} tokens")
        bx.append(s.step)
        by.append(s.token_budget)
    return dict(px=px, pbase=pbase, py=py, pcolor=pcolor, ptext=ptext,
                dx=dx, dbase=dbase, dy=dy, dtext=dtext, bx=bx, by=by)  # fmt: skip


class ScheduleView(View):
    """One row per engine: prefill-chunk bars, decode bar, budget line."""

    title = "Scheduled tokens per step (chunked prefill)"

    def __init__(self, state: ScheduleState, engines: list[tuple[str, str, str]]) -> None:
        """engines: [(name, role, kind)]."""
        super().__init__(state, [k for _, _, k in engines])
        self.names = [n for n, _, _ in engines]
        n = max(len(self.names), 1)
        self.titles = [f"<b>{e}</b> ({r}, {kind_label(k)})" for e, r, k in engines] or [" "]
        base = make_subplots(rows=n, cols=1, vertical_spacing=0.15 / n, subplot_titles=self.titles)
        fig = self.figure = go.FigureWidget(base)
        for i, _ in enumerate(self.names):
            first = i == 0
            fig.add_trace(go.Bar(name="prefill chunk", x=[], y=[], base=[], legendgroup="p",
                                 showlegend=first, hovertemplate="step %{x}<br>%{text}<extra></extra>"),
                          row=i + 1, col=1)  # fmt: skip
            fig.add_trace(go.Bar(name="decode", x=[], y=[], base=[], legendgroup="d",
                                 marker_color=DECODE_COLOR, showlegend=first,
                                 hovertemplate="step %{x}<br>%{text}<extra></extra>"),
                          row=i + 1, col=1)  # fmt: skip
            fig.add_trace(go.Scatter(name="token budget", x=[], y=[], mode="lines",
                                     line=dict(color="#c92a2a", dash="dash", shape="hvh"),
                                     legendgroup="b", showlegend=first),
                          row=i + 1, col=1)  # fmt: skip
            fig.update_yaxes(title_text="tokens", row=i + 1, col=1)
        fig.update_xaxes(title_text="scheduler step", row=n, col=1)
        fig.update_layout(barmode="overlay", bargap=0.1)
        self._label(fig, height=240 * n + 120)

    def draw(self) -> None:
        st: ScheduleState = self.state
        self.set_kinds(k for _, k in st.kinds.values())
        for i, name in enumerate(self.names):
            seg = step_segments(list(st.steps.get(name, ())))
            pre, dec, bud = self.figure.data[3 * i : 3 * i + 3]
            pre.update(x=seg["px"], y=seg["py"], base=seg["pbase"], text=seg["ptext"],
                       marker_color=seg["pcolor"], textposition="none")  # fmt: skip
            dec.update(x=seg["dx"], y=seg["dy"], base=seg["dbase"], text=seg["dtext"],
                       textposition="none")  # fmt: skip
            # A decode engine uses a sliver of its budget: drawing the line would flatten the
            # bars, so the title says it instead.
            peak = max([*(b + y for b, y in zip(seg["pbase"], seg["py"], strict=True)),
                        *(b + y for b, y in zip(seg["dbase"], seg["dy"], strict=True)), 0])
            budget = max(seg["by"], default=0)
            off_scale = 0 < peak < budget / 4
            bud.update(x=seg["bx"], y=[] if off_scale else seg["by"])
            note = f" · token budget {budget} (off scale: peak {peak})" if off_scale else ""
            self.figure.layout.annotations[i].text = self.titles[i] + note
