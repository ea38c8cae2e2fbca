"""The layer rules of docs/architecture.md, read from labkit's own imports (ast, module level
and inside functions; `if TYPE_CHECKING:` imports are for type checkers only and are left out).

    vocab                      imports nothing from labkit
    models, hardware           the facts: only vocab (and tokenizer, a leaf, for models)
    plan                       never engines, telemetry, viz, pd
    telemetry, engines         never viz (data flows engines -> telemetry -> views)
    pd.observer                runs inside vLLM: only the observer schema (and vocab)
    no import cycle among labkit's modules at module level
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "labkit"


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


def _imports(module: str) -> list[tuple[str, bool]]:
    """(labkit module imported, at module level?) for every import `module` makes at run time."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit_one(stmt, top)
                continue
            visit_one(child, top)

    def visit_one(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name, top) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            for a in node.names:  # `from labkit.plan import types` imports the submodule
                sub = f"{base}.{a.name}"
                found.append((sub if sub in MODULES else base, top))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(node, False)
        else:
            visit(node, top)

    visit(ast.parse(path.read_text()), True)
    return [(m, top) for m, top in found if m == "labkit" or m.startswith("labkit.")]


IMPORTS = {m: _imports(m) for m in MODULES}


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _violations(importers: tuple[str, ...], allowed) -> list[str]:
    return sorted(f"{m} imports {t}" for m in MODULES if _in(m, *importers)
                  for t, _ in IMPORTS[m] if not allowed(t))


def test_the_parser_sees_both_kinds_of_import() -> None:
    lab = dict(IMPORTS["labkit.lab"])
    assert lab.get("labkit.engines.base") is True  # module level
    assert lab.get("labkit.telemetry.live") is False  # inside Lab.telemetry()
    assert len(MODULES) > 80


def test_vocab_imports_nothing_from_labkit() -> None:
    assert IMPORTS["labkit.vocab"] == []


def test_the_facts_import_only_the_vocabulary() -> None:
    assert _violations(("labkit.hardware",), lambda t: t == "labkit.vocab") == []
    assert _violations(("labkit.models",),
                       lambda t: t in ("labkit.vocab", "labkit.tokenizer")) == []
    assert IMPORTS["labkit.tokenizer"] == []


def test_plan_never_imports_engines_telemetry_views_or_pd() -> None:
    forbidden = ("labkit.engines", "labkit.telemetry", "labkit.viz", "labkit.pd")
    assert _violations(("labkit.plan",), lambda t: not _in(t, *forbidden)) == []


@pytest.mark.parametrize("layer", ["labkit.engines", "labkit.telemetry"])
def test_engines_and_telemetry_never_import_the_views(layer: str) -> None:
    assert _violations((layer,), lambda t: not _in(t, "labkit.viz")) == []


def test_the_observer_inside_vllm_imports_only_its_schema() -> None:
    allowed = ("labkit.telemetry.observer_schema", "labkit.telemetry", "labkit.vocab",
               "labkit.pd.observer_offload")
    assert _violations(("labkit.pd.observer", "labkit.pd.observer_offload"),
                       lambda t: t in allowed) == []


def test_no_import_cycle_at_module_level() -> None:
    edges = {m: {t for t, top in IMPORTS[m] if top and t in MODULES and t != m} for m in MODULES}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                walk(t, path + [t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            walk(m, [m])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)
