"""KV-cache block allocation map: each engine's physical blocks as a grid heatmap.

Up to MAX_CELLS blocks, one cell is one block, coloured by state and, when in use, by the
request that holds it (same colour as in the other views). Above that, cells become
super-cells of `k` consecutive blocks coloured by the fraction in use, so a 100k-block cache
costs one bincount and a 4k-cell heatmap per redraw.

    block id = (row * cols + col) * k          (row 0 at the top)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.viz.base import View
from labkit.viz.blockstate import BlockMapState, EngineBlocks
from labkit.viz.style import (
    REQUEST_COLORS,
    STATE_COLORS,
    kind_label,
    request_color_index,
)
from labkit.vocab import BLOCK_STATE_NAMES

MAX_CELLS = 4096

# Fine grid z codes: states first, then one code per request colour.
Z_FREE, Z_CACHED, Z_SHARED, Z_USED = 0, 1, 2, 3
Z_REQ0 = 4
_FINE_COLORS = [STATE_COLORS[0], STATE_COLORS[1], STATE_COLORS[3], STATE_COLORS[2], *REQUEST_COLORS]
_COARSE_SCALE = [[0.0, STATE_COLORS[0]], [0.5, "#8ce99a"], [1.0, "#1b5e20"]]
_HOVER = "%{text}<extra></extra>"


def _discrete_scale(colors: list[str]) -> list[list]:
    """Colour i for integer z == i (with zmin=-0.5, zmax=len-0.5)."""
    n = len(colors)
    scale = []
    for i, c in enumerate(colors):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


@dataclass
class BlockGrid:
    """What the heatmap shows for one engine (a pure function of EngineBlocks).

    Column form (1-D z with x = column, y = row): 1-D numeric numpy arrays travel to the
    browser as binary buffers, where 2-D ones would be walked element by element.
    """

    z: np.ndarray  # (cells,) state/request code (fine) or fraction in use (super-cells)
    x: np.ndarray  # (cells,) int32 column
    y: np.ndarray  # (cells,) int32 row
    text: list[str]  # (cells,) hover text
    blocks_per_cell: int
    rows: int
    cols: int
    counts: np.ndarray  # [free, cached, in use, shared]

    @property
    def num_cells(self) -> int:
        return len(self.z)


def grid_shape(num_cells: int) -> tuple[int, int]:
    """(rows, cols) about twice as wide as tall."""
    cols = max(1, math.ceil(math.sqrt(num_cells * 2)))
    return max(1, math.ceil(num_cells / cols)), cols


def block_grid(eng: EngineBlocks, max_cells: int = MAX_CELLS) -> BlockGrid:
    """Lay out one engine's pool as a grid (fine <= max_cells blocks, else super-cells)."""
    n = max(eng.num_blocks, 1)
    state = eng.state if eng.num_blocks else np.zeros(1, np.uint8)
    counts = np.bincount(state[1:], minlength=4)[:4]
    k = max(1, math.ceil(n / max_cells))
    cells = math.ceil(n / k)
    rows, cols = grid_shape(cells)
    ids = np.arange(cells, dtype=np.int32)
    x, y = ids % cols, ids // cols
    if k == 1:
        z = np.choose(state, [Z_FREE, Z_CACHED, Z_USED, Z_SHARED]).astype(np.float32)
        owner = eng.owner if eng.num_blocks else np.full(1, -1, np.int32)
        colored = (owner >= 0) & (state == 2)
        if colored.any():
            z[colored] = Z_REQ0 + _color_codes(eng)[owner[colored]]
        names = [*eng.req_names, ""]
        tokens = eng.tokens_per_block() if eng.num_blocks else np.zeros(1, np.int64)
        text = [
            f"block {b}<br>{BLOCK_STATE_NAMES[s] if o < 0 else names[o]}"
            f"{' (shared prefix)' if s == 3 else ''}<br>{t} tokens"
            for b, s, o, t in zip(range(n), state.tolist(), owner.tolist(), tokens.tolist(), strict=True)
        ]
        return BlockGrid(z, x, y, text, 1, rows, cols, counts)
    cell = np.arange(n) // k
    per = np.bincount(cell * 4 + state, minlength=cells * 4).reshape(cells, 4)
    frac = per / per.sum(axis=1, keepdims=True)
    used = (frac[:, 2] + frac[:, 3]).astype(np.float32)
    first = np.arange(cells) * k
    last = np.minimum(first + k, n) - 1
    pct = np.rint(100 * frac).astype(np.int32).tolist()
    text = [
        f"blocks {a}–{b}<br>in use {p[2] + p[3]}% (shared {p[3]}%)<br>cached {p[1]}%<br>free {p[0]}%"
        for a, b, p in zip(first.tolist(), last.tolist(), pct, strict=True)
    ]
    return BlockGrid(used, x, y, text, k, rows, cols, counts)


