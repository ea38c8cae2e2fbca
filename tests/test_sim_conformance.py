"""The conformance harness on the shipped recordings (docs/conformance.md): the simulator
replays each recorded engine with its settings and must match it step for step.

Recordings made before EngineSettings/RequestAdded/num_free existed lack prompts (inferred
from the steps) and free counts; the engines listed in FULL carry enough to hold the done
criteria; the others are held to what their recordings allow (docs/conformance.md says why).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from labkit.bench.conformance import check, compare, load_traces, replay

DATA = Path(__file__).resolve().parents[1] / "labkit" / "data"
RECORDINGS = DATA / "recordings"
# Recordings kept apart from the top level (docs/record-replay.md) and conformance traces
# (tests/gpu/record_conformance.py, docs/conformance.md).
TRACES = sorted([*RECORDINGS.glob("*.lkrec"), *RECORDINGS.glob("cpu-tier/*.lkrec"),
                 *(DATA / "conformance").glob("*.lkrec")])
FULL = {
    ("real-h100-1gpu-cpu-tier", "colocated"), ("real-h100-chunked-long", "engine"),
    ("real-h200-1gpu-example", "prefill"), ("real-h200-1gpu-example", "decode"),
    ("real-h200-1gpu-fp8", "prefill"), ("real-h200-1gpu-fp8", "decode"),
    ("real-h200x2-nixl-chunk256", "prefill"), ("real-h200x2-nixl", "decode"),
    ("real-h200x4-nixl-tp2", "prefill"), ("sim-lab-1b-pd", "prefill"),
}


def _at_least(value: float | None, floor: float) -> bool:
    return value is None or value >= floor  # None: the recording has nothing to compare


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.stem)
def test_shipped_recording_conforms(path: Path) -> None:
    results = check(str(path))
    assert results, "no engine with scheduler steps in the recording"
    for trace, res in results:
        assert res["steps"] > 0
        assert res["preempt_resume_equal"] == 100.0, (trace.name, res["first_diff"])
        assert res["scheduled_tokens_equal"] >= 98.0, (trace.name, res["first_diff"])
        if (path.stem, trace.name) in FULL:
            assert res["scheduled_tokens_equal"] == 100.0, (trace.name, res["first_diff"])
            assert res["prefix_hits_equal"] == 100.0, (trace.name, res["first_diff"])
            assert res["block_ids_equal"] >= 99.0, (trace.name, res["first_diff"])
            assert _at_least(res["free_counts_equal"], 99.0), (trace.name, res["first_diff"])


def test_compare_reports_the_first_differing_step() -> None:
    (trace, *_) = load_traces(str(RECORDINGS / "real-h200-1gpu-example.lkrec"))
    sim = replay(trace)
    assert compare(trace.steps, sim)["first_diff"] is None
    i = next(j for j, st in enumerate(sim) if j > 0 and st.new_block_ids)
    sim[i].new_block_ids = {k: [v + 1 for v in ids] for k, ids in sim[i].new_block_ids.items()}
    res = compare(trace.steps, sim)
    assert res["first_diff"]["step"] == i and res["block_ids_equal"] < 100.0
    assert res["scheduled_tokens_equal"] == 100.0


def test_a_single_colocated_engine_reads_its_config_from_the_header() -> None:
    """The header's config holds `colocated: True` beside the engines' configs: one
    colocated engine ("colocated", role "both") takes the prefill side's, not the boolean."""
    (trace,) = load_traces(str(RECORDINGS / "cpu-tier" / "real-h100-1gpu-cpu-tier.lkrec"))
    assert trace.name == "colocated"
    assert trace.settings["num_gpu_blocks"] == 96 and trace.settings["block_size"] == 16
    assert trace.settings["max_num_seqs"] == 256
