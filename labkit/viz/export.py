"""Static PNGs of the views (docs, reports): plotly's own `write_image` where Kaleido >= 1 and
Chrome are installed, else Kaleido 0.2's bundled Chromium with a plotly.js v2 bundle
(`plotlyjs=` or $LABKIT_PLOTLYJS: Kaleido 0.2's Chromium cannot run plotly.js v3)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import plotly.graph_objects as go


def save_png(fig: go.Figure, path: str | Path, width: int = 1100, height: int | None = None,
             plotlyjs: str | None = None) -> Path:  # fmt: skip
    """Write `fig` as a PNG; RuntimeError when no renderer works here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height = height or int(fig.layout.height or 500)
    errors = []
    try:
        fig.write_image(str(path), width=width, height=height)
        return path
    except Exception as e:  # kaleido missing, too old, or no Chrome
        errors.append(f"write_image: {str(e).strip().splitlines()[0]}")
    js = plotlyjs or os.environ.get("LABKIT_PLOTLYJS")
    try:
        from kaleido.scopes.plotly import PlotlyScope

        scope = PlotlyScope(plotlyjs=js) if js else PlotlyScope()
        png = scope.transform(json.loads(fig.to_json()), format="png", width=width, height=height)
        path.write_bytes(png)
        return path
    except Exception as e:
        errors.append(f"kaleido 0.2: {str(e).strip().splitlines()[0]}")
    raise RuntimeError("no PNG renderer: " + "; ".join(errors))
