"""The notebooks stay thin and clean: committed without outputs, short code cells, no
function or class definitions outside exercise cells, learning goals first."""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_LINES = 15
EXPECTED = [
    "01-setup-and-hardware",
    "02-kv-cache",
    "03-paged-attention",
    "04-chunked-prefill",
    "05-tensor-pipeline-parallel",
    "06-pd-disaggregation",
    "07-parameter-data-separation",
    "08-dashboard",
    "09-xpyd-routing",
]


def test_the_series_is_complete() -> None:
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_thin(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "Learning goals" in first.source, (
        "the first cell must be markdown with the learning goals"
    )
    assert any(
        "exercise" in c.metadata.get("tags", []) and "exercises.check_" in c.source
        for c in _code_cells(nb)
    ), "at least one exercise checked by labkit.teach.exercises"
    for i, cell in enumerate(_code_cells(nb)):
        where = f"{path.name} code cell {i}"
        assert not cell.get("outputs"), f"{where} has outputs committed"
        assert cell.get("execution_count") is None, f"{where} has an execution count"
        lines = [ln for ln in cell.source.splitlines() if ln.strip()]
        assert len(lines) <= MAX_LINES, f"{where} has {len(lines)} lines (max {MAX_LINES})"
        tree = ast.parse(cell.source)  # also: every cell is valid Python
        defs = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ]
        if "exercise" not in cell.metadata.get("tags", []):
            assert not defs, f"{where} defines {[d.name for d in defs]} outside an exercise cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_kernel_is_python3(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
