"""What every view shares: a FigureWidget, a state it reads, and a redraw only when the state
moved (`version`), so a dashboard refresh costs nothing for views with nothing new."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import plotly.graph_objects as go

from labkit.viz.style import badge, titled


class View:
    """Base of the live views: subclasses build `self.figure` once and fill `draw()`."""

    title = "view"

    def __init__(self, state: Any, kinds: Iterable[str]) -> None:
        self.state = state
        self.replay = False  # a replayed recording: every label says REPLAY too
        self.kinds = sorted(set(kinds)) or ["sim"]
        self._drawn_version = -1
        self.figure = go.FigureWidget()

    def _label(self, fig: go.FigureWidget, height: int) -> None:
        """Title with the kind suffix + the kind badge: a SIMULATED figure says so."""
        fig.update_layout(
            title=dict(text=titled(self.title, self.labels()), x=0.01, xanchor="left"),
            height=height,
            autosize=True,  # width follows the figure's box (no fixed width anywhere)
            margin=dict(l=50, r=20, t=70, b=40),
            template="plotly_white",
            legend=dict(orientation="h", y=-0.12),
        )
        fig.add_annotation(**badge(self.labels()))

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
            with self.figure.batch_update():
                self.figure.layout.title.text = titled(self.title, self.labels())
                for a in self.figure.layout.annotations:
                    if a.name == "kind-badge":
                        a.update(badge(self.labels()))

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
