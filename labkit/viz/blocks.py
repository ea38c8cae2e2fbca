"""KV-cache block allocation map: each engine's physical blocks as a grid heatmap.

Up to MAX_CELLS blocks, one cell is one block, coloured by state and, when in use, by the
request that holds it (same colour and number as in the Gantt and the schedule). Above that,
cells become super-cells of `k` consecutive blocks, so a 255k-block cache costs one bincount
and a 4k-cell heatmap per redraw. A super-cell shows its mix: the hue of the most common
non-free state in it (cached, in use, shared), in four shades by the share of its blocks in
that state, so a few cached blocks among free ones still show; hover gives the whole mix.
Click a super-cell (or `zoom(engine, first_block)`) to see its neighbourhood block by block.

    block id = first + (row * cols + col) * k          (row 0 at the top; first = zoom start)
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.viz.base import SUBTITLE_LINE_PX, View
from labkit.viz.blockstate import BlockMapState, EngineBlocks
from labkit.viz.requests import RequestIds
from labkit.viz.style import REQUEST_COLORS, STATE_COLORS, kind_label
from labkit.vocab import BLOCK_STATE_NAMES

MAX_CELLS = 4096

# Fine grid z codes: states first, then one code per request colour.
Z_FREE, Z_CACHED, Z_SHARED, Z_USED = 0, 1, 2, 3
Z_REQ0 = 4
_FINE_COLORS = [STATE_COLORS[0], STATE_COLORS[1], STATE_COLORS[3], STATE_COLORS[2], *REQUEST_COLORS]
# Super-cell codes: 0 free; 1 + 4 * (state - 1) + shade for state 1..3 (cached, in use,
# shared) and shade 0..3 (share of the cell's blocks in that state: <25 %, <50 %, <75 %, more).
_SHADES = (0.35, 0.55, 0.78, 1.0)
_HUES = (STATE_COLORS[1], STATE_COLORS[2], STATE_COLORS[3])


def _mix(hex_color: str, weight: float, base: str = STATE_COLORS[0]) -> str:
    a = [int(base[i : i + 2], 16) for i in (1, 3, 5)]
    b = [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * weight):02x}" for x, y in zip(a, b, strict=True))


_COARSE_COLORS = [STATE_COLORS[0]] + [_mix(h, w) for h in _HUES for w in _SHADES]
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


def block_grid(eng: EngineBlocks, max_cells: int = MAX_CELLS, ids: RequestIds | None = None,
               first: int = 0) -> BlockGrid:  # fmt: skip
    """Lay out one engine's pool as a grid (fine <= max_cells blocks, else super-cells).

    `first`: a zoomed view starts at this block and shows max_cells blocks one per cell."""
    ids = ids if ids is not None else RequestIds()
    n_all = max(eng.num_blocks, 1)
    state_all = eng.state if eng.num_blocks else np.zeros(1, np.uint8)
    counts = np.bincount(state_all[1:], minlength=4)[:4]
    first = max(0, min(first, n_all - 1))
    stop = min(n_all, first + max_cells) if first else n_all
    state = state_all[first:stop]
    n = len(state)
    k = max(1, math.ceil(n / max_cells))
    cells = math.ceil(n / k)
    rows, cols = grid_shape(cells)
    cell_ids = np.arange(cells, dtype=np.int32)
    x, y = cell_ids % cols, cell_ids // cols
    if k == 1:
        z = np.choose(state, [Z_FREE, Z_CACHED, Z_USED, Z_SHARED]).astype(np.float32)
        owner = eng.owner[first:stop] if eng.num_blocks else np.full(1, -1, np.int32)
        colored = (owner >= 0) & (state == 2)
        if colored.any():
            codes = np.unique(owner[colored])
            lut = np.zeros(int(codes.max()) + 1, np.int64)
            lut[codes] = [REQUEST_COLORS.index(ids.color(eng.req_names[c])) for c in codes]
            z[colored] = Z_REQ0 + lut[owner[colored]]
        names = [ids.label(r) for r in eng.req_names] + [""]
        tokens = (eng.tokens_per_block() if eng.num_blocks else np.zeros(1, np.int64))[first:stop]
        text = []
        for b, st_, o, t in zip(range(first, stop), state.tolist(), owner.tolist(), tokens.tolist(),
                                strict=True):  # fmt: skip
            if st_ == 3 and b in eng.holders:
                who = "shared by " + ", ".join(ids.label(h) for h in eng.holders[b])
            elif o >= 0:
                who = f"request {names[o]}" + (" (shared prefix)" if st_ == 3 else "")
            else:
                who = BLOCK_STATE_NAMES[st_]
            text.append(f"block {b}<br>{who}<br>{t} tokens")
        return BlockGrid(z, x, y, text, 1, rows, cols, counts)
    cell = np.arange(n) // k
    per = np.bincount(cell * 4 + state, minlength=cells * 4).reshape(cells, 4)
    size = per.sum(axis=1)
    frac = per / np.maximum(size, 1)[:, None]
    busy = per[:, 1:]  # cached, in use, shared
    top = np.argmax(busy[:, ::-1], axis=1)  # ties go to the rarer state: shared, in use, cached
    top = 2 - top
    share = frac[np.arange(cells), top + 1]
    shade = np.minimum((share * 4).astype(np.int32), 3)
    z = np.where(busy.sum(axis=1) > 0, 1 + 4 * top + shade, 0).astype(np.float32)
    starts = first + np.arange(cells) * k
    last = np.minimum(starts + k, first + n) - 1
    text = [
        f"blocks {a}–{b} (click: block by block)<br>in use {p[2]} · shared {p[3]}"
        f"<br>cached {p[1]} · free {p[0]}"
        for a, b, p in zip(starts.tolist(), last.tolist(), per.tolist(), strict=True)
    ]
    return BlockGrid(z, x, y, text, k, rows, cols, counts)


def summary(eng: EngineBlocks, grid: BlockGrid, first: int = 0, *, short: bool = False,
            with_kind: bool = True) -> str:
    """Subplot title in SUMMARY_LINES short lines: engine, role, kind; the blocks and what
    one cell stands for; the counts. Each line fits a 360 px cell; `short` (a map in a grid
    of two columns) keeps each line to ~25 characters, half of that cell, and names the kind
    only if `with_kind` (the figure's title names it when every engine has the same)."""
    free, cached, used, shared = (int(c) for c in grid.counts)
    num_blocks = f"{max(eng.num_blocks - 1, 0):,} blocks"
    if short:
        head = f"<b>{eng.name}</b>" + ("" if eng.role in eng.name else f" ({eng.role})")
        if with_kind:
            head += f" · {kind_label(eng.kind)}"
        if first:
            cells = f"zoom: {first:,}–{first + grid.num_cells - 1:,}"
        else:
            cells = num_blocks + ("" if grid.blocks_per_cell == 1 else f" · {grid.blocks_per_cell}/cell")
        return (f"{head}<br>{cells}<br>in use {_count(used + shared)} (shared {_count(shared)})"
                f"<br>cached {_count(cached)} · free {_count(free)}")
    if first:
        cells = f" · zoom: blocks {first:,}–{first + grid.num_cells - 1:,}"
    else:
        cells = "" if grid.blocks_per_cell == 1 else f" · {grid.blocks_per_cell} per cell"
    return (
        f"<b>{eng.name}</b> ({eng.role}, {kind_label(eng.kind)})"
        f"<br>{num_blocks}{cells}"
        f"<br>in use {used + shared:,} (shared {shared:,})<br>cached {cached:,} · free {free:,}"
    )


def _count(n: int) -> str:
    """A count in at most 5 characters for a grid's title: 9,999, 25.3k, 255k, 1.2M."""
    if n < 10_000:
        return f"{n:,}"
    if n < 99_950:
        return f"{n / 1e3:.1f}k"
    return f"{n / 1e3:.0f}k" if n < 999_500 else f"{n / 1e6:.1f}M"


SUMMARY_LINES = 4
MAP_PX, GRID_MAP_PX = 300, 240  # height per engine (one column) / per row of the grid


def map_grid(num_engines: int) -> tuple[int, int]:
    """(rows, cols) of the maps: one column up to two engines, then two (8 engines: 4 x 2)."""
    cols = 1 if num_engines <= 2 else 2
    return max(1, math.ceil(num_engines / cols)), cols


class BlockMapView(View):
    """One heatmap per engine: stacked up to two engines, then a grid of two columns (row by
    row, shorter titles: 8 engines fit ~1,150 px, not ~2,600); the width is the container's.
    Hover names block ids, owners and tokens; a legend of the states; click a super-cell to
    zoom to its blocks, click again to zoom out."""

    title = "KV-cache block allocation"

    def __init__(self, state: BlockMapState, max_cells: int = MAX_CELLS,
                 ids: RequestIds | Callable[[], RequestIds] | None = None) -> None:  # fmt: skip
        super().__init__(state, [e.kind for e in state.engines.values()])
        self.max_cells = max_cells
        self._ids = ids if ids is not None else RequestIds()
        self.names = list(state.engines)
        self.zoomed: dict[str, int] = {}  # engine -> first block shown, one per cell
        n = max(len(self.names), 1)
        self.rows, self.cols = map_grid(n)
        self.short = self.cols > 1
        height = (GRID_MAP_PX if self.short else MAP_PX) * self.rows + 190
        plot_px = height - (54 + SUBTITLE_LINE_PX * SUMMARY_LINES) - 40
        grid0 = {name: block_grid(e, 1) for name, e in state.engines.items()}
        base = make_subplots(  # room between the maps for the next one's title
            rows=self.rows, cols=self.cols, horizontal_spacing=0.06,
            vertical_spacing=min(0.5, (SUBTITLE_LINE_PX * SUMMARY_LINES + 12) / plot_px),
            subplot_titles=[self._summary(e, grid0[name]) for name, e in state.engines.items()]
            or [""],
        )  # fmt: skip
        self.figure = go.FigureWidget(base)
        for i, _ in enumerate(self.names):
            row, col = self.cell(i)
            self.figure.add_trace(
                go.Heatmap(z=[], x=[], y=[], showscale=False, hoverongaps=False,
                           hovertemplate=_HOVER, showlegend=False),
                row=row, col=col,
            )  # fmt: skip
        for i in range(self.rows * self.cols):  # an odd count leaves the last cell empty
            row, col = self.cell(i)
            shown = i < len(self.names) or not self.names
            self.figure.update_yaxes(autorange="reversed", showticklabels=False, visible=shown,
                                     row=row, col=col)
            self.figure.update_xaxes(showticklabels=False, visible=shown, row=row, col=col)
        # The legend of the states (and of request colours) as marker-only entries.
        legend = [(BLOCK_STATE_NAMES[0], STATE_COLORS[0]), (BLOCK_STATE_NAMES[1], STATE_COLORS[1]),
                  (BLOCK_STATE_NAMES[2] + " (request unknown)", STATE_COLORS[2]),
                  (BLOCK_STATE_NAMES[3], STATE_COLORS[3]),
                  ("in use by request #n: its colour in every view", REQUEST_COLORS[0])]  # fmt: skip
        for name, color in legend:
            self.figure.add_trace(go.Scatter(
                x=[None], y=[None], mode="markers", name=name, hoverinfo="skip",
                marker=dict(symbol="square", size=12, color=color, line=dict(color="#868e96", width=1))))
        self._label(self.figure, height=height, subtitle_lines=SUMMARY_LINES)
        self.figure.update_layout(legend=dict(y=-0.04, yanchor="top"))
        if self.short:  # no tick labels: the side margins go to the two columns of titles
            self.figure.update_layout(margin=dict(l=12, r=12))
        for tr in self.figure.data[: len(self.names)]:
            tr.on_click(self._clicked)
        self._modes: dict[str, bool] = {}
        self._shapes: dict[str, tuple[int, int, int]] = {}
        self._grids: dict[str, BlockGrid] = {}
        self._bump = 0

    def cell(self, i: int) -> tuple[int, int]:
        """(row, col) of map `i`, 1-based, row by row (make_subplots' order of titles)."""
        return i // self.cols + 1, i % self.cols + 1

    def _summary(self, eng: EngineBlocks, grid: BlockGrid, first: int = 0) -> str:
        kinds = {e.kind for e in self.state.engines.values()}
        return summary(eng, grid, first, short=self.short, with_kind=len(kinds) > 1)

    @property
    def ids(self) -> RequestIds:
        """The request names and colours shared with the other views (a dashboard passes a
        getter: its reducers, and so its RequestIds, are new after a replay seeks back)."""
        return self._ids() if callable(self._ids) else self._ids

    def state_version(self) -> int:
        return sum(e.version for e in self.state.engines.values()) + self.ids.version + self._bump

    # -- zoom ------------------------------------------------------------------------------
    def zoom(self, engine: str, first_block: int | None) -> None:
        """Show `max_cells` blocks of `engine` one per cell from `first_block` (None: all)."""
        if first_block is None:
            self.zoomed.pop(engine, None)
        else:
            self.zoomed[engine] = max(1, int(first_block))
        self._bump += 1
        self.update()

    def _clicked(self, trace, points, _state=None) -> None:
        """A click on a super-cell zooms to its neighbourhood; on a zoomed map, zooms out."""
        if not points.point_inds:
            return
        i = next((j for j, t in enumerate(self.figure.data) if t is trace), 0)
        name = self.names[i]
        grid = self._grids.get(name)
        if name in self.zoomed or grid is None or grid.blocks_per_cell == 1:
            self.zoom(name, None)
            return
        cell = int(points.ys[0]) * grid.cols + int(points.xs[0])
        center = cell * grid.blocks_per_cell + grid.blocks_per_cell // 2
        self.zoom(name, center - self.max_cells // 2)

    # -- drawing ---------------------------------------------------------------------------
    def draw(self) -> None:
        self.set_kinds(e.kind for e in self.state.engines.values())
        for i, name in enumerate(self.names):
            eng = self.state.engines[name]
            first = self.zoomed.get(name, 0)
            grid = self._grids[name] = block_grid(eng, self.max_cells, self.ids, first)
            tr = self.figure.data[i]
            fine = grid.blocks_per_cell == 1
            if self._modes.get(name) != fine:
                self._modes[name] = fine
                if fine:
                    tr.update(colorscale=_discrete_scale(_FINE_COLORS), zmin=-0.5,
                              zmax=len(_FINE_COLORS) - 0.5, xgap=1, ygap=1)  # fmt: skip
                else:
                    tr.update(colorscale=_discrete_scale(_COARSE_COLORS), zmin=-0.5,
                              zmax=len(_COARSE_COLORS) - 0.5, xgap=0, ygap=0)  # fmt: skip
            if self._shapes.get(name) != (grid.rows, grid.cols, grid.num_cells):
                self._shapes[name] = (grid.rows, grid.cols, grid.num_cells)
                tr.x, tr.y = grid.x, grid.y
            tr.z = grid.z
            tr.text = np.asarray(grid.text)  # a str array: validated in C, not per item
            self.figure.layout.annotations[i].text = self._summary(eng, grid, first)
