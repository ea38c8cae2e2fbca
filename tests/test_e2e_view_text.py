"""Every view drawn by plotly.js in Chromium, in a 360 px box (a JupyterLab cell) and a
1400 px one (the Voila dashboard): the title, its kind line, the subplot titles and the notes
lie inside the figure and not on each other, and the figure is as wide as its box
(tests/e2e/view_shots.py measures the page; the REAL replay, the longest labels)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CHROMIUM = os.environ.get("LABKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"chromium not found at {CHROMIUM}", allow_module_level=True)
pytest.importorskip("playwright")


def test_view_text_fits_at_360_and_1400_px(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
    import view_shots

    status = view_shots.main([str(tmp_path), "--no-sim", "--widths", "360", "1400"])
    out = capsys.readouterr().out
    assert status == 0, out
    shots = sorted(p.name for p in tmp_path.glob("view-*.png"))
    assert "view-blocks-real-replay-360.png" in shots and "view-streaming-real-replay.png" in shots
