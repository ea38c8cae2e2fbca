"""Shared test configuration.

FIXTURES: what real vLLM 0.26.0 said on the wire (HTTP bodies, /metrics, KV-event frames,
start-up logs), captured on an H100 — a copy of the project's shared captures, kept in the
repository so the suite runs anywhere. $LABKIT_VLLM_FIXTURES points elsewhere if set.
"""
from __future__ import annotations

import os
from pathlib import Path

FIXTURES = Path(os.environ.get("LABKIT_VLLM_FIXTURES")
                or Path(__file__).resolve().parent / "fixtures" / "vllm-0.26")
