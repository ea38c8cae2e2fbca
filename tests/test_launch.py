"""labkit.engines.launch: an engine dies with the lab even when the lab is killed -9 (its
atexit and signal handlers never run), without preexec_fn in a threaded parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from labkit.engines.base import launched

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")


def _wait(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_the_launched_command_is_the_process_and_dies_with_its_parent() -> None:
    # A parent with threads (as a lab is) starts `sleep` through the launcher, prints its pid
    # once the launcher has exec'd, then waits to be killed.
    parent_src = textwrap.dedent("""
        import subprocess, sys, threading, time
        from labkit.engines.base import launched
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        p = subprocess.Popen(launched(["sleep", "61"]), start_new_session=True)
        import psutil
        while psutil.Process(p.pid).cmdline()[:1] != ["sleep"]:
            time.sleep(0.02)
        print(p.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_src], stdout=subprocess.PIPE,
                              text=True)
    try:
        child = int(parent.stdout.readline())
        proc = psutil.Process(child)
        assert proc.cmdline() == ["sleep", "61"]  # exec'd: same pid, the engine's argv
        assert os.getpgid(child) == child != os.getpgid(parent.pid)  # its own group
        parent.send_signal(signal.SIGKILL)  # no handler of the parent runs
        parent.wait(10)
        assert _wait(lambda: not psutil.pid_exists(child)
                     or psutil.Process(child).status() == psutil.STATUS_ZOMBIE)
    finally:
        parent.kill()


def test_the_launcher_starts_nothing_once_its_parent_is_gone() -> None:
    # The parent pid it is told is not its parent: as if the lab died before prctl.
    r = subprocess.run(launched(["echo", "started"])[:3] + ["1", "--", "echo", "started"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "started" not in r.stdout
