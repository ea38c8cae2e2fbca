"""PD Lab: start prefill/decode-separated vLLM engines (or a faithful simulator) and watch them.

`import labkit` is cheap and silent: heavy modules (torch, vllm, pynvml, plotly) load lazily.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Lab", "replay", "recordings", "__version__"]


def __getattr__(name: str):
    if name == "Lab":
        from labkit.lab import Lab

        return Lab
    if name in ("replay", "recordings"):  # labkit.replay(path, speed=1.0); labkit.recordings()
        from labkit.telemetry import replay

        return getattr(replay, name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    """`dir(labkit)` shows the public names (they load lazily, so they are not globals yet)."""
    return sorted(__all__)
