"""Screenshots of every view, taken in headless Chromium, and a check that their text fits.

Each view's figure (labkit/viz) is drawn by plotly.js in a box of a given width, as a
JupyterLab cell (~360 px) or the Voila dashboard (1400 px) gives it, and photographed. The
same page is measured: the title, the kind label and every annotation (subplot titles, notes)
must lie inside the figure and not on each other; a problem is printed and makes the exit
status 1.

    python tests/e2e/view_shots.py docs/img               # REAL replay + a simulated lab
    python tests/e2e/view_shots.py /tmp/shots --widths 360 1400 --no-sim

Sources: `real` replays the shipped REAL recording real-h200x2-nixl to its end (the views
say REAL vLLM + REPLAY); `sim` starts a simulated PD lab (labkit.Lab(mode="sim")), sends the
demo workload's first prompts through its proxy for a few seconds and draws what came (the
views say SIMULATED); `sim-8-engines` (the block map only) folds 4 synthetic PD pairs
(labkit/viz/synthetic.py), its grid of 8 maps. Files: `view-<view>-<source>.png` at the widest width, and
`view-<view>-<source>-<width>.png` for each narrower one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHROMIUM = os.environ.get("LABKIT_CHROMIUM") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
VIEWS = ("blocks", "streaming", "schedule", "memory", "latency", "offload")

# Boxes of the figure's text, from the page: the title, each annotation (the kind label is
# part of the title), and the figure's own width.
MEASURE = """() => {
  const svg = document.querySelector('.main-svg');
  const box = svg.getBoundingClientRect();
  const rel = (r) => ({x0: r.left - box.left, x1: r.right - box.left,
                       y0: r.top - box.top, y1: r.bottom - box.top});
  const out = [];
  for (const t of document.querySelectorAll('.gtitle, .xtitle, .ytitle'))
    out.push({what: 'title', text: t.textContent, ...rel(t.getBoundingClientRect())});
  for (const a of document.querySelectorAll('.annotation-text-g')) {
    const r = a.getBoundingClientRect();
    if (r.width > 0) out.push({what: 'annotation', text: a.textContent, ...rel(r)});
  }
  return {width: box.width, height: box.height, boxes: out};
}"""


def plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def page_html(fig_json: str, width: int, js: str) -> str:
    """One figure in a box `width` px wide; plotly sizes it to the box (autosize)."""
    return (f"<html><head><meta charset='utf-8'><script>{js}</script></head>"
            f"<body style='margin:0;background:white'>"
            f"<div id='box' style='width:{width}px'><div id='fig'></div></div><script>"
            f"const f = {fig_json}; f.layout.width = undefined;"
            f"Plotly.newPlot('fig', f.data, f.layout, {{responsive: true}})"
            f".then(() => {{ window.drawn = true; }});</script></body></html>")


def problems(m: dict[str, Any]) -> list[str]:
    """Text outside the figure, or two texts on each other."""
    out, boxes, w = [], m["boxes"], m["width"]
    for b in boxes:
        if b["x0"] < -0.5 or b["x1"] > w + 0.5 or b["y0"] < -0.5 or b["y1"] > m["height"] + 0.5:
            out.append(f"outside the figure ({b['x0']:.0f}..{b['x1']:.0f} of {w:.0f} px): "
                       f"{b['text'][:60]!r}")
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            dx = min(a["x1"], b["x1"]) - max(a["x0"], b["x0"])
            dy = min(a["y1"], b["y1"]) - max(a["y0"], b["y0"])
            if dx > 1 and dy > 1:
                out.append(f"overlap: {a['text'][:40]!r} and {b['text'][:40]!r}")
    return out


def fold_replay(name: str) -> Any:
    """A Dashboard that has played the shipped recording `name` to its end."""
    from labkit.telemetry.replay import Replay
    from labkit.viz.dashboard import Dashboard

    rp = Replay(ROOT / "labkit" / "data" / "recordings" / f"{name}.lkrec", speed=None)
    dash = Dashboard(rp, autoplay=True)
    while not rp.done:
        dash.refresh()
    dash.refresh()
    return dash


def fold_sim(seconds: float = 12.0) -> Any:
    """A Dashboard over a simulated PD lab that served the demo workload's first prompts."""
    from labkit.bench.record_session import demo_prompts
    from labkit.lab import Lab
    from labkit.viz.dashboard import Dashboard

    run = Path(tempfile.mkdtemp(prefix="labkit-shots-"))
    lab = Lab(mode="sim", model="lab-1b", run_dir=run)
    lab.start(progress=False)
    try:
        dash = Dashboard(lab.telemetry(), config=lab.config)
        prompts = [p for p in demo_prompts(lab.plan.model.vocab_size, 4096) if p[0] < seconds - 3]

        def drive() -> None:
            t0 = time.monotonic()
            for at, ids, max_tokens in prompts:
                time.sleep(max(0.0, at - (time.monotonic() - t0)))
                threading.Thread(target=lab.complete, args=(ids,), daemon=True,
                                 kwargs={"max_tokens": max_tokens}).start()

        threading.Thread(target=drive, daemon=True).start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            dash.refresh()
            time.sleep(0.25)
        dash.refresh()
        return dash
    finally:
        lab.stop()


