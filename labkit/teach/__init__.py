"""The computations the notebooks show, so that the notebooks stay thin.

    kv_cost          measure (torch, CPU) generation with and without a KV cache
    paged_attention  a small paged attention checked against contiguous attention
    exercises        check_* functions: a learner's answer against labkit's own arithmetic
    experiments      simulated-cluster runs: chunk-size sweep, PD vs colocated
    placement        planner tables: TP/PP placement, per-GPU memory, the 4-GPU "KV on other GPUs" claim check
    live             what a running Lab (real vLLM or simulated) did, as tables
    session          a running Lab + its live dashboard (Apply restarts the lab)
    page             the dashboard page: a heartbeat from the page, replays with time controls

Every runner returns a `Result` (rows as dicts + whether they were measured, simulated or
planned). Modules load lazily: `import labkit.teach` pulls in neither torch nor plotly.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_SUBMODULES = (
    "kv_cost",
    "paged_attention",
    "exercises",
    "experiments",
    "placement",
    "live",
    "session",
    "page",
    "result",
)
_EXPORTS = {"Result": "labkit.teach.result"}

__all__ = sorted([*_SUBMODULES, *_EXPORTS])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return import_module(f"labkit.teach.{name}")
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'labkit.teach' has no attribute {name!r}")
