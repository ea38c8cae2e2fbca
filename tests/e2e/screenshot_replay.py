"""Screenshot of the dashboard replaying a shipped REAL vLLM recording, served by Voila and
opened in headless Chromium (what docs/img/dashboard-real-h200x2-replay.png shows):

    python tests/e2e/screenshot_replay.py docs/img/dashboard-real-h200x2-replay.png
    python tests/e2e/screenshot_replay.py docs/img/dashboard-real-h200x4-tp2-replay.png real-h200x4-nixl-tp2
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "replay-real.ipynb"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(out: str, recording: str = "real-h200x2-nixl") -> None:
    sys.path.insert(0, str(HERE.parents[1]))
    from labkit.cli.lab import voila_args, voila_env

    port = free_port()
    voila = subprocess.Popen([*voila_args(NOTEBOOK, port), "--no-browser"], cwd=HERE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             start_new_session=True,  # voila_env: the offline template voila_args names
                             env={**voila_env(), "LABKIT_REPLAY": recording})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/api", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", timeout=120_000)
            page.wait_for_selector(".js-plotly-plot", timeout=120_000)
            time.sleep(8)  # the figures' first full sync
            page.screenshot(path=out, full_page=True)
            titles = page.evaluate(
                "Array.from(document.querySelectorAll('.gtitle')).map(e => e.textContent)")
            print("\n".join(titles))
            browser.close()
    finally:
        os.killpg(voila.pid, signal.SIGTERM)


if __name__ == "__main__":
    main(*sys.argv[1:3])
