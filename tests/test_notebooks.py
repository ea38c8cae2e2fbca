"""Every notebook runs top to bottom on this CPU machine with the simulator (LABKIT_MODE=sim),
within a time limit each. Run alone: `python -m pytest tests/test_notebooks.py -q`
(marked `slow`: about a minute per notebook on two shared cores)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 180
NOTEBOOK_LIMIT_S = 240  # target ~90 s on two cores; the margin absorbs a busy machine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(NOTEBOOK_LIMIT_S + 120)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this environment: simulator, private run dir, this checkout.
    monkeypatch.setenv("LABKIT_MODE", "sim")
    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    )
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.monotonic()
    client.execute()  # raises CellExecutionError on the first failing cell
    took = time.monotonic() - start
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors, errors
    assert took < NOTEBOOK_LIMIT_S, f"{path.name} took {took:.0f} s (limit {NOTEBOOK_LIMIT_S} s)"
    # What ran says what it was: simulated on this machine, never silently "real". A cell may
    # show a REAL vLLM run only as a replay of a shipped recording, and must say so.
    sources = "".join(c.source for c in nb.cells if c.cell_type == "code")
    for c in nb.cells:
        for o in c.get("outputs", []):
            out = o.get("text", "") + str(o.get("data", {}).get("text/html", "")) + str(
                o.get("data", {}).get("text/plain", ""))
            if "REAL vLLM" in out:
                assert "REPLAY" in out and "labkit.replay(" in sources, out[:300]
    print(f"{path.name}: {took:.1f} s")