def _color_codes(eng: EngineBlocks) -> np.ndarray:
    """Colour index per request code, cached on the engine and extended as requests appear."""
    cached = getattr(eng, "_viz_color_codes", np.zeros(0, np.int64))
    if len(cached) < len(eng.req_names):
        extra = [request_color_index(r) for r in eng.req_names[len(cached) :]]
        cached = np.concatenate([cached, np.asarray(extra, np.int64)])
        eng._viz_color_codes = cached  # type: ignore[attr-defined]
    return cached


def summary(eng: EngineBlocks, grid: BlockGrid) -> str:
    """Subplot title: engine, role, kind and the counts."""
    free, cached, used, shared = (int(c) for c in grid.counts)
    cells = "" if grid.blocks_per_cell == 1 else f" · {grid.blocks_per_cell} blocks/cell"
    return (
        f"<b>{eng.name}</b> ({eng.role}, {kind_label(eng.kind)}): {used + shared} in use"
        f" ({shared} shared) · {cached} cached · {free} free of {max(eng.num_blocks - 1, 0)}{cells}"
    )


class BlockMapView(View):
    """One heatmap per engine, stacked; hover names block ids, request and tokens."""

    title = "KV-cache block allocation"

    def __init__(self, state: BlockMapState, max_cells: int = MAX_CELLS) -> None:
        super().__init__(state, [e.kind for e in state.engines.values()])
        self.max_cells = max_cells
        self.names = list(state.engines)
        n = max(len(self.names), 1)
        base = make_subplots(
            rows=n, cols=1, vertical_spacing=0.12 / n,
            subplot_titles=[summary(e, block_grid(e, 1)) for e in state.engines.values()] or [""],
        )  # fmt: skip
        self.figure = go.FigureWidget(base)
        for i, _ in enumerate(self.names):
            self.figure.add_trace(
                go.Heatmap(z=[], x=[], y=[], showscale=False, hoverongaps=False,
                           hovertemplate=_HOVER),
                row=i + 1, col=1,
            )  # fmt: skip
            self.figure.update_yaxes(autorange="reversed", showticklabels=False, row=i + 1, col=1)
            self.figure.update_xaxes(showticklabels=False, row=i + 1, col=1)
        self._label(self.figure, height=260 * n + 80)
        self._modes: dict[str, bool] = {}
        self._shapes: dict[str, tuple[int, int, int]] = {}

    def state_version(self) -> int:
        return sum(e.version for e in self.state.engines.values())

    def draw(self) -> None:
        self.set_kinds(e.kind for e in self.state.engines.values())
        for i, name in enumerate(self.names):
            eng = self.state.engines[name]
            grid = block_grid(eng, self.max_cells)
            tr = self.figure.data[i]
            fine = grid.blocks_per_cell == 1
            if self._modes.get(name) != fine:
                self._modes[name] = fine
                if fine:
                    tr.update(colorscale=_discrete_scale(_FINE_COLORS), zmin=-0.5,
                              zmax=len(_FINE_COLORS) - 0.5, xgap=1, ygap=1)  # fmt: skip
                else:
                    tr.update(colorscale=_COARSE_SCALE, zmin=0.0, zmax=1.0, xgap=0, ygap=0)
            if self._shapes.get(name) != (grid.rows, grid.cols, grid.num_cells):
                self._shapes[name] = (grid.rows, grid.cols, grid.num_cells)
                tr.x, tr.y = grid.x, grid.y
            tr.z = grid.z
            tr.text = np.asarray(grid.text)  # a str array: validated in C, not per item
            self.figure.layout.annotations[i].text = summary(eng, grid)
