"""PD Lab: start prefill/decode-separated vLLM engines (or a faithful simulator) and watch them.

`import labkit` is cheap and silent: heavy modules (torch, vllm, pynvml, plotly) load lazily.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Lab", "replay", "__version__"]


def __getattr__(name: str):
    if name == "Lab":
        from labkit.lab import Lab

        return Lab
    if name == "replay":  # labkit.replay(path, speed=1.0): the module is callable
        import importlib

        return importlib.import_module("labkit.replay")
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
