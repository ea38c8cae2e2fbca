"""Per-GPU memory: what fills each GPU now (weights, KV cache, the rest of each engine's
process, other processes, free), and the same categories over time. Shows where KV lives
beside the weights, and how the memory fraction of two engines on one GPU adds up."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.telemetry.source import EngineInfo, SourceInfo
from labkit.viz.base import View
from labkit.viz.state import MemoryState
from labkit.viz.style import fmt_bytes, gib

CATEGORY_COLORS = {
    "weights": "#1971c2",
    "KV cache": "#2f9e44",
    "engine other": "#f08c00",
    "other processes": "#868e96",
    "free": "#e9ecef",
}
ENGINE_PATTERNS = ("", "/", "x", ".", "\\", "+", "-", "|")


def block_bytes(engine: EngineInfo) -> int:
    """KV bytes of one block on one GPU of `engine`: what its describe() says (the KV cache's
    dtype counted: fp8 halves it), else, for recordings made before it said so, block_size x
    the model's KV per token in the model's dtype, heads split over its GPUs; 0 when unknown."""
    from labkit.models import get_model

    if engine.kv_bytes_per_block > 0:
        return engine.kv_bytes_per_block
    try:
        shape = get_model(engine.model)
        return engine.block_size * shape.kv_bytes_per_token("auto", tp=max(len(engine.gpus), 1))
    except (KeyError, ValueError, OSError):
        return 0


class MemoryView(View):
    """Left: stacked bar per GPU, one segment per (engine, category). Right: per GPU over time."""

    title = "GPU memory"

    def __init__(self, state: MemoryState, info: SourceInfo) -> None:
        super().__init__(state, [info.kind])
        self.gpus = [g.index for g in info.gpus] or [0]  # logical: the plan's GPUs
        self.gpu_names = {g.index: g.name for g in info.gpus}
        self.physical = {g.index: g.physical for g in info.gpus if g.physical is not None}
        self.engines = [e.name for e in info.engines]
        self.pool_note: dict[str, str] = {}
        self.pools: dict[str, tuple[int, int]] = {}
        for e in info.engines:  # what the engine allocated: its pool, not the memory it logs
            bb = block_bytes(e)
            if bb and e.num_blocks:
                self.pools[e.name] = (e.num_blocks, bb)
                state.set_pool(e.name, e.num_blocks, bb)
                self.pool_note[e.name] = f"{e.num_blocks:,} blocks × {fmt_bytes(bb)}"
        n = len(self.gpus)
        base = make_subplots(
            rows=n, cols=2, column_widths=[0.35, 0.65], horizontal_spacing=0.08,
            specs=[[{"rowspan": n}, {}]] + [[None, {}] for _ in range(n - 1)],
            subplot_titles=["now (GiB)"] + [f"{self.gpu_label(g)} over time (GiB)"
                                            for g in self.gpus],
        )  # fmt: skip
        fig = self.figure = go.FigureWidget(base)
        self.title_index = {g: 1 + gi for gi, g in enumerate(self.gpus)}  # subplot titles
        self.bar_keys: list[tuple[str, str]] = []
        for ei, eng in enumerate(self.engines):
            for cat in ("weights", "KV cache", "engine other"):
                self.bar_keys.append((eng, cat))
                fig.add_trace(
                    go.Bar(name=f"{eng}: {cat}", x=[], y=[], marker_color=CATEGORY_COLORS[cat],
                           marker_pattern_shape=ENGINE_PATTERNS[ei % len(ENGINE_PATTERNS)],
                           hovertemplate=f"{eng} {cat}: %{{text}}<extra>%{{x}}</extra>",
                           textposition="none"),
                    row=1, col=1,
                )  # fmt: skip
        for cat in ("other processes", "free"):
            self.bar_keys.append(("", cat))
            fig.add_trace(
                go.Bar(name=cat, x=[], y=[], marker_color=CATEGORY_COLORS[cat], textposition="none",
                       hovertemplate=f"{cat}: %{{text}}<extra>%{{x}}</extra>"), row=1, col=1,
            )  # fmt: skip
        self.area_index: dict[tuple[int, str], int] = {}
        for gi, gpu in enumerate(self.gpus):
            for cat in MemoryState.CATEGORIES[:-1]:  # free is the gap to the total line
                self.area_index[(gpu, cat)] = len(fig.data)
                fig.add_trace(
                    go.Scatter(name=cat, x=[], y=[], stackgroup=f"gpu{gpu}", mode="lines",
                               line=dict(width=0.5, color=CATEGORY_COLORS[cat]),
                               legendgroup=cat, showlegend=False),
                    row=gi + 1, col=2,
                )  # fmt: skip
            self.area_index[(gpu, "total")] = len(fig.data)
            fig.add_trace(
                go.Scatter(name="capacity", x=[], y=[], mode="lines", showlegend=False,
                           line=dict(color="black", dash="dot", width=1)), row=gi + 1, col=2,
            )  # fmt: skip
        fig.update_layout(barmode="stack", legend=dict(orientation="h", y=-0.1, yanchor="top"))
        fig.update_xaxes(tickangle=0, row=1, col=1)
        fig.update_xaxes(title_text="s since the first sample", col=2, row=n)
        fig.add_annotation(text="", name="segments", xref="paper", yref="paper", x=0.0, y=-0.09,
                           xanchor="left", yanchor="top", align="left", showarrow=False,
                           font=dict(size=10, color="#343a40"))  # fmt: skip
        self._label(fig, height=max(460, 220 * n + 160))
        fig.update_layout(margin=dict(b=150), legend=dict(x=0.42, xanchor="left", y=-0.09))

    def gpu_label(self, gpu: int) -> str:
        """"GPU k" (the plan's GPU), with NVML's index where it differs: "GPU 0 (physical 2)"
        under CUDA_VISIBLE_DEVICES=2,3. The samples say it; describe() may say it first."""
        s = self.state.latest.get(gpu)
        p = s.physical if s is not None and s.physical is not None else self.physical.get(gpu)
        return f"GPU {gpu}" if p is None or p == gpu else f"GPU {gpu} (physical {p})"

    def draw(self) -> None:
        st: MemoryState = self.state
        for name, pool in self.pools.items():  # a fresh state (a replay seeked back) learns them
            st.pools.setdefault(name, pool)
        kinds = {s.kind for s in st.latest.values()}
        self.set_kinds(kinds or self.kinds)
        labels = [self.gpu_label(g) for g in self.gpus]  # no model name: it hits the legend
        for g, label in zip(self.gpus, labels, strict=True):
            title = self.figure.layout.annotations[self.title_index[g]]
            if title.text != f"{label} over time (GiB)":
                title.text = f"{label} over time (GiB)"
        per_gpu = {g: {(e, c): b for e, c, b in st.breakdown(g)} for g in self.gpus}
        for key, tr in zip(self.bar_keys, self.figure.data, strict=False):
            tr.x = labels
            tr.y = [gib(per_gpu[g].get(key, 0)) for g in self.gpus]
            tr.text = [fmt_bytes(per_gpu[g].get(key, 0)) for g in self.gpus]
        # Tiny segments (a 1B model's weights, a 128-block pool) vanish in a bar of 141 GiB:
        # name every engine's weights and KV in words, per GPU.
        lines = []
        for g, label in zip(self.gpus, labels, strict=True):
            for eng in self.engines:
                w, kv = per_gpu[g].get((eng, "weights"), 0), per_gpu[g].get((eng, "KV cache"), 0)
                if w or kv:
                    pool = f"<br>   ({self.pool_note[eng]})" if eng in self.pool_note else ""
                    lines.append(f"{label} {eng}: weights {fmt_bytes(w)} · KV {fmt_bytes(kv)}{pool}")
        for a in self.figure.layout.annotations:
            if a.name == "segments":
                a.text = "<br>".join(lines[:8])
        for gpu in self.gpus:
            hist = st.history.get(gpu)
            if not hist:
                continue
            t = np.fromiter((ts for ts, _ in hist), float, len(hist))
            vals = np.array([v for _, v in hist], dtype=np.float64) / 2**30
            x = t - t[0]
            for ci, cat in enumerate(MemoryState.CATEGORIES[:-1]):
                tr = self.figure.data[self.area_index[(gpu, cat)]]
                tr.x, tr.y = x, vals[:, ci]
            total = self.figure.data[self.area_index[(gpu, "total")]]
            total.x, total.y = x, vals.sum(axis=1)
