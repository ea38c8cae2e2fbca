"""End to end, as a learner uses the dashboard: in headless Chromium, on Voila (as `labkit
dashboard` serves it) and in JupyterLab at a narrow width, on a simulated lab.

- Each knob does what it says, seen on the page: steps capped at max_num_batched_tokens in
  the schedule; fp8 doubles the blocks per GPU and block size 32 halves them; TP=2 splits an
  engine's weights over two GPUs; PP=2 puts its stages on two GPUs.
- Three reloads leave one lab running (`labkit status`' list and the processes); a double
  click on Apply is one relaunch; a closed page's lab and kernel go.
- A shipped replay (3.1 s of a real 2 x H200 run) plays when the page shows it, stays drawn
  at its end, and pauses, plays and seeks from its time controls.

Needs Debian's chromium and the `playwright` package (`bash .ci/browser-setup`); skipped
with the reason when either is missing (tests/test_e2e_voila.py's checks).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]

import psutil  # noqa: E402
from playwright.sync_api import Page, sync_playwright  # noqa: E402
from test_e2e_voila import (  # noqa: E402  (skips this module where chromium/playwright are missing)
    CHROMIUM,
    CHROMIUM_FLAGS,
    FIGURES,
    PROBE,
    ROOT,
    figures,
    free_port,
    tagged_pids,
    wait_port,
)
from test_e2e_voila import stop_tree as stop_server  # noqa: E402

from labkit.cli.lab import CULL, dashboard_notebook, voila_args, voila_env  # noqa: E402

PAGE_TIMEOUT_S = 6  # the page heartbeat's timeout here (`labkit dashboard`: 90 s)
CULL_FAST = ["--MappingKernelManager.cull_idle_timeout=8",
             "--MappingKernelManager.cull_interval=3"]


# ---------------------------------------------------------------- servers
@contextmanager
def server(tmp: Path, kind: str, env_extra: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Voila serving the dashboard page as `labkit dashboard` does (its template, culling and
    page timeout, shortened), or JupyterLab on a folder holding the same notebook."""
    tag = uuid.uuid4().hex
    port = free_port()
    runs = tmp / "runs"
    env = {**voila_env(tmp / "voila-template"), "LABKIT_MODE": "sim", "LABKIT_RUN_DIR": str(runs),
           "LABKIT_E2E_TAG": tag, "JUPYTER_PLATFORM_DIRS": "1",
           "JUPYTER_RUNTIME_DIR": str(tmp / "jupyter-runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp / "jupyter-config"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           **(env_extra or {})}
    if kind == "voila":
        env["LABKIT_PAGE_TIMEOUT_S"] = str(PAGE_TIMEOUT_S)
        cull = [a for a in voila_args(dashboard_notebook(), port) if a not in CULL]
        args, cwd, url = [*cull, *CULL_FAST, "--no-browser"], dashboard_notebook().parent, "/"
    else:  # JupyterLab: no page timeout (a background tab must not stop the lab)
        env.pop("LABKIT_PAGE_TIMEOUT_S", None)
        (tmp / "lab").mkdir()
        shutil.copy(dashboard_notebook(), tmp / "lab" / "dashboard.ipynb")
        token = uuid.uuid4().hex  # loopback only, and a token all the same
        args = [sys.executable, "-m", "jupyterlab", f"--port={port}", "--ServerApp.ip=127.0.0.1",
                "--no-browser", f"--IdentityProvider.token={token}", "--allow-root",
                f"--ServerApp.root_dir={tmp / 'lab'}", "--LabApp.news_url=None",
                "--LabServerApp.extension_manager=readonly"]
        cwd, url = tmp / "lab", f"/lab/tree/dashboard.ipynb?token={token}"
    log = tmp / f"{kind}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, proc, 60, log)
        yield {"url": f"http://127.0.0.1:{port}{url}", "proc": proc, "tag": tag, "runs": runs,
               "log": log}
    finally:
        left = stop_server(proc, tag)
    assert not left, f"processes outlived the {kind} server: {left}"


def kernels(srv: dict[str, Any]) -> list[int]:
    try:
        kids = psutil.Process(srv["proc"].pid).children(recursive=True)
    except psutil.Error:
        return []
    return [p.pid for p in kids if "ipykernel" in " ".join(_cmdline(p))]


def lab_pids(srv: dict[str, Any]) -> list[int]:
    """The labs' processes (supervisor, engines, proxy): tagged, neither server nor kernel."""
    return sorted(set(tagged_pids(srv["tag"])) - {srv["proc"].pid, *kernels(srv)})


def running_labs(srv: dict[str, Any]) -> list[dict[str, Any]]:
    """What `labkit status` lists for this server's run dir."""
    out = subprocess.run([sys.executable, "-c", "import json, labkit.service as s; "
                          "print(json.dumps(s.running_labs()))"], capture_output=True, text=True,
                         env={**os.environ, "LABKIT_RUN_DIR": str(srv["runs"])}, timeout=30)
    import json

    return json.loads(out.stdout)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


# ---------------------------------------------------------------- the page
def wait_until(page: Page, ok: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := ok():
            return value
        page.wait_for_timeout(400)
    traces = {re.sub(r"<[^>]+>", "", f["title"])[:40]: [(t["type"], t["name"], t["n"])
                                                          for t in f["traces"]][:8]
              for f in page.evaluate(PROBE)[:6]}
    raise AssertionError(f"timed out ({timeout:.0f} s) waiting for {what}; figures: {traces}; "
                         f"page text:\n{page.evaluate('document.body.innerText')[-1500:]}")


def dashboard_figures(page: Page) -> dict[str, dict[str, Any]]:
    """The five views' figures by name (the live run's), or {} until all are drawn."""
    figs = figures(page)
    return figs if len(figs) >= len(FIGURES) else {}


def blocks_per_engine(figs: dict[str, Any]) -> dict[str, int]:
    """'prefill': 127 ... from the block map's titles ('<b>prefill</b> (...): 127 blocks')."""
    out = {}
    for note in figs["blocks"]["notes"]:
        if m := re.match(r"<b>(\w+)</b>[^<]*(?:<br>|: )([\d,]+) blocks", note):
            out[m[1]] = int(m[2].replace(",", ""))
    return out


def prefill_steps(figs: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(tokens of each prefill-chunk bar, the token budget line's values) of the schedule."""
    traces = figs["schedule"]["traces"]
    chunks = [int(float(y)) for t in traces if t["name"] == "prefill chunk" for y in t["y"]]
    budget = [int(float(y)) for t in traces if t["name"] == "token budget" for y in t["y"]]
    return chunks, budget


def weights_per_gpu(figs: dict[str, Any], engine: str) -> dict[str, float]:
    """GiB of `engine`'s weights on each GPU that holds some (the memory view's bars)."""
    for t in figs["memory"]["traces"]:
        if t["type"] == "bar" and t["name"] == f"{engine}: weights":
            return {x: float(y) for x, y in zip(t["x"], t["y"], strict=True) if float(y) > 0}
    return {}


def row(page: Page, label: str) -> Any:
    """The current dashboard's widget row labelled `label` (frozen earlier runs follow it)."""
    return page.locator(".widget-inline-hbox", has_text=label).first


def choose(page: Page, label: str, value: str) -> None:
    row(page, label).locator("select").select_option(label=value)


def button(page: Page, text: str) -> Any:
    """The current dashboard's button that says `text` (an icon beside it)."""
    return page.locator("button", has_text=re.compile(rf"^\s*{text}\s*$")).first


def type_int(page: Page, label: str, value: int) -> None:
    box = row(page, label).locator("input")
    box.fill(str(value))
    box.press("Enter")


def num_previous_runs(page: Page) -> int:
    """Frozen runs under 'Previous runs' (their accordion titles name the TP)."""
    return page.locator(".jupyter-widget-Collapse-header", has_text=" · TP ").count()


def apply(page: Page, double: bool = False, timeout: float = 60) -> dict[str, Any]:
    """Press Apply (twice, fast, with `double`) and wait for the relaunched lab's figures
    with traffic in them; asserts exactly one relaunch."""
    before = num_previous_runs(page)
    apply_button = button(page, "Apply")
    apply_button.dblclick() if double else apply_button.click()
    wait_until(page, lambda: num_previous_runs(page) > before, timeout, "the relaunch")
    figs = wait_until(page, lambda: (f := dashboard_figures(page)) and prefill_steps(f)[0] and f,
                      timeout, "the new lab's figures with prefill steps")
    page.wait_for_timeout(1500)
    assert num_previous_runs(page) == before + 1, "Apply relaunched more than once"
    return dashboard_figures(page) or figs


def toggle_every_knob(page: Page) -> list[str]:
    """Chunk + fp8, block size, TP, PP: each Apply and its visible effect. Returns notes."""
    notes = []
    figs = wait_until(page, lambda: (f := dashboard_figures(page)) and prefill_steps(f)[0] and f,
                      90, "the first lab's figures with prefill steps")
    base = blocks_per_engine(figs)
    assert base.get("prefill", 0) > 0, figs["blocks"]["notes"]
    (w_one,) = weights_per_gpu(figs, "prefill").values()  # TP=1, PP=1: all on one GPU

    type_int(page, "max_num_batched_tokens", 128)
    choose(page, "kv_cache_dtype", "fp8")
    figs = apply(page)
    chunks, budget = prefill_steps(figs)
    assert budget and set(budget) == {128}, budget
    assert max(chunks) == 128 and all(c <= 128 for c in chunks), chunks  # capped at the chunk
    fp8 = blocks_per_engine(figs)
    assert fp8["prefill"] >= 2 * base["prefill"] - 2, (base, fp8)  # fp8: twice the blocks
    notes.append(f"chunk 128: steps {sorted(set(chunks))[-3:]}; blocks {base} -> fp8 {fp8}")

    choose(page, "block_size", "32")
    figs = apply(page)
    b32 = blocks_per_engine(figs)
    assert abs(b32["prefill"] - fp8["prefill"] / 2) <= 2, (fp8, b32)  # twice the bytes a block
    notes.append(f"block size 32: {b32}")

    choose(page, "num_gpus (simulated)", "4")
    choose(page, "tensor_parallel_size", "2")
    figs = apply(page)
    w_tp = weights_per_gpu(figs, "prefill")
    assert len(w_tp) == 2 and len(weights_per_gpu(figs, "decode")) == 2, w_tp  # split per GPU
    assert all(abs(w - w_one / 2) < 0.1 * w_one for w in w_tp.values()), (w_one, w_tp)
    notes.append(f"TP=2: prefill weights per GPU {w_tp}")

    choose(page, "tensor_parallel_size", "1")
    choose(page, "pipeline_parallel_size", "2")
    # PP=2 prefills a prompt in one step (ExampleConnector, no chunking): max_model_len is
    # the chunk, so the panel refuses 600-token prompts with a 128-token chunk, and says so.
    button(page, "Apply").click()
    wait_until(page, lambda: "max_model_len is 128" in page.inner_text("body"), 20,
               "the panel to refuse prompts longer than max_model_len")
    type_int(page, "max_num_batched_tokens", 512)
    type_int(page, "prompt tokens", 300)
    figs = apply(page, double=True)  # a double click: one relaunch (apply() asserts it)
    w_pp = weights_per_gpu(figs, "prefill")
    assert len(w_pp) == 2 and set(w_pp) != set(weights_per_gpu(figs, "decode")), w_pp
    assert abs(sum(w_pp.values()) - w_one) < 0.1 * w_one, (w_one, w_pp)  # the layers, split
    notes.append(f"PP=2 (double click): prefill stages on {sorted(w_pp)}")
    return notes


def open_page(browser: Any, url: str, width: int, height: int = 1000) -> tuple[Page, list[str]]:
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    return page, errors


@contextmanager
def chromium() -> Iterator[Any]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


# ---------------------------------------------------------------- the tests
def test_voila_knobs_reloads_double_click_and_a_closed_page(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with server(tmp_path, "voila") as srv, chromium() as browser:
        page, errors = open_page(browser, srv["url"], 1400)
        wait_until(page, lambda: dashboard_figures(page), 90, "the dashboard")
        wait_until(page, lambda: len(running_labs(srv)) == 1, 30, "the first lab")
        one_lab = len(lab_pids(srv))
        for _ in range(3):
            page.reload(wait_until="domcontentloaded")
            wait_until(page, lambda: dashboard_figures(page), 90, "the dashboard after a reload")
        labs = wait_until(page, lambda: len(r := running_labs(srv)) == 1 and r, 30,
                          "one lab after three reloads")
        wait_until(page, lambda: len(lab_pids(srv)) == one_lab, 20,
                   f"{one_lab} lab processes after three reloads (have {lab_pids(srv)})")
        assert labs[0]["owner"] == "dashboard"
        notes = toggle_every_knob(page)
        assert len(running_labs(srv)) == 1
        t_close = time.monotonic()
        page.close()
        wait_until_gone = time.monotonic() + PAGE_TIMEOUT_S + 30
        while (lab_pids(srv) or kernels(srv)) and time.monotonic() < wait_until_gone:
            time.sleep(0.5)
        gone_s = time.monotonic() - t_close
        assert not lab_pids(srv), f"a closed page's lab still runs {gone_s:.0f} s later"
        assert not kernels(srv), f"a closed page's kernel still runs {gone_s:.0f} s later"
    print(f"\n{chr(10).join(notes)}\nclosed page: lab and kernel gone in {gone_s:.1f} s "
          f"(page timeout {PAGE_TIMEOUT_S} s, {' '.join(CULL_FAST)})\n"
          f"voila part: {time.monotonic() - t0:.0f} s")
    assert not errors, errors


def test_jupyterlab_narrow_knobs(tmp_path: Path) -> None:
    """The dashboard notebook run in JupyterLab in a 700 px window: figures take the cell's
    width (controls under them, nothing clipped) and every knob still shows its effect."""
    t0 = time.monotonic()
    with server(tmp_path, "lab") as srv, chromium() as browser:
        page, errors = open_page(browser, srv["url"], 700, 1100)
        page.locator(".jp-Notebook").wait_for(timeout=60_000)
        wait_until(page, lambda: "Idle" in page.inner_text("body"), 60, "the kernel")
        page.locator(".jp-Cell .jp-InputPrompt").first.click()
        page.keyboard.press("Escape")
        for _ in range(2):  # the two cells: markdown, the dashboard
            page.keyboard.press("Shift+Enter")
        figs = wait_until(page, lambda: dashboard_figures(page), 90, "the dashboard in JupyterLab")
        cell = page.locator(".jp-OutputArea-output").last.bounding_box()
        for view, fig in figs.items():
            assert fig["width"] >= 0.85 * cell["width"], (view, fig["width"], cell["width"])
        plots = page.locator(".js-plotly-plot").first.bounding_box()
        apply_box = button(page, "Apply").bounding_box()
        assert apply_box["y"] > plots["y"] + plots["height"], "controls should sit under the figures"
        assert apply_box["x"] + apply_box["width"] <= cell["x"] + cell["width"] + 1
        notes = toggle_every_knob(page)
        assert len(running_labs(srv)) == 1
    print(f"\n{chr(10).join(notes)}\njupyterlab part: {time.monotonic() - t0:.0f} s")
    assert not errors, errors


def test_voila_replay_plays_stays_drawn_pauses_and_seeks(tmp_path: Path) -> None:
    with server(tmp_path, "voila", {"LABKIT_DASHBOARD_REPLAY": "real-h200x2-nixl"}) as srv, \
            chromium() as browser:
        page, errors = open_page(browser, srv["url"], 1400)

        def clock() -> tuple[float, str]:
            text = page.locator(".labkit-replay-clock").inner_text()
            m = re.match(r"([\d.]+) / ([\d.]+) s · (\w+)", text)
            assert m, text
            return float(m[1]), m[3]

        def drawn() -> int:
            figs = dashboard_figures(page)
            return sum(t["n"] for t in figs["schedule"]["traces"] if t["type"] == "bar") if figs else 0

        wait_until(page, lambda: dashboard_figures(page), 60, "the replay's figures")
        assert "REPLAY" in page.inner_text("body")
        assert button(page, "Apply").is_disabled()
        assert "max_num_batched_tokens" in page.inner_text("body")  # the recorded config
        wait_until(page, lambda: clock()[1] == "ended", 30, "the 3.1 s replay to end")
        end = drawn()
        assert end > 0, "an ended replay must stay drawn"
        page.wait_for_timeout(2000)
        assert drawn() == end and clock()[1] == "ended"
        row(page, "speed").locator("select").select_option(label="0.25×")
        button(page, "replay").click()  # from the start, at a quarter speed
        wait_until(page, lambda: clock()[1] == "playing" and clock()[0] > 0.2, 10, "playing")
        button(page, "pause").click()
        at, state = wait_until(page, lambda: (c := clock())[1] == "paused" and c, 10, "paused")
        page.wait_for_timeout(1500)
        assert clock() == (at, "paused") and at < 2.5
        readout = row(page, "time (s)").locator(".widget-readout")
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("2.5")
        page.keyboard.press("Enter")
        wait_until(page, lambda: clock()[0] == 2.5, 10, "the seek to 2.5 s")
        button(page, "play").click()
        wait_until(page, lambda: clock()[1] == "ended", 15, "the end after the seek")
        assert drawn() > 0
    assert not errors, errors
