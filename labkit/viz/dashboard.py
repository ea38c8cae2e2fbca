"""The dashboard: every view + the controls in one ipywidgets layout, refreshed from a
`TelemetrySource` at >= 4 Hz. One refresh = one `poll()`, fold the delta into the reducers,
redraw only the views whose state moved (each inside `batch_update()`).

    dash = Dashboard(source, on_apply=lab.reconfigure)
    dash.start()        # asyncio task in Jupyter, a daemon thread elsewhere
    dash                # displays it
    dash.stop()
"""
from __future__ import annotations

import asyncio
import html
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from labkit.telemetry.source import SourceInfo, TelemetryDelta, TelemetrySource
from labkit.viz.base import View
from labkit.viz.blocks import BlockMapView
from labkit.viz.controls import ControlPanel, StartupProgress
from labkit.viz.latency import LatencyView
from labkit.viz.memory import MemoryView
from labkit.viz.offload import OffloadState, OffloadView
from labkit.viz.replay_controls import ReplayControls
from labkit.viz.schedule import ScheduleView
from labkit.viz.state import BlockMapState, LatencyState, MemoryState, ScheduleState, TransferState
from labkit.viz.streaming import StreamingView
from labkit.viz.style import KIND_COLORS, kind_label

CONTROLS_WIDTH = "340px"  # the controls' labels are 150 px (labkit/viz/controls.py)


def header_text(info: SourceInfo) -> str:
    """'SIMULATED', 'REAL vLLM on NVIDIA H100 80GB HBM3 ×2', 'REPLAY' (+ engines)."""
    label = kind_label(info.kind)
    if info.kind == "vllm" and info.gpus:
        names = [g.name for g in info.gpus]
        uniq = sorted(set(names))
        label += " on " + ", ".join(f"{n} ×{names.count(n)}" if names.count(n) > 1 else n for n in uniq)
    return label


