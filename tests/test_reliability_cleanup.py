"""Every way a lab ends leaves no engine or proxy process behind.

Lab.stop(), the context manager (also when its body raises), SIGINT to a foreground
`labkit up`, `labkit up --detach` + `labkit down`, and SIGKILL of the Python process that
started the lab (PR_SET_PDEATHSIG). Processes are found by the environment tag of
labkit.faults (it survives re-parenting) and by the process groups in /proc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import labkit
from labkit import faults

GONE_WITHIN = 10.0  # seconds; SIGTERM, then the group's SIGKILL, fit well inside


@pytest.fixture
def tag() -> str:
    t = faults.tag_children()
    yield t
    left = faults.tagged_pids(t)
    for pid in left:  # never leave our own processes to the next test, even on failure
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert left == [], f"processes left: {[(p, faults.cmdline(p)) for p in left]}"


def _lab(tmp_path: Path) -> labkit.Lab:
    return labkit.Lab(
        mode="sim",
        model="lab-1b",
        num_gpu_blocks=256,
        speed=0,
        observe=False,
        run_dir=tmp_path / "run",
    )


def _env(tmp_path: Path) -> dict[str, str]:
    """A child environment whose labs live under tmp_path (`labkit down` sees only those)."""
    return {**os.environ, "LABKIT_RUN_DIR": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass  # being written
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        time.sleep(0.1)
    raise TimeoutError(path)


def test_stop_leaves_nothing(tmp_path, tag) -> None:
    lab = _lab(tmp_path).start(progress=False)
    groups = faults.lab_groups(lab)
    assert set(groups) == {"prefill", "decode", "proxy"} and len(set(groups.values())) == 3
    assert faults.pids_in_groups(groups.values())
    t0 = time.monotonic()
    lab.stop()
    stop_s = time.monotonic() - t0
    assert faults.pids_in_groups(groups.values()) == [], "stop() returned with pids alive"
    assert faults.tagged_pids(tag) == []
    print(f"\nLab.stop(): {stop_s:.2f} s")


def test_context_manager_leaves_nothing_even_when_the_body_raises(tmp_path, tag) -> None:
    with pytest.raises(RuntimeError, match="learner's bug"):
        with _lab(tmp_path) as lab:
            groups = faults.lab_groups(lab)
            assert lab.complete("hi", max_tokens=2)["choices"]
            raise RuntimeError("a learner's bug in the cell")
    assert faults.pids_in_groups(groups.values()) == []
    assert faults.tagged_pids(tag) == []


def test_sigint_to_foreground_labkit_up(tmp_path, tag) -> None:
    run = tmp_path / "runs" / "fg"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "labkit.cli",
            "up",
            "--sim",
            "--speed",
            "0",
            "--num-gpu-blocks",
            "256",
            "--run-dir",
            str(run),
        ],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        st = _wait_file(run / "state.json", proc)
        groups = [e["pgid"] for e in st["engines"].values()]
        assert len(groups) == 3 and httpx.get(f"{st['url']}/health", timeout=5).status_code == 200
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, proc.stdout.read().decode(errors="replace")
    faults.wait_groups_gone(groups, timeout=GONE_WITHIN)
    assert not (run / "state.json").exists()
    assert faults.tagged_pids(tag) == []


def test_detach_then_down(tmp_path, tag) -> None:
    env = _env(tmp_path)
    cli = [sys.executable, "-m", "labkit.cli"]
    up = subprocess.run(
        [*cli, "up", "--sim", "--speed", "0", "--num-gpu-blocks", "256", "--detach"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert up.returncode == 0, up.stderr
    states = list((tmp_path / "runs").glob("*/state.json"))
    assert len(states) == 1
    st = json.loads(states[0].read_text())
    groups = [e["pgid"] for e in st["engines"].values()] + [st["supervisor_pid"]]
    status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=30)
    assert status.stdout.count("[healthy]") == 4, status.stdout  # OpenAI URL + 3 processes
    t0 = time.monotonic()
    down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=60)
    down_s = time.monotonic() - t0
    assert down.returncode == 0 and "stopped 1 lab" in down.stdout, down.stdout + down.stderr
    faults.wait_groups_gone(groups, timeout=GONE_WITHIN)
    assert faults.tagged_pids(tag) == []
    again = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=30)
    assert "no lab is running" in again.stdout
    print(f"\nlabkit down: {down_s:.2f} s (interpreter start included)")


PARENT = """
import sys, time, labkit
lab = labkit.Lab(mode="sim", model="lab-1b", num_gpu_blocks=256, speed=0, observe=False,
                 run_dir=sys.argv[1]).start(progress=False)
print(" ".join(str(h.pgid) for h in [*lab.engines.values(), lab.proxy]), flush=True)
time.sleep(600)
"""


def test_parent_killed_with_sigkill(tmp_path, tag) -> None:
    """No atexit, no signal handler runs: PR_SET_PDEATHSIG alone must end the children."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "run")],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        groups = [int(g) for g in proc.stdout.readline().split()]
        assert len(groups) == 3 and faults.pids_in_groups(groups)
    finally:
        proc.kill()  # SIGKILL
        proc.wait(10)
    gone_s = faults.wait_groups_gone(groups, timeout=GONE_WITHIN)
    assert faults.tagged_pids(tag) == []
    print(f"\nparent SIGKILL: children gone after {gone_s:.2f} s")
