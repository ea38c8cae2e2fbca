"""labkit.bench.link_peak measures real links only: without a GPU it says so and exits 2."""
from __future__ import annotations

import pytest

from labkit.bench import link_peak


def test_refuses_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/gpu runs the measurement")
    assert link_peak.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