class Dashboard:
    """All views of one PD pair (or any set of engines), live.

    Args:
        source: anything with `poll() -> TelemetryDelta` and `describe() -> dict`.
        on_apply: called with a validated `LabSettings` when the learner presses Apply.
        config: the running labkit.plan.PDConfig (fills the controls); None: defaults.
        hardware: passed to labkit.plan.validate (None: detected / simulated).
        interval: seconds between refreshes (0.25 = 4 Hz).
        max_cells: block-map cells per engine before blocks are grouped into super-cells.
        controls: more keywords for the ControlPanel (kv_cache_memory, workload, threaded).
        autoplay: a replay source starts playing at once; False: paused at 0 until its
            time controls' play() (`replay_controls`).
    """

    def __init__(
        self,
        source: TelemetrySource,
        on_apply: Callable[[Any], None] | None = None,
        config: Any = None,
        hardware: Any = None,
        interval: float = 0.25,
        max_cells: int = 4096,
        controls: dict[str, Any] | None = None,
        autoplay: bool = True,
    ) -> None:
        self.source = source
        self.info = SourceInfo.from_dict(source.describe())
        self.interval = interval
        self.title = source.describe().get("title")  # a replay's "REPLAY of a real vLLM run ..."
        engines = [(e.name, e.role, e.kind) for e in self.info.engines]
        self._new_states()
        kinds = [self.info.kind, *(k for _, _, k in engines)]
        self.views: dict[str, View] = {
            "blocks": BlockMapView(self.blocks, max_cells=max_cells, ids=lambda: self.transfers.ids),
            "streaming": StreamingView(self.transfers, kinds, link=self.info.link),
            "memory": MemoryView(self.memory, self.info),
            "schedule": ScheduleView(self.schedule, engines, ids=lambda: self.transfers.ids),
            "latency": LatencyView(self.latency, engines, self.info.kind),
            "offload": OffloadView(self.offload, kinds),
        }
        if self.info.kind == "replay":
            for view in self.views.values():
                view.mark_replay()
        self.timings: dict[str, float] = dict.fromkeys(["poll", "fold", *self.views], 0.0)
        self.num_refreshes = 0
        self.last_error: str | None = None
        self.progress = StartupProgress()
        self.controls = ControlPanel(on_apply=on_apply, base=config, hardware=hardware,
                                     **(controls or {}))
        self.replay_controls: ReplayControls | None = None
        if self.info.kind == "replay":
            self.controls.disable("A replay: what was recorded is shown as it ran; Apply "
                                  "needs a live lab.")
            if hasattr(source, "seek"):
                self.replay_controls = ReplayControls(source, autoplay=autoplay)
        self.header = w.HTML(self._header_html())
        self.status = w.HTML("")
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.widget = self._layout()

    def _new_states(self) -> None:
        """Fresh reducers (at start, and when a replay seeks backwards)."""
        self.blocks = BlockMapState(
            {e.name: (e.role, e.kind, e.num_blocks, e.block_size) for e in self.info.engines}
        )
        self.transfers = TransferState()
        self.memory = MemoryState()
        self.schedule = ScheduleState()
        self.latency = LatencyState()
        self.offload = OffloadState()

    def _reset(self) -> None:
        self._new_states()
        states = {"blocks": self.blocks, "streaming": self.transfers, "memory": self.memory,
                  "schedule": self.schedule, "latency": self.latency, "offload": self.offload}
        for name, view in self.views.items():
            view.state = states[name]
            view._drawn_version = -1

    # -- layout --------------------------------------------------------------------------------
    def _header_html(self) -> str:
        color = KIND_COLORS.get(self.info.kind, "#444")
        engines = ", ".join(f"{e.name} ({e.role})" for e in self.info.engines)
        return (
            f'<div style="display:flex;gap:12px;align-items:center">'
            f'<span style="background:{color};color:white;padding:4px 10px;border-radius:4px;'
            f'font-weight:bold">{html.escape(self.title or header_text(self.info))}</span>'
            f"<span>PD Lab · {html.escape(engines)}</span></div>"
        )

    def _layout(self) -> w.Widget:
        """Figures fill what the fixed-width controls column leaves; each figure autosizes to
        its box (a FigureWidget's own `layout` is plotly's, so a plain Box sizes it)."""
        v = self.views

        def cell(view: str, basis: str = "100%") -> w.Box:
            # Two to a row where they fit (basis 420 px each), one per row where they don't.
            return w.Box([v[view].figure], layout=w.Layout(flex=f"1 1 {basis}", min_width="0",
                                                           overflow="hidden"))  # fmt: skip

        def row(*cells: w.Box) -> w.Box:
            return w.Box(list(cells), layout=w.Layout(display="flex", flex_flow="row wrap",
                                                      width="100%"))  # fmt: skip

        figs = w.VBox(
            [
                row(cell("blocks", "420px"), cell("streaming", "420px")),
                row(cell("schedule", "420px"), cell("memory", "420px")),
                cell("latency"),
                cell("offload"),  # the CPU tier under the block maps
            ],
            layout=w.Layout(flex="1 1 560px", min_width="0"),
        )
        time_controls = [self.replay_controls.widget] if self.replay_controls else []
        side = w.VBox([self.progress.widget, *time_controls, self.controls.widget],
                      layout=w.Layout(flex=f"0 0 {CONTROLS_WIDTH}", width=CONTROLS_WIDTH,
                                      margin="0 0 0 8px"))  # fmt: skip
        # The controls sit right of the figures on a wide page, under them on a narrow one
        # (JupyterLab beside a file browser, a laptop): the figures never shrink to a strip.
        body = w.Box([figs, side], layout=w.Layout(display="flex", flex_flow="row wrap",
                                                   width="100%"))  # fmt: skip
        return w.VBox([self.header, self.status, body])

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- refresh -------------------------------------------------------------------------------
    def fold(self, delta: TelemetryDelta) -> None:
        """Feed one delta into every reducer (no drawing)."""
        if getattr(delta, "reset", False):
            self._reset()
        for batch in delta.observer:
            self.blocks.apply(batch)
            self.transfers.apply(batch)
            self.schedule.apply(batch)
            self.offload.apply(batch)
        for ev in delta.timeline:
            self.transfers.apply_timeline(ev)
            self.latency.apply_timeline(ev)
        for m in delta.metrics:
            self.latency.apply_metrics(m)
        for em in delta.engine_memory:
            self.memory.apply_engine_memory(em)
        for s in delta.gpu_samples:
            self.memory.apply_sample(s)

    def refresh(self) -> dict[str, float]:
        """One poll + fold + redraw; returns CPU seconds per stage (time.process_time)."""
        clock = time.process_time
        t = clock()
        delta = self.source.poll()
        t1 = clock()
        self.timings["poll"] = t1 - t
        self.fold(delta)
        t2 = clock()
        self.timings["fold"] = t2 - t1
        for name, view in self.views.items():
            t3 = clock()
            view.update()
            self.timings[name] = clock() - t3
        if self.replay_controls is not None:
            self.replay_controls.sync()  # after the draw: an ended replay pauses, drawn
        self.num_refreshes += 1
        return dict(self.timings)

    def _safe_refresh(self) -> None:
        try:
            self.refresh()
            if self.last_error is not None:
                self.last_error = None
                self.status.value = ""
        except Exception as e:  # keep refreshing; say what went wrong once
            msg = f"{type(e).__name__}: {e}"
            if msg != self.last_error:
                self.last_error = msg
                self.status.value = f'<span style="color:#c92a2a">refresh failed: {html.escape(msg)}</span>'

    async def _run_async(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            self._safe_refresh()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - t)))

    def _run_thread(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            self._safe_refresh()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def start(self) -> None:
        """Refresh every `interval` s: on the running asyncio loop (Jupyter) or a thread."""
        if self.running:
            return
        self._stop.clear()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._thread = threading.Thread(target=self._run_thread, name="labkit-dashboard",
                                            daemon=True)  # fmt: skip
            self._thread.start()
        else:
            self._task = loop.create_task(self._run_async())

    def stop(self) -> None:
        """Stop refreshing (idempotent); a thread is joined."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def running(self) -> bool:
        return (self._task is not None and not self._task.done()) or (
            self._thread is not None and self._thread.is_alive()
        )
