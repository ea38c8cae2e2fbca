"""Live views of PD Lab (plotly FigureWidgets + ipywidgets), each a pure function of telemetry
state; `Dashboard` composes them. Exports load lazily: `import labkit.viz` pulls no plotly."""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Dashboard": "labkit.viz.dashboard",
    "BlockMapView": "labkit.viz.blocks",
    "StreamingView": "labkit.viz.streaming",
    "MemoryView": "labkit.viz.memory",
    "ScheduleView": "labkit.viz.schedule",
    "LatencyView": "labkit.viz.latency",
    "ControlPanel": "labkit.viz.controls",
    "StartupProgress": "labkit.viz.controls",
    "save_png": "labkit.viz.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'labkit.viz' has no attribute {name!r}")
    return getattr(import_module(module), name)
