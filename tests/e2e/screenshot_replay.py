"""Screenshot of the dashboard replaying a shipped REAL vLLM recording, served by Voila, in
headless Chromium (docs/img/dashboard-real-h200x2-replay.png):
    python tests/e2e/screenshot_replay.py docs/img/dashboard-real-h200x2-replay.png
"""
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from labkit.cli_lab import voila_args

s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
p = subprocess.Popen(voila_args(str(HERE / "replay-real.ipynb"), port) + ["--no-browser"], cwd=str(HERE),
                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
try:
    for _ in range(120):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=60).status_code == 200: break
        except Exception: time.sleep(0.5)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        pg = b.new_page(viewport={"width": 1600, "height": 1000})
        pg.goto(f"http://127.0.0.1:{port}/", timeout=120000)
        pg.wait_for_selector(".js-plotly-plot", timeout=120000)
        time.sleep(8)
        pg.screenshot(path=sys.argv[1], full_page=True)
        print("titles:", pg.evaluate("Array.from(document.querySelectorAll('.gtitle')).map(e=>e.textContent)"))
        b.close()
finally:
    import os; import signal; os.killpg(p.pid, signal.SIGTERM)
