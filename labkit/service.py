"""`labkit up / status / down`: a lab that outlives one command, and nothing left behind.

`labkit up` runs in the foreground: the pair and the proxy live until Ctrl-C (or SIGTERM), then
everything stops. `labkit up --detach` starts that same foreground command as a supervisor in
its own session, waits until it is ready and returns; the supervisor writes `state.json` in its
run directory. `labkit status` reads those files and asks each endpoint for /health;
`labkit down` signals the supervisors, which stop their engines (whole process groups); any
engine group still alive after that is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from labkit.engines.base import pids_in_group
from labkit.vocab import run_root

STATE = "state.json"


def _identity(pid: int) -> dict[str, Any] | None:
    """A process's start time and command line (psutil), or None when it is gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return {"create_time": proc.create_time(), "cmdline": proc.cmdline()}
    except (psutil.Error, OSError):
        return None


def _is_supervisor(st: dict[str, Any]) -> bool:
    """Whether the pid in a state file is still the process that wrote it (`labkit up`'s
    supervisor, or a notebook's kernel): the same start time. A SIGKILLed supervisor leaves a
    state file whose pid the system may give to any other process."""
    try:
        pid = int(st["supervisor_pid"])
    except (KeyError, TypeError, ValueError):
        return False
    found = _identity(pid)
    if found is None:
        return False
    started = st.get("supervisor_started")
    if isinstance(started, int | float):
        return abs(found["create_time"] - started) <= 0.05
    written = st.get("started")  # an older state file: its writer started before writing it
    return not isinstance(written, int | float) or found["create_time"] <= written + 1.0


def lab_state(lab: Any) -> dict[str, Any]:
    """What `status` and `down` need to find a running lab again."""
    me = _identity(os.getpid()) or {}
    return {
        "supervisor_pid": os.getpid(),
        "supervisor_started": me.get("create_time"),
        "run_dir": str(lab.run_dir),
        "kind": lab.kind,
        "describe": lab.describe(),
        "url": lab.url,
        "proxy": lab.proxy.base_url if lab.proxy else None,
        "engines": {name: {"url": e.base_url, "role": e.role, "pgid": e.pgid,
                           "log": str(e.log_path)}
                    for name, e in {**lab.engines, **({"proxy": lab.proxy} if lab.proxy else {})}.items()},
        "started": time.time(),
    }


def run_foreground(lab: Any, *, state_dir: Path | None = None, quiet: bool = False) -> int:
    """Start `lab`, write its state, block until SIGINT/SIGTERM, then stop everything."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    state_path = (state_dir or lab.run_dir) / STATE
    try:
        lab.start(progress=not quiet)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(lab_state(lab), indent=2))
        if not quiet:
            print(format_state(lab_state(lab)), flush=True)
            print("Ctrl-C stops the lab.", flush=True)
        while not stop.wait(0.5):
            if not lab.is_running():
                dead = [n for n, e in lab.engines.items() if not e.is_alive()]
                print(f"engine(s) exited: {', '.join(dead)}; stopping the lab", file=sys.stderr)
                return 1
        return 0
    finally:
        lab.stop()
        try:
            state_path.unlink()
        except OSError:
            pass
        for s, h in old.items():
            signal.signal(s, h)


def up_detached(argv: list[str], run_dir: Path, timeout: float = 900.0) -> dict[str, Any]:
    """Start `labkit up --foreground ARGS` in its own session; wait for its state file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "supervisor.log", "wb")
    cmd = [sys.executable, "-m", "labkit.cli", "up", "--foreground", "--quiet",
           "--run-dir", str(run_dir), *argv]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    state_path = run_dir / STATE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state_path.exists():
            return json.loads(state_path.read_text())
        if proc.poll() is not None:
            tail = (run_dir / "supervisor.log").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError("the lab failed to start:\n" + "\n".join(tail))
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)
    raise TimeoutError(f"the lab was not ready after {timeout:.0f} s (log: {run_dir})")


