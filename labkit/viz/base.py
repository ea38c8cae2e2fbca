"""What every view shares: a FigureWidget, a state it reads, and a redraw only when the state
moved (`version`), so a dashboard refresh costs nothing for views with nothing new."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import plotly.graph_objects as go

from labkit.viz.style import titled

SUBTITLE_LINE_PX = 16  # one line of a 12 px subplot title
# plotly.js anchors a two-line title's block as if it were its first line: the pad makes room
# for the second (the kind) so that the first is not cut at the top.
TITLE_PAD_PX = 22


class View:
    """Base of the live views: subclasses build `self.figure` once and fill `draw()`."""

    title = "view"

    def __init__(self, state: Any, kinds: Iterable[str]) -> None:
        self.state = state
        self.replay = False  # a replayed recording: every label says REPLAY too
        self.kinds = sorted(set(kinds)) or ["sim"]
        self._drawn_version = -1
        self.figure = go.FigureWidget()

    def _label(self, fig: go.FigureWidget, height: int, subtitle_lines: int = 1) -> None:
        """Title on top, its kind (SIMULATED / REAL vLLM / REPLAY) on a line of its own under
        it, then the first row's subplot titles (`subtitle_lines` lines), then the plot:

            KV-cache block allocation          <- title, 15 px, top left of the figure
            ■ REPLAY + REAL vLLM               <- the kind, in its colour
            prefill (prefill, REAL vLLM)       <- subplot titles, 12 px, left on their plot
            +------------------------------+

        Nothing is placed from the right edge, so a narrow cell cannot push one text onto
        another; the width is the figure's box (autosize, no width anywhere)."""
        fig.update_layout(
            title=dict(text=titled(self.title, self.labels()), x=0, xref="container",
                       xanchor="left", y=1, yref="container", yanchor="top",
                       pad=dict(l=8, t=TITLE_PAD_PX), font=dict(size=15)),
            height=height,
            autosize=True,  # width follows the figure's box (no fixed width anywhere)
            margin=dict(l=50, r=20, t=54 + SUBTITLE_LINE_PX * subtitle_lines, b=40),
            template="plotly_white",
            legend=dict(orientation="h", y=-0.12),
        )
        left_align_subplot_titles(fig)

    def labels(self) -> list[str]:
        """The kinds a label names: the data's own, plus "replay" for a recording."""
        return sorted({*self.kinds, *(["replay"] if self.replay else [])})

    def mark_replay(self) -> None:
        """Label this view as showing a replayed recording (its data keeps its own kind)."""
        self.replay = True
        kinds, self.kinds = self.kinds, []
        self.set_kinds(kinds)

    def set_kinds(self, kinds: Iterable[str]) -> None:
        """The source's kind can be learned late (first batch); keep the label true."""
        kinds = sorted(set(kinds))
        if kinds and kinds != self.kinds:
            self.kinds = kinds
            self.figure.layout.title.text = titled(self.title, self.labels())

    def update(self) -> bool:
        """Redraw if the state changed since the last draw; True if it did."""
        version = self.state_version()
        if version == self._drawn_version:
            return False
        with self.figure.batch_update():
            self.draw()
        self._drawn_version = version
        return True

    def state_version(self) -> int:
        return int(getattr(self.state, "version", 0))

    def draw(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def left_align_subplot_titles(fig: go.Figure) -> None:
    """make_subplots centres each subplot title over its plot, so a title wider than a narrow
    plot runs off both sides; start each at its plot's left edge instead, in 12 px."""
    lefts = {}
    for key in fig.layout:
        if key.startswith("xaxis") and fig.layout[key].domain:
            x0, x1 = fig.layout[key].domain
            lefts[round((x0 + x1) / 2, 6)] = x0
    for a in fig.layout.annotations:
        if a.name is None and a.xref == "paper" and a.yanchor == "bottom" and a.x is not None:
            x0 = lefts.get(round(a.x, 6))
            if x0 is not None:
                a.update(x=x0, xanchor="left", align="left", font=dict(size=12))
