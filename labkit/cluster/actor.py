"""EngineActor: the Ray actor that runs one engine on its node, as a subprocess.

The driver builds the engine's argument list (`vllm serve ...` or `python -m
labkit.engines.sim ...`, never a shell) and its few environment overrides; the actor, placed
in the engine's placement-group bundle, starts it in its own process group through
labkit.engines.launch (the engine dies with the actor's worker, even on SIGKILL), and
answers what the driver asks: the URL, /health, the log's tail, NVML samples of its node's
GPUs (None where NVML is absent), the engine's pids, and stop.

A plain class: `ray.remote(EngineActor)` in labkit/cluster/lab.py, so this module imports
no Ray and its logic is testable as is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

PYTHON = "{python}"  # first argument meaning "this node's interpreter"


class EngineActor:
    """One engine process on this node.

    Args:
        name: the engine's name ("prefill-0", ...), the log file's stem.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"labkit-{name}-"))
        self.log_path = self.run_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None
        self.headers: dict[str, str] = {}

    def node(self) -> dict[str, Any]:
        """Where this actor runs: Ray's node id and address, the GPUs Ray gave it, its pid."""
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "address": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid(),
                "run_dir": str(self.run_dir)}

    def free_port(self, host: str) -> int:
        """A port free on this node's `host` a moment ago (the engine binds it next)."""
        from labkit.plan.ports import free_port

        return free_port(host)

    def start(self, argv: list[str], env: dict[str, str], host: str, port: int) -> str:
        """Start the engine (`argv`, PYTHON standing for this node's interpreter); returns
        its URL. `env` overrides this worker's environment (the token travels here)."""
        from labkit.engines.base import launched

        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        cmd = [sys.executable if a == PYTHON else a for a in argv]
        full_env = {**os.environ, **env, "LABKIT_RUN_DIR": str(self.run_dir),
                    "PYTHONUNBUFFERED": "1"}
        root = str(Path(__file__).resolve().parents[2])  # labkit importable without install
        paths = [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p]
        full_env["PYTHONPATH"] = os.pathsep.join([*paths, root] if root not in paths else paths)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(launched(cmd), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=full_env,
                                         start_new_session=True, cwd=self.run_dir)
        finally:
            log.close()
        from labkit.auth import TOKEN_ENV, headers

        self.headers = headers(env.get(TOKEN_ENV) or "")
        self.url = f"http://{host}:{port}"
        return self.url

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Block until /health answers 200 (with the token); seconds waited. Raises
        RuntimeError with the log's tail if the engine exits or the time runs out."""
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up:\n"
                                   + "\n".join(self.log_tail(30)))
            try:
                if httpx.get(f"{self.url}/health", headers=self.headers,
                             timeout=2.0).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer /health within {timeout:g} s:\n"
                           + "\n".join(self.log_tail(30)))

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """The engine's process group on this node (the launcher execs the engine)."""
        if self.proc is None:
            return []
        from labkit.engines.base import pids_in_group

        return pids_in_group(self.proc.pid) if self.proc.poll() is None else []

    def log_tail(self, num_lines: int = 50) -> list[str]:
        """The last lines of the engine's log on this node."""
        try:
            with open(self.log_path, errors="replace") as f:
                return [line.rstrip("\n") for line in deque(f, maxlen=num_lines)]
        except OSError:
            return []

    def nvml_samples(self) -> list[dict[str, Any]] | None:
        """One sample per GPU of this node (index, name, used and total bytes), or None where
        NVML is absent (no driver, no pynvml: a CPU node with declared GPUs)."""
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - any failure means "no NVML here"
            return None
        try:
            out = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                name = pynvml.nvmlDeviceGetName(h)
                out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                            "used_bytes": int(mem.used), "total_bytes": int(mem.total),
                            "ts": time.time()})
            return out
        finally:
            pynvml.nvmlShutdown()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the engine's process group, SIGKILL after `timeout`; its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # anything the engine left in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.returncode
