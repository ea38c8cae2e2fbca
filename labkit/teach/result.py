"""Result: rows (plain dicts) plus what produced them, shown as a labelled table.

Every number a notebook shows says where it came from: MEASURED on this machine, SIMULATED
(labkit's simulator of vLLM), PLANNED (vLLM's arithmetic, nothing runs) or REAL vLLM.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from labkit.vocab import KIND_COLORS, kind_label


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        return f"{v:.3g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


@dataclass(repr=False)
class Result:
    """Rows of one experiment, labelled with how they were obtained.

    Args:
        title: what the rows are.
        kind: "measured" | "sim" | "planned" | "vllm".
        rows: one dict per row, same keys in each (the table's columns).
        note: one line shown under the table (units, caveats).
        extra: anything a figure helper needs beside the rows.
    """

    title: str
    kind: str
    rows: list[dict[str, Any]]
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    @property
    def label(self) -> str:
        return kind_label(self.kind)

    def column(self, name: str) -> list[Any]:
        """One column as a list."""
        return [r.get(name) for r in self.rows]

    def columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        return cols

    def _repr_html_(self) -> str:
        color = KIND_COLORS.get(self.kind, "#444")
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns())
        body = "".join(
            "<tr>"
            + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in self.columns())
            + "</tr>"
            for r in self.rows
        )
        note = f"<div><small>{html.escape(self.note)}</small></div>" if self.note else ""
        return (
            f'<div><span style="background:{color};color:white;padding:2px 8px;'
            f'border-radius:3px;font-weight:bold">{html.escape(self.label)}</span> '
            f"<b>{html.escape(self.title)}</b><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>{note}</div>"
        )

    def __repr__(self) -> str:
        return str(self)

    def __str__(self) -> str:
        cols = self.columns()
        cells = [[_fmt(r.get(c, "")) for c in cols] for r in self.rows]
        widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
        lines = [
            f"[{self.label}] {self.title}",
            "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)),
        ]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)
