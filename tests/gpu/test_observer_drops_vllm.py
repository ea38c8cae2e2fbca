"""The observer connector inside real vLLM 0.26 loses nothing: every hook it implements
runs against vLLM's own objects (block pool, scheduler output, requests, KV caches), and a
private field vLLM renamed would show here as a drop (ObserverBatch.num_dropped, one warning
per cause in the engine's log).

    pytest -m gpu tests/gpu/test_observer_drops_vllm.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _lab_support import PROMPT_TOKENS, Poller, prompt_ids, stream  # noqa: E402
from _support import save_json  # noqa: E402

pytestmark = pytest.mark.gpu


def test_observer_drops_nothing_on_a_real_pd_pair(tmp_path: Path) -> None:
    import time

    from labkit.lab import Lab

    lab = Lab(mode="vllm", model="lab-1b", run_dir=tmp_path, num_gpus=1, connector="example")
    res: dict[str, Any] = {"describe": lab.describe()}
    stages: list[tuple[str, float]] = []
    lab.start(progress=lambda stage, frac: stages.append((stage, time.time())))
    try:
        tel = lab.telemetry()
        # Lab.start waits for every reader (LiveTelemetry.wait_connected, 10 s at most)
        at = dict(stages)
        res["stages"] = stages
        res["telemetry_connect_s"] = at["ready"] - at["connecting the telemetry"]
        res["telemetry_missing"] = tel.missing()
        res["kv_peers"] = {n: s.num_peers for n, s in tel.kv_subs.items()}
        model = lab.plan.model.name
        with Poller(tel) as poll:
            stream(lab.url, model, prompt_ids(PROMPT_TOKENS), 32)
            # a shared prefix (prefix-cache hits), long and short prompts, chunked prefill
            shared = prompt_ids(256, seed=99)
            for i, n in enumerate((64, 900, 2500, 300)):
                stream(lab.url, model, shared + prompt_ids(n, seed=i + 1), 16)
        res["telemetry"] = poll.summary()
        res["num_dropped"] = {b.engine_id: b.num_dropped for b in poll.observer}
        res["observer_drops"] = tel.observer_drops()
        res["unpolled"] = tel.dropped()
        res["subscriber_dropped"] = tel.obs_sub.num_dropped if tel.obs_sub else None
        logs = {n: Path(e.log_path).read_text(errors="replace") for n, e in lab.engines.items()}
        res["warnings"] = {n: [ln for ln in text.splitlines() if "dropped telemetry" in ln]
                           for n, text in logs.items()}
    finally:
        lab.stop()
        save_json("observer_drops.json", res)
    events = res["telemetry"]["observer_events"]
    for name in ("prefill", "decode"):  # the hooks ran: each engine said something of each kind
        for kind in ("StepScheduled", "RequestAllocated", "RequestFinished", "PoolSnapshot"):
            assert events.get(f"{name}:{kind}", 0) > 0, (name, kind, events)
    assert events.get("prefill:LayerTiming", 0) > 0  # worker side too
    assert res["telemetry_missing"] == [] and res["telemetry_connect_s"] < 5.0, res
    assert res["observer_drops"] == {}, res
    assert set(res["num_dropped"].values()) == {0}, res
    assert res["warnings"] == {"prefill": [], "decode": []}
    assert res["unpolled"] == {"observer": 0, "timeline": 0, "metrics": 0, "gpu": 0}
    assert res["subscriber_dropped"] == 0
