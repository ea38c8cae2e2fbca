"""End to end: the dashboard notebook served by Voila, opened in headless Chromium.

What a learner runs: `labkit dashboard` serves `notebooks/*dashboard*.ipynb` with Voila; the
notebook starts a simulated PD pair (no GPU here), shows `labkit.viz.Dashboard` and sends
traffic. This test serves that notebook (or, until it exists, tests/e2e/dashboard-sim.ipynb,
which uses the same public API), loads the page in Chromium through Playwright, waits for the
plotly figures, reads their data from the page twice a few seconds apart and checks that the
KV blocks, the request timeline and the scheduler steps are drawn AND move. A screenshot of
the page lands in the test's tmp dir; with LABKIT_UPDATE_DOCS_IMG=1 also in docs/img/.

Needs Debian's chromium and the Python `playwright` package (`bash .ci/browser-setup`);
skipped with the reason when either is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]
E2E = Path(__file__).resolve().parent / "e2e"
DOCS_IMG = ROOT / "docs" / "img"
CHROMIUM = os.environ.get("LABKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1600, "height": 1000}
FIGURES = {  # view -> the start of its figure title (labkit/viz/*.py `title`)
    "blocks": "KV-cache block allocation",
    "streaming": "KV streaming prefill",
    "schedule": "Scheduled tokens per step",
    "memory": "GPU memory",
    "latency": "Latency",
}
# anywidget (plotly's FigureWidget front end) gives a model 2 s to import its ES module; past
# that, every later update to that figure is dropped in the browser.
ANYWIDGET_DEAD = "[anywidget] Failed to initialize model"
GANTT = ("queue", "prefill", "KV transfer", "decode")  # labkit/viz/streaming.py PHASES


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"chromium not found at {CHROMIUM} (bash .ci/browser-setup installs it)"
    for mod in ("playwright", "voila"):
        try:
            __import__(mod)
        except ImportError:
            return f"python package {mod!r} missing (bash .ci/browser-setup installs it)"
    return None


if (_why := _missing()) is not None:
    pytest.skip(_why, allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402

from labkit.cli.lab import voila_args, voila_env  # noqa: E402


# ---------------------------------------------------------------- the notebook and the server
def dashboard_notebook(tmp: Path) -> Path:
    """$LABKIT_E2E_NOTEBOOK, else the repository's dashboard notebook (what `labkit dashboard`
    serves), else the test's own."""
    if os.environ.get("LABKIT_E2E_NOTEBOOK"):
        return Path(os.environ["LABKIT_E2E_NOTEBOOK"]).resolve()
    from labkit.cli.lab import dashboard_notebook as served

    if served().exists():
        return served()
    nb = tmp / "dashboard-sim.ipynb"
    shutil.copy(E2E / "dashboard-sim.ipynb", nb)
    return nb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"voila exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"voila did not listen on {port} in {timeout:.0f} s")


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries `tag` (the server, its kernel, the lab's engines)."""
    needle = f"LABKIT_E2E_TAG={tag}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def stop_tree(proc: subprocess.Popen, tag: str) -> list[int]:
    """Stop voila (its kernel stops the lab); returns what outlived it by 15 s (then killed)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    deadline = time.monotonic() + 15
    while (left := tagged_pids(tag)) and time.monotonic() < deadline:
        time.sleep(0.3)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.fixture
def voila_url(tmp_path: Path) -> Iterator[str]:
    nb = dashboard_notebook(tmp_path)
    port = free_port()
    tag = uuid.uuid4().hex
    env = {**voila_env(tmp_path / "voila-template"), "LABKIT_MODE": "sim", "LABKIT_RUN_DIR": str(tmp_path / "runs"),
           "LABKIT_E2E_TAG": tag, "JUPYTER_PLATFORM_DIRS": "1",
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    log = tmp_path / "voila.log"
    # As `labkit dashboard` runs it, + tracebacks in the page.
    args = [*voila_args(nb, port), "--no-browser", "--VoilaConfiguration.show_tracebacks=True",
            *os.environ.get("LABKIT_E2E_VOILA_ARGS", "").split()]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=nb.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, proc, 30, log)
        yield f"http://127.0.0.1:{port}/"
    finally:
        left = stop_tree(proc, tag)
    assert not left, f"processes outlived the dashboard server: {left}"


# ---------------------------------------------------------------- reading the page
PROBE = (E2E / "probe.js").read_text()


def figures(page: Page) -> dict[str, dict[str, Any]]:
    """The dashboard's figures by view name, as the page's plotly.js holds them."""
    out: dict[str, dict[str, Any]] = {}
    for fig in page.evaluate(PROBE):
        title = re.sub(r"<[^>]+>", "", fig["title"])  # titles are set in <b>...</b>
        for view, start in FIGURES.items():
            if title.startswith(start) and view not in out:  # the live run's (frozen ones follow)
                out[view] = fig
    return out


def activity(figs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The numbers that must be non-zero once traffic flows, and must move while it does."""
    blocks = [t for t in figs["blocks"]["traces"] if t["type"] == "heatmap"]
    gantt = [t for t in figs["streaming"]["traces"] if t["name"] in GANTT]
    steps = [t for t in figs["schedule"]["traces"] if t["type"] == "bar"]
    return {
        "cells": sum(t["n"] for t in blocks),
        "used_blocks": sum(t["used"] for t in blocks),
        "block_digest": tuple(t["digest"] for t in blocks),
        "gantt_bars": sum(t["n"] for t in gantt),
        "requests": sorted({y for t in gantt for y in t["y"]}),
        "step_bars": sum(t["n"] for t in steps),
        "last_step": max((float(x) for t in steps for x in t["x"]), default=-1.0),
        "latency_points": sum(t["n"] for t in figs["latency"]["traces"]),
    }


def wait_for(page: Page, ok: Any, timeout: float, what: str, errors: list[str],
             console: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Poll the page's figures until `ok(figures)`; fail early on a dead widget runtime."""
    deadline = time.monotonic() + timeout
    figs: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        figs = figures(page)
        if len(figs) == len(FIGURES) and ok(figs):
            return figs
        if any(ANYWIDGET_DEAD in e for e in errors) and len(figs) == len(FIGURES):
            break  # the figures are drawn but will never receive an update
        page.wait_for_timeout(500)
    plots = page.evaluate(PROBE)
    hints = []
    if any(ANYWIDGET_DEAD in e for e in errors):
        hints.append("plotly's widget front end missed anywidget's 2 s start-up limit: "
                     "those figures never take an update")
    if plots and not any(f["title"] for f in plots):
        hints.append(f"{len(plots)} plotly figures are drawn without title or traces: their "
                     "state was not synced before the page connected")
    body = page.evaluate("document.body.innerText")[-1500:]
    raise AssertionError(f"timed out waiting for {what}; figures found: {sorted(figs)}; "
                         f"{'; '.join(hints)}; page errors: {errors[:3]}; console errors: "
                         f"{(console or [])[:5]}\npage text:\n{body}")


def save_docs_images(page: Page, shot: Path) -> None:
    """README pictures (only with LABKIT_UPDATE_DOCS_IMG=1: tests leave the tree alone)."""
    if os.environ.get("LABKIT_UPDATE_DOCS_IMG") != "1":
        return
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, DOCS_IMG / "dashboard-page.png")
    dashboard = page.locator(".widget-vbox:has(.js-plotly-plot)").first  # the outermost box
    dashboard.screenshot(path=str(DOCS_IMG / "dashboard-sim.png"))
    plots = page.locator(".js-plotly-plot")
    for i in range(plots.count()):
        title = plots.nth(i).evaluate("gd => (gd.layout.title || {}).text || ''")
        for view in ("blocks", "streaming", "schedule"):
            if title.startswith(FIGURES[view]):
                plots.nth(i).screenshot(path=str(DOCS_IMG / f"dashboard-{view}.png"))


# ---------------------------------------------------------------- the test
def test_dashboard_renders_and_updates_in_chromium(voila_url: str, tmp_path: Path) -> None:
    t0 = time.monotonic()
    errors: list[str] = []
    console: list[str] = []  # console errors: hints only (the widget manager logs benign ones)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and console.append(m.text))
            page.goto(voila_url, wait_until="domcontentloaded", timeout=60_000)
            figs = wait_for(page, lambda f: True, 70, "the five live figures", errors, console)
            for view, fig in figs.items():
                assert "SIMULATED" in fig["title"], (view, fig["title"])
                assert fig["width"] > 200 and fig["height"] > 150, (view, fig["width"], fig["height"])
            assert "SIMULATED" in page.inner_text("body")
            figs = wait_for(page, lambda f: (a := activity(f))["used_blocks"] > 0
                            and a["gantt_bars"] > 0 and a["step_bars"] > 0, 40,
                            "blocks in use, timeline bars and scheduler steps", errors, console)
            first = activity(figs)
            page.wait_for_timeout(4000)
            second = activity(figures(page))
            shot = tmp_path / "dashboard-sim.png"
            tall = page.evaluate("Math.max(...Array.from(document.querySelectorAll('body, body *'),"
                                 " e => e.scrollHeight))")
            page.set_viewport_size({"width": VIEWPORT["width"], "height": min(int(tall), 4000)})
            page.wait_for_timeout(1000)  # plotly re-lays out on resize
            page.screenshot(path=str(shot), full_page=True)
            save_docs_images(page, shot)
        finally:
            browser.close()
    print(f"\nscreenshot: {shot}\nfirst: {first}\nsecond: {second}\n"
          f"page errors: {errors}\nbrowser part: {time.monotonic() - t0:.1f} s")
    assert first["cells"] > 0 and first["used_blocks"] > 0
    assert second["last_step"] > first["last_step"], "the scheduler-step bars did not advance"
    assert second["requests"] != first["requests"] or second["gantt_bars"] > first["gantt_bars"], \
        "the request timeline did not change"
    assert second["block_digest"] != first["block_digest"], "the block map did not change"
    assert second["latency_points"] > 0, "no TTFT / ITL point drawn"
    assert shot.stat().st_size > 20_000
    assert not errors, f"uncaught errors in the page: {errors}"
