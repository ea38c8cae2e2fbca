"""SIGTERM to `labkit dashboard` leaves no process behind: Voila, the kernel a page opened
and the simulated lab that kernel started all end (loopback only; no browser: one GET of
the page makes Voila start a kernel and run the dashboard notebook)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("voila") is None,
                                reason="Voila is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_dashboard_leaves_no_process(tmp_path) -> None:
    port = _free_port()
    env = {**os.environ, "LABKIT_RUN_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "labkit.cli", "dashboard", "--no-browser",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=120)  # runs the notebook
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 2, "Voila and a kernel should be running"
        pids = {p.pid for p in tree} | {proc.pid}
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        left = []
        while time.monotonic() - t0 < 15:
            left = [p for p in pids if psutil.pid_exists(p)
                    and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
            if not left:
                break
            time.sleep(0.2)
        print(f"{len(pids)} processes, all gone {time.monotonic() - t0:.1f} s after SIGTERM")
        assert not left, [psutil.Process(p).cmdline()[:4] for p in left]
    finally:
        with_left = [p for p in psutil.process_iter() if p.pid != os.getpid()
                     and str(tmp_path) in " ".join(p.environ().get("LABKIT_RUN_DIR", "")
                                                  if _readable(p) else "")]
        for p in with_left:
            p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _readable(p: psutil.Process) -> bool:
    try:
        p.environ()
        return True
    except psutil.Error:
        return False