def fold_engines(num_pairs: int = 4, polls: int = 6) -> Any:
    """The block map of 2 x `num_pairs` simulated engines (synthetic PD pairs,
    labkit/viz/synthetic.py, 100k and 512 blocks by turns): its grid of maps and their titles."""
    from types import SimpleNamespace

    from labkit.telemetry.observer_schema import ObserverBatch
    from labkit.viz.blocks import BlockMapView
    from labkit.viz.blockstate import BlockMapState
    from labkit.viz.synthetic import SyntheticSource

    pairs = [SyntheticSource(num_blocks=100_000 if i % 2 == 0 else 512, seed=i, arrival_p=0.9)
             for i in range(num_pairs)]
    state = BlockMapState({f"{r}-{i}": (r, "sim", src.num_blocks, 16)
                           for i, src in enumerate(pairs) for r in ("prefill", "decode")})
    for _ in range(polls):
        for i, src in enumerate(pairs):
            for b in src.poll().observer:
                state.apply(ObserverBatch(b.engine_id.replace("-0", f"-{i}"), b.role, b.kind,
                                          b.ts, b.events))
    view = BlockMapView(state)
    view.update()
    return SimpleNamespace(views={"blocks": view})


def shoot(dash: Any, source: str, out: Path, widths: list[int]) -> list[str]:
    """Photograph and measure each view of `dash` at each width; returns the problems."""
    from playwright.sync_api import sync_playwright

    js = plotly_js()
    found: list[str] = []
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as tmp:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        for name in VIEWS:
            view = dash.views.get(name)
            if view is None:
                continue
            fig_json = view.figure.to_json()
            for width in widths:
                page = browser.new_page(viewport={"width": width + 40, "height": 900})
                html = Path(tmp) / f"{name}-{width}.html"
                html.write_text(page_html(fig_json, width, js))
                page.goto(html.as_uri())
                page.wait_for_function("window.drawn === true", timeout=30_000)
                m = page.evaluate(MEASURE)
                suffix = "" if width == max(widths) else f"-{width}"
                page.locator("#box").screenshot(path=str(out / f"view-{name}-{source}{suffix}.png"))
                for p in problems(m):
                    found.append(f"{name} ({source}, {width} px): {p}")
                if abs(m["width"] - width) > 1:
                    found.append(f"{name} ({source}, {width} px): figure {m['width']:.0f} px wide, "
                                 "not its box's width")
                page.close()
        browser.close()
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--widths", type=int, nargs="+", default=[360, 1400])
    ap.add_argument("--recording", default="real-h200x2-nixl")
    ap.add_argument("--no-sim", action="store_true", help="only the REAL replay")
    ap.add_argument("--no-real", action="store_true", help="only the simulated lab")
    ap.add_argument("--no-engines8", action="store_true",
                    help="not the block map of 8 simulated engines (synthetic, no lab)")
    ap.add_argument("--json", action="store_true", help="print the problems as JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    args.out.mkdir(parents=True, exist_ok=True)
    found: list[str] = []
    if not args.no_real:
        found += shoot(fold_replay(args.recording), "real-replay", args.out, args.widths)
    if not args.no_sim:
        found += shoot(fold_sim(), "sim", args.out, args.widths)
    if not args.no_engines8:
        found += shoot(fold_engines(4), "sim-8-engines", args.out, args.widths)
    print(json.dumps(found, indent=1) if args.json else "\n".join(found) or "no text out of place")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
