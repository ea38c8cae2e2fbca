"""The CPU tier of KV (vLLM's --kv-offloading-size): each engine's host blocks by state, and
the GPU<->CPU traffic per scheduler step beside it.

Reads the observer events HostTierSnapshot (one byte per CPU block, labkit.vocab HOST_*) and
OffloadTransfer (one finished copy job, vLLM's transfer_type "GPU_to_CPU" | "CPU_to_GPU").
An engine without a CPU tier sends neither: the view then says "no CPU tier".

    row 1  host tier   one horizontal bar per engine: free | stored | storing | loading blocks
    row 2  traffic     bytes per step, stores (GPU->CPU) up, loads (CPU->GPU) down
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.viz.base import View
from labkit.viz.style import fmt_bytes
from labkit.vocab import HOST_STATE_NAMES

HOST_COLORS = ("#eeeeee", "#e8590c", "#fab005", "#1c7ed6")  # free, stored, storing, loading
TRANSFER_TYPES = ("GPU_to_CPU", "CPU_to_GPU")
MAX_STEPS = 512  # traffic kept per engine (most recent steps)


@dataclass
class EngineHostTier:
    """One engine's CPU tier as last seen, and its traffic per step."""

    num_blocks: int = 0
    counts: tuple[int, int, int, int] = (0, 0, 0, 0)  # blocks per HOST_* state
    ts: float = 0.0
    # step -> {transfer_type: bytes}
    traffic: dict[int, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    steps: deque[int] = field(default_factory=lambda: deque(maxlen=MAX_STEPS))
    total_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRANSFER_TYPES, 0))
    num_jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRANSFER_TYPES, 0))


class OffloadState:
    """Folds observer batches into each engine's CPU tier (pure data, no plotting)."""

    def __init__(self) -> None:
        self.engines: dict[str, EngineHostTier] = {}
        self.kinds: set[str] = set()
        self.version = 0

    def apply(self, batch: Any) -> None:
        changed = False
        for ev in batch.events:
            name = type(ev).__name__
            if name == "HostTierSnapshot":
                tier = self._tier(batch.engine_id)
                raw = bytes(ev.block_state)
                tier.counts = tuple(raw.count(bytes([s])) for s in range(4))  # type: ignore[assignment]
                tier.num_blocks, tier.ts = ev.num_blocks, ev.ts
                changed = True
            elif name == "OffloadTransfer":
                tier = self._tier(batch.engine_id)
                tt = ev.transfer_type if ev.transfer_type in TRANSFER_TYPES else TRANSFER_TYPES[0]
                step = ev.step if ev.step >= 0 else int(ev.end * 1000)  # unknown step: per ms
                if step not in tier.traffic:
                    if len(tier.steps) == tier.steps.maxlen:
                        tier.traffic.pop(tier.steps[0], None)
                    tier.steps.append(step)
                per = tier.traffic[step]
                per[tt] = per.get(tt, 0) + ev.num_bytes
                tier.total_bytes[tt] += ev.num_bytes
                tier.num_jobs[tt] += 1
                changed = True
            else:
                continue
            self.kinds.add(batch.kind)
        if changed:
            self.version += 1

    def _tier(self, engine: str) -> EngineHostTier:
        tier = self.engines.get(engine)
        if tier is None:
            tier = self.engines[engine] = EngineHostTier()
        return tier


class OffloadView(View):
    """Host tier under the GPU block map: blocks per state and GPU<->CPU bytes per step."""

    title = "CPU tier of KV (offload)"

    def __init__(self, state: OffloadState, kinds: Any = ("sim",)) -> None:
        super().__init__(state, kinds)
        fig = make_subplots(rows=2, cols=1, row_heights=[0.4, 0.6], vertical_spacing=0.26,
                            subplot_titles=("host blocks by state", "GPU<->CPU bytes per step"))
        self.figure = go.FigureWidget(fig)
        for i, name in enumerate(HOST_STATE_NAMES):
            self.figure.add_bar(x=[], y=[], orientation="h", name=name, marker_color=HOST_COLORS[i],
                                row=1, col=1, legendgroup="tier")
        self.figure.add_bar(x=[], y=[], name="store GPU→CPU", marker_color="#e8590c", row=2, col=1)
        self.figure.add_bar(x=[], y=[], name="load CPU→GPU", marker_color="#1c7ed6", row=2, col=1)
        self.figure.update_layout(barmode="relative")
        self.figure.update_xaxes(title_text="CPU blocks", row=1, col=1)
        self.figure.update_xaxes(title_text="scheduler step", row=2, col=1)
        self.figure.update_yaxes(title_text="bytes (loads < 0)", row=2, col=1)
        self._label(self.figure, 420)

    def draw(self) -> None:
        st: OffloadState = self.state
        if st.kinds:
            self.set_kinds(st.kinds)
        names = sorted(st.engines)
        data = self.figure.data
        for i in range(4):
            data[i].y = names
            data[i].x = [st.engines[n].counts[i] for n in names]
            data[i].hovertemplate = f"{HOST_STATE_NAMES[i]}: %{{x}} blocks<extra>%{{y}}</extra>"
        steps: list[str] = []
        up: list[int] = []
        down: list[int] = []
        for n in names:
            tier = st.engines[n]
            for step in tier.steps:
                per = tier.traffic.get(step, {})
                steps.append(f"{n} {step}" if len(names) > 1 else str(step))
                up.append(per.get("GPU_to_CPU", 0))
                down.append(-per.get("CPU_to_GPU", 0))
        data[4].x, data[4].y = steps, up
        data[5].x, data[5].y = steps, down
        totals = [f"{n}: stored {fmt_bytes(t.total_bytes['GPU_to_CPU'])} "
                  f"({t.num_jobs['GPU_to_CPU']} jobs), loaded {fmt_bytes(t.total_bytes['CPU_to_GPU'])} "
                  f"({t.num_jobs['CPU_to_GPU']} jobs)" for n, t in ((n, st.engines[n]) for n in names)]
        self.figure.layout.xaxis2.type = "category"
        self.figure.layout.xaxis2.title.text = ("scheduler step · " + " · ".join(totals)
                                                if totals else "no CPU tier")
