"""EngineHandle: what the lab knows of one running engine, real (vLLM) or simulated.

An engine is a subprocess in its own process group (`start_new_session=True`) that serves
vLLM's HTTP API on 127.0.0.1. Stopping signals the whole group (SIGTERM, then SIGKILL), so
vLLM's EngineCore and worker children go with the API server. It starts through
labkit.engines.launch (PR_SET_PDEATHSIG without preexec_fn), so it also dies with the lab.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx
import psutil

from labkit.plan.devices import engine_gpu_env
from labkit.plan.ports import free_port, port_is_free  # noqa: F401  (engines pick ports too)
from labkit.vocab import run_root

EngineKind = Literal["vllm", "sim"]
ProgressCallback = Callable[[str, dict[str, Any]], None]

_LIVE: weakref.WeakSet[EngineHandle] = weakref.WeakSet()


def launched(cmd: Sequence[str]) -> list[str]:
    """`cmd` run through labkit.engines.launch: it dies with this process (Linux)."""
    return [sys.executable, "-m", "labkit.engines.launch", str(os.getpid()), "--", *cmd]


class EngineStartError(RuntimeError):
    """The engine died or timed out while starting; `log_lines` says why."""

    def __init__(self, message: str, log_lines: Sequence[str] = ()) -> None:
        super().__init__(message + ("\n" + "\n".join(log_lines) if log_lines else ""))
        self.log_lines = list(log_lines)


class EngineHandle:
    """One engine process: its addresses, its process group, start / wait / stop.

    Subclasses say how to build the command (`command()`) and may watch the log
    (`_on_start`, `_start_errors`).
    """

    def __init__(
        self,
        name: str,
        *,
        role: str = "both",
        kind: EngineKind = "vllm",
        port: int | None = None,
        host: str = "127.0.0.1",
        gpus: Sequence[int] = (),
        log_path: str | Path | None = None,
        kv_events_endpoint: str | None = None,
        observer_endpoint: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.role = role
        self.kind: EngineKind = kind
        self.host = host
        self.port = port or free_port(host)
        self.gpus = list(gpus)
        run_dir = run_root() / "now"
        self.log_path = Path(log_path) if log_path else run_dir / f"{name}.log"
        self.kv_events_endpoint = kv_events_endpoint
        self.observer_endpoint = observer_endpoint
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self._log_fh: Any = None

    # ----------------------------------------------------------------- addresses
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def pgid(self) -> int | None:
        """The process group (== pid: the engine leads its own session)."""
        return self.proc.pid if self.proc else None

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else "stopped"
        return f"<{type(self).__name__} {self.name} {self.role} {self.base_url} pid={self.pid} {state}>"

    # ----------------------------------------------------------------- lifecycle
    def command(self) -> list[str]:
        """The argument list to start (no shell)."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """The parent's environment + `env`; with `gpus` (logical plan GPUs), a real engine
        gets the parent's CUDA_VISIBLE_DEVICES entries for them (labkit.plan.devices.engine_gpu_env)."""
        env = dict(os.environ)
        env.update(self.extra_env)
        if self.gpus and self.kind == "vllm":
            env.update(engine_gpu_env(self.gpus))
        elif self.gpus:  # simulated GPUs are no GPUs of this machine
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.gpus)
        return env

    def start(self, progress_callback: ProgressCallback | None = None) -> EngineHandle:
        """Start the process (returns at once; `wait_ready()` waits for it)."""
        if self.is_alive():
            return self
        if not port_is_free(self.host, self.port):  # fail before any process starts
            raise EngineStartError(
                f"{self.name}: port {self.port} on {self.host} is already in use; stop what "
                f"holds it (`labkit down`, or `ss -ltnp 'sport = :{self.port}'` names it) or "
                f"choose another port")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            launched(self.command()),
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,
        )
        self.started_at = time.time()
        _LIVE.add(self)
        self._on_start(progress_callback)
        return self

    def _on_start(self, progress_callback: ProgressCallback | None) -> None:
        """Hook for subclasses (log followers)."""

    def _start_errors(self) -> list[str]:
        """Lines that explain a failed start (subclasses read their log)."""
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-20:]
        except OSError:
            return []

    def health(self, timeout: float = 2.0) -> bool:
        try:
            from labkit.auth import headers

            return httpx.get(f"{self.base_url}/health", timeout=timeout,
                             headers=headers()).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 600.0, poll_s: float = 0.5) -> float:
        """Block until /health answers 200; return seconds since start.

        Raises:
            EngineStartError: the process exited, or `timeout` passed, with the log's errors.
        """
        if self.proc is None:
            raise EngineStartError(f"{self.name}: not started")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise EngineStartError(
                    f"{self.name}: exited with code {self.proc.returncode} while starting "
                    f"(log: {self.log_path})", self._start_errors())
            if self.health():
                self.ready_at = time.time()
                return self.ready_at - (self.started_at or self.ready_at)
            if time.monotonic() > deadline:
                raise EngineStartError(
                    f"{self.name}: not ready after {timeout:.0f} s (log: {self.log_path})",
                    self._start_errors())
            time.sleep(poll_s)

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def group_pids(self) -> list[int]:
        """Live pids in the engine's process group."""
        if self.pgid is None:
            return []
        return pids_in_group(self.pgid)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the process group, wait, then SIGKILL what is left; return the exit code."""
        if self.proc is None:
            return None
        pgid = self.pgid
        _signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + max(1.0, timeout / 4)
        while pids_in_group(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pids_in_group(pgid) or self.proc.poll() is None:
            _signal_group(pgid, signal.SIGKILL)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._close_log()
        _LIVE.discard(self)
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log_fh is not None:
            try:
                self._log_fh.close()
            finally:
                self._log_fh = None

    def __enter__(self) -> EngineHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LogFollowingEngine(EngineHandle):
    """An engine whose log says how its start-up goes (vLLM's, or the simulator's, which
    writes the same lines): a LogFollower turns it into staged progress and `startup`."""

    START_TIMEOUT_S = 600.0
    POLL_S = 0.5
    STOP_TIMEOUT_S = 20.0

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.follower: Any = None  # labkit.telemetry.vllm_log.LogFollower while starting

    def _on_start(self, progress_callback: ProgressCallback | None) -> None:
        from labkit.telemetry.vllm_log import LogFollower

        def on_event(ev: Any, state: Any) -> None:
            if progress_callback is not None:
                progress_callback(ev.stage, {**ev.detail, "engine": self.name, "kind": self.kind,
                                             "simulated": self.kind == "sim",
                                             "progress": state.progress})

        self.follower = LogFollower(self.log_path, on_event).start()

    @property
    def startup(self) -> Any:
        """What the log said so far (a vllm_log.StartupState: stages, GiB, KV tokens, errors)."""
        from labkit.telemetry.vllm_log import StartupState, parse_log

        if self.follower is not None:
            return self.follower.state
        return parse_log(self.log_path) if self.log_path.exists() else StartupState()

    def wait_ready(self, timeout: float | None = None, poll_s: float | None = None) -> float:
        try:
            return super().wait_ready(timeout or self.START_TIMEOUT_S, poll_s or self.POLL_S)
        except EngineStartError:
            self._stop_follower()
            raise

    def stop(self, timeout: float | None = None) -> int | None:
        code = super().stop(timeout or self.STOP_TIMEOUT_S)
        self._stop_follower()
        return code

    def _stop_follower(self) -> None:
        if self.follower is not None:
            self.follower.stop()
            self.follower = None


def _signal_group(pgid: int | None, sig: signal.Signals) -> None:
    if pgid is None:
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pids_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is `pgid`."""
    out = []
    for p in psutil.process_iter(["status"]):
        if p.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p.pid)
        except (ProcessLookupError, PermissionError):  # gone meanwhile
            continue
    return sorted(out)


def _stop_all() -> None:  # pragma: no cover - interpreter exit
    for engine in list(_LIVE):
        try:
            engine.stop(timeout=5)
        except Exception as exc:  # stop the others all the same; say which one is left
            print(f"labkit: could not stop {engine.name} (pid {engine.pid}): {exc}",
                  file=sys.stderr)


atexit.register(_stop_all)
