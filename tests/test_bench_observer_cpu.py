"""labkit.bench.observer_cpu: the observer's own hooks driven as vLLM calls them for decode
steps, without vLLM (its base class stood in for, then taken out of sys.modules)."""

from __future__ import annotations

import sys

from labkit.bench import observer_cpu


def test_every_step_reaches_the_subscriber_and_nothing_is_dropped():
    r = observer_cpu.run(requests=8, layers=4, steps=50)
    assert r["step_events"] == 50  # one StepScheduled per decode step
    assert r["batches_received"] >= 1 and r["num_drops"] == 0
    assert r["scheduler_us"] > 0 and r["worker_us"] > 0
    assert "vllm" not in sys.modules and "labkit.pd.observer" not in sys.modules
    text = observer_cpu.format_table(r)
    assert "together" in text and "StepScheduled events 50" in text
