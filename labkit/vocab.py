"""The lab's vocabulary: units, block states, kinds of evidence with their one label and colour,
and the run directory. Every other module imports these from here; nothing here imports labkit.

Pure Python with no dependency: `labkit/pd/observer.py` runs inside vLLM and imports it too.
"""

from __future__ import annotations

import os
from pathlib import Path

# ---- units -------------------------------------------------------------------------------------
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# ---- block states ------------------------------------------------------------------------------
# One byte per physical block in PoolSnapshot.block_state (docs/architecture.md, contract 3),
# written by the observer inside vLLM and by the simulator's block pool, drawn by the views.
BLOCK_FREE = 0  # free, no hash
BLOCK_CACHED = 1  # free but cached: evictable, has a hash (a prefix hit can revive it)
BLOCK_IN_USE = 2  # ref count 1
BLOCK_SHARED = 3  # ref count >= 2 (a shared prefix)
BLOCK_STATE_NAMES = ("free", "cached (evictable)", "in use", "shared prefix")
BLOCK_STATE_CHARS = (".", "c", "#", "S")  # the terminal's block strip (labkit demo)
# The CPU tier (vLLM's KV offload, --kv-offloading-size): one byte per CPU block in
# HostTierSnapshot.block_state, from vLLM's CPUOffloadingManager (ref_cnt -1 / 0 / >= 1).
HOST_FREE = 0  # not holding a block
HOST_STORED = 1  # stored and readable: evictable by the CPU tier's LRU
HOST_STORING = 2  # a GPU->CPU store is writing it
HOST_LOADING = 3  # a CPU->GPU load is reading it
HOST_STATE_NAMES = ("free", "stored (evictable)", "storing GPU->CPU", "loading CPU->GPU")

# ---- kinds of evidence -------------------------------------------------------------------------
# Every number the lab shows says where it comes from. Engines and sources are "vllm" (a real
# engine), "sim" (the simulator) or "replay" (a recording played back); the notebooks' results
# may also be "measured" (torch on this machine) or "planned" (vLLM's arithmetic, nothing runs).
SOURCE_KINDS = ("vllm", "sim", "replay")
KIND_LABELS = {
    "vllm": "REAL vLLM",
    "sim": "SIMULATED",
    "replay": "REPLAY",
    "measured": "MEASURED on this machine",
    "planned": "PLANNED (vLLM's arithmetic; nothing runs)",
}
KIND_COLORS = {
    "vllm": "#047857",  # green: a real engine
    "sim": "#b45309",  # amber: simulated
    "replay": "#1d4ed8",  # blue: played back
    "measured": "#0f766e",
    "planned": "#6d28d9",
}


def kind_label(kind: str) -> str:
    """'sim' -> 'SIMULATED', 'vllm' -> 'REAL vLLM', 'replay' -> 'REPLAY', ..."""
    return KIND_LABELS.get(kind, kind.upper())


# ---- where runs live ---------------------------------------------------------------------------
RUN_DIR_ENV = "LABKIT_RUN_DIR"


def run_root() -> Path:
    """The folder every lab run lives under: $LABKIT_RUN_DIR, else ~/.cache/labkit/runs."""
    env = os.environ.get(RUN_DIR_ENV)
    return Path(env if env else Path.home() / ".cache" / "labkit" / "runs").expanduser()
