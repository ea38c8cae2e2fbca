"""VLLMEngine: one `vllm serve` subprocess, with staged start-up progress from its log.

vLLM 0.26 is started as `python -m vllm.entrypoints.cli.main serve MODEL ...` with the
interpreter that runs the lab (the `vllm` console script may be absent when vLLM is only on
PYTHONPATH). The argument list after `serve` comes from `labkit.plan` (`vllm_args`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from labkit.engines.base import LogFollowingEngine
from labkit.telemetry.vllm_log import StartupState, parse_log

VLLM_MAIN = "vllm.entrypoints.cli.main"


class VLLMEngine(LogFollowingEngine):
    """A real vLLM engine on this machine's GPUs.

    Args:
        name: engine name ("prefill", "decode", ...), also the log file's stem.
        serve_args: arguments after `vllm serve`: the model first, then options
            (no --host/--port: this class adds them).
        python: interpreter that has vLLM importable.
        Others: see `EngineHandle`.
    """

    def __init__(self, name: str, serve_args: Sequence[str], *, python: str | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("kind", "vllm")
        super().__init__(name, **kwargs)
        self.serve_args = [str(a) for a in serve_args]
        if "--port" in self.serve_args:  # labkit.plan.vllm_args names the port itself
            self.port = int(self.serve_args[self.serve_args.index("--port") + 1])
        self.python = python or sys.executable

    def command(self) -> list[str]:
        args = [self.python, "-m", VLLM_MAIN, "serve", *self.serve_args]
        if "--host" not in self.serve_args:
            args += ["--host", self.host]
        if "--port" not in self.serve_args:
            args += ["--port", str(self.port)]
        return args

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        # the observer connector (labkit.pd.observer) is imported inside vLLM's processes
        root = str(Path(__file__).resolve().parents[2])
        paths = [p for p in env.get("PYTHONPATH", "").split(":") if p]
        if root not in paths:
            env["PYTHONPATH"] = ":".join([*paths, root])
        return env

    def _start_errors(self) -> list[str]:
        state = parse_log(self.log_path) if self.log_path.exists() else StartupState()
        return state.errors[-10:] or super()._start_errors()

