"""GPU tests: real vLLM 0.26 on NVIDIA GPUs (the lent GPU machine). Skipped elsewhere."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def _gpu_and_vllm() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not importable"
    from labkit.telemetry import nvml

    if not nvml.available():
        return "no NVIDIA GPU (NVML)"
    return None


_WHY = _gpu_and_vllm()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _WHY is None:
        return
    skip = pytest.mark.skip(reason=_WHY)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
