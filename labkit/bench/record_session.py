"""A fixed demo session recorded from a running lab: what labkit/data/recordings holds and
`labkit record` runs. Starts a Lab, drives a seeded workload through its PD proxy, records
everything the views consume (labkit.telemetry.recording.Recorder), stops the lab.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from labkit.telemetry.recording import Recorder

# ---- a fixed demo session (what labkit/data/recordings holds, and `labkit record` runs) -------
# (start s, prompt tokens, max_tokens, shares the system prompt): one request alone first, so a
# learner sees one prefill -> KV transfer -> decode; then a mix: a shared system prompt (prefix
# cache hits), a long prompt (chunked prefill), a short prompt with a long answer (decode).
DEMO_WORKLOAD: tuple[tuple[float, int, int, bool], ...] = (
    (0.0, 1081, 32, False),
    (4.0, 812, 64, True), (4.2, 712, 64, True), (5.0, 6000, 16, False), (5.0, 64, 128, False),
) + tuple((10.0 + 2.0 * i, (300, 1500, 800, 3000)[i % 4], (64, 32, 128, 16)[i % 4], i % 2 == 0)
          for i in range(24))  # fmt: skip
SYSTEM_PROMPT_TOKENS = 512


def demo_prompts(vocab_size: int, max_len: int, seed: int = 0) -> list[tuple[float, list[int], int]]:
    """DEMO_WORKLOAD as (start s, prompt token ids, max_tokens); seeded ids, no tokenizer."""
    import numpy as np

    rng = np.random.default_rng(seed)
    system = rng.integers(1000, vocab_size - 1, SYSTEM_PROMPT_TOKENS).tolist()
    out = []
    for start, n, max_tokens, shared in DEMO_WORKLOAD:
        n = max(1, min(n, max_len - max_tokens - 1))
        head = system[:n] if shared else []
        ids = head + rng.integers(1000, vocab_size - 1, n - len(head)).tolist()
        out.append((start, ids, max_tokens))
    return out


def _drive(url: str, model: str, prompts: list[tuple[float, list[int], int]], until: float,
           errors: list[str]) -> None:
    """Send each prompt (streamed: the proxy's timeline gets every token) at its start time,
    one thread each, until `until` (monotonic)."""
    import threading

    import httpx

    def send(client: httpx.Client, ids: list[int], max_tokens: int) -> None:
        body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True}
        try:
            with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                r.raise_for_status()
                for _ in r.iter_lines():
                    pass
        except httpx.HTTPError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    t0, threads = time.monotonic(), []
    with httpx.Client(timeout=120) as client:
        for start, ids, max_tokens in prompts:
            if t0 + start >= until:
                break
            time.sleep(max(0.0, t0 + start - time.monotonic()))
            threads.append(threading.Thread(target=send, args=(client, ids, max_tokens)))
            threads[-1].start()
        for th in threads:
            th.join(timeout=max(0.0, until - time.monotonic()) + 5)


def record_demo_session(path: str | Path, mode: str = "auto", duration_s: float = 60.0, *,
                        interval: float = 0.25, compression: str = "gzip",
                        progress: bool = False, **lab_knobs: Any) -> Path:
    """Start a Lab, drive DEMO_WORKLOAD through its proxy, record `duration_s` s, stop it.

    On the GPU machine (mode="vllm") this makes a real recording; mode="sim" made the one
    shipped in labkit/data/recordings. `lab_knobs` go to Lab (model, chunk, tp, run_dir...).
    """
    import logging
    import threading

    from labkit.lab import Lab

    lab = Lab(mode=mode, **lab_knobs)
    lab.start(progress=progress)
    try:
        max_len = min(e.max_model_len for e in lab.plan.engines)
        prompts = demo_prompts(lab.plan.model.vocab_size, max_len)
        meta = {"workload": "labkit.bench.record_session.DEMO_WORKLOAD", "duration_s": duration_s,
                "requests": [(s, len(ids), m) for s, ids, m in prompts]}
        errors: list[str] = []
        with Recorder(lab.telemetry(), path, compression=compression, lab=lab, meta=meta) as rec:
            end = time.monotonic() + duration_s
            driver = threading.Thread(target=_drive, daemon=True,
                                      args=(lab.url, lab.plan.model.name, prompts, end, errors))
            driver.start()
            while (now := time.monotonic()) < end:
                rec.poll()
                time.sleep(max(0.0, min(interval, end - now)))
            driver.join(timeout=10)
            time.sleep(interval)
            rec.poll()
        dead = [n for n, e in lab.engines.items() if not e.is_alive()]
        if dead:  # a recording of a broken pair is no demo: say why, keep the logs
            raise RuntimeError(f"engine(s) {', '.join(dead)} died while recording "
                               f"({len(errors)} requests failed; logs in {lab.run_dir}); "
                               f"the partial recording is {path}")
        if errors:
            logging.getLogger(__name__).warning("%d demo requests failed, first: %s",
                                                len(errors), errors[0])
    finally:
        lab.stop()
    return Path(path)
