"""A running simulated prefill/decode pair of engine processes, for tests that talk HTTP to
both (import as `from simpair import sim_pd_processes`)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from labkit.engines.sim.process import SimEngineProcess


@contextlib.contextmanager
def sim_pd_processes(run_dir: Path, connector: str, **kw: Any) -> Iterator[tuple[str, str]]:
    """Start a prefill and a decode `SimEngineProcess` (lab-1b on an H100, fast clock; `kw`
    adds or overrides engine options), yield their base URLs, stop both."""
    opts = {"fast": True, "model": "lab-1b", "gpu_type": "h100", "max_model_len": 4096, **kw}
    engines = [SimEngineProcess(role, role=role, connector=connector, run_dir=run_dir,
                                log_path=run_dir / f"{role}.log", **opts)
               for role in ("prefill", "decode")]
    try:
        for e in engines:
            e.start()
        for e in engines:
            e.wait_ready(timeout=30)
        yield engines[0].base_url, engines[1].base_url
    finally:
        for e in engines:
            e.stop()
