"""Shared look of the views: kind labels (so a simulated figure is never taken for a real
one), request colours, block-state colours, byte formatting."""
from __future__ import annotations

import zlib
from collections.abc import Iterable

from labkit.vocab import KIND_COLORS, kind_label  # noqa: F401  (the views' one import of them)

# Colours of the block states (labkit.vocab BLOCK_FREE, BLOCK_CACHED, BLOCK_IN_USE, BLOCK_SHARED).
STATE_COLORS = ("#eeeeee", "#a5d8ff", "#2f9e44", "#7048e8")

# Request colours: distinct hues, none grey and none near the block states' green (in use),
# violet (shared), light blue (cached) or grey (free), so a request's blocks stand out.
REQUEST_COLORS = (
    "#1c7ed6", "#f76707", "#e03131", "#ae3ec9", "#fab005",
    "#8c564b", "#15aabf", "#f783ac", "#2b2d42",
)  # fmt: skip


def kinds_label(kinds: Iterable[str]) -> str:
    """One label for a set of kinds (a mixed set lists each)."""
    uniq = sorted(set(kinds))
    return " + ".join(kind_label(k) for k in uniq) if uniq else "NO DATA"


def titled(title: str, kinds: Iterable[str]) -> str:
    """A figure title that always carries the kind, on a line of its own in the kind's colour
    (the badge), so neither a long title nor a narrow cell puts one on the other:
    'KV-cache blocks' / '■ SIMULATED'."""
    return f"<b>{title}</b><br>{badge(kinds)}"


def badge(kinds: Iterable[str]) -> str:
    """The kind as the title's second line: bold, in the kind's colour (grey when mixed)."""
    kinds = sorted(set(kinds))
    color = KIND_COLORS.get(kinds[0], "#444") if len(kinds) == 1 else "#444"
    return f'<span style="font-size:12px;color:{color}"><b>■ {kinds_label(kinds)}</b></span>'


def request_color(req_id: str) -> str:
    """A stable colour per request id (same colour in every view)."""
    return REQUEST_COLORS[zlib.crc32(req_id.encode()) % len(REQUEST_COLORS)]


def request_color_index(req_id: str) -> int:
    return zlib.crc32(req_id.encode()) % len(REQUEST_COLORS)


def short_req(req_id: str, n: int = 10) -> str:
    """Request ids are long ('cmpl-3f2a...-0'); keep the tail that differs."""
    return req_id if len(req_id) <= n else "…" + req_id[-(n - 1) :]


def fmt_bytes(num_bytes: float) -> str:
    """'4.0 MiB', '1.65 GiB', '512 B': a size a learner reads at a glance."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= size:
            v = num_bytes / size
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{num_bytes:.0f} B"


def gib(num_bytes: float) -> float:
    return num_bytes / 2**30