def running_labs(clean: bool = True) -> list[dict[str, Any]]:
    """State of every lab whose supervisor is alive. A stale state file (its supervisor gone,
    or its pid now another process's) is removed when `clean`, and never reported."""
    out: list[dict[str, Any]] = []
    base = run_root()
    if not base.is_dir():
        return out
    for path in sorted(base.glob(f"*/{STATE}")):
        try:
            st = json.loads(path.read_text())
            assert isinstance(st, dict)
        except (OSError, ValueError, AssertionError):
            st = {}
        if st and _is_supervisor(st):
            out.append(st)
        elif clean:
            with contextlib.suppress(OSError):
                path.unlink()
    return out


def _gauges(url: str) -> dict[str, float]:
    """vLLM's scheduler gauges and progress counters from an engine's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    want = {"vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "vllm:num_requests_running",
            "vllm:prompt_tokens_total", "vllm:generation_tokens_total"}
    out: dict[str, float] = {}
    text = httpx.get(f"{url}/metrics", timeout=2).text
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name in want:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def health(url: str | None, engine: bool = False, window: float = 1.0) -> str:
    """healthy / unhealthy / down; for an engine also "wedged" when requests wait, its KV
    cache is full and no token was computed over `window` s (/health alone says 200 then)."""
    if not url:
        return "-"
    try:
        if httpx.get(f"{url}/health", timeout=2).status_code != 200:
            return "unhealthy"
        if not engine:
            return "healthy"
        first = _gauges(url)
        if first.get("vllm:num_requests_waiting", 0) <= 0:
            return "healthy"
        time.sleep(window)
        second = _gauges(url)
    except httpx.HTTPError:
        return "down"
    except ValueError:  # /metrics not Prometheus text
        return "healthy"
    progress = sum(second.get(k, 0) - first.get(k, 0)
                   for k in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"))
    waiting = int(second.get("vllm:num_requests_waiting", 0))
    usage = second.get("vllm:kv_cache_usage_perc", 0.0)
    if waiting > 0 and progress <= 0 and usage >= 0.99:
        return (f"WEDGED: KV cache {usage:.0%} full, {waiting} waiting, no token computed "
                f"in {window:g} s")
    return "healthy"


def format_state(st: dict[str, Any], with_health: bool = False) -> str:
    lines = [st["describe"], f"  run dir : {st['run_dir']}",
             f"  OpenAI  : {st['url']}/v1" + (f"  [{health(st['url'])}]" if with_health else "")]
    for name, e in st["engines"].items():
        h = f"  [{health(e['url'], engine=name != 'proxy')}]" if with_health else ""
        lines.append(f"  {name:<8}: {e['url']}  (log {e['log']}){h}")
    return "\n".join(lines)


def down(timeout: float = 30.0) -> int:
    """Stop every running lab; return how many were stopped."""
    labs = running_labs()
    for st in labs:
        if st.get("owner", "labkit up") != "labkit up":
            # a Lab inside a Python process (a notebook, the dashboard): stop its engine
            # groups, not the process (the kernel lives on; the lab sees its engines gone)
            for e in st["engines"].values():
                if e.get("pgid"):
                    try:
                        os.killpg(int(e["pgid"]), signal.SIGTERM)
                    except OSError:
                        pass
            Path(st["run_dir"], STATE).unlink(missing_ok=True)
            continue
        try:
            os.kill(int(st["supervisor_pid"]), signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    for st in labs:
        pid = int(st["supervisor_pid"])
        while st.get("owner", "labkit up") == "labkit up" and time.monotonic() < deadline \
                and _alive(pid):
            time.sleep(0.2)
        for e in st["engines"].values():  # belt and braces: no engine group survives `down`
            if e.get("pgid") and pids_in_group(int(e["pgid"])):
                try:
                    os.killpg(int(e["pgid"]), signal.SIGKILL)
                except OSError:
                    pass
    return len(labs)


def _alive(pid: int) -> bool:
    import psutil

    try:  # a zombie child of ours counts as gone
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True
