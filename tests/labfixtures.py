"""Where the vLLM 0.26 wire captures are (import as `from labfixtures import FIXTURES`).

A copy of the project's shared captures (HTTP bodies, /metrics, KV-event frames, start-up
logs of real vLLM 0.26.0 on an H100), kept in the repository so the suite runs anywhere;
$LABKIT_VLLM_FIXTURES points elsewhere if set.
"""
from __future__ import annotations

import os
from pathlib import Path

FIXTURES = Path(os.environ.get("LABKIT_VLLM_FIXTURES")
                or Path(__file__).resolve().parent / "fixtures" / "vllm-0.26")
