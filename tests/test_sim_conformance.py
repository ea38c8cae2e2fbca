"""The conformance harness on the shipped recordings (docs/conformance.md): the simulator
replays each recorded engine with its settings and must match it step for step.

Recordings made before EngineSettings/RequestAdded/num_free existed lack prompts (inferred
from the steps, the allocations and the KV transfers) and free counts; the engines listed in
FULL are held to the done criteria, any others to what their recordings allow
(docs/conformance.md says why).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from labkit.bench.conformance import _kv_sources, check, compare, load_traces, replay
from labkit.telemetry import observer_schema as obs

DATA = Path(__file__).resolve().parents[1] / "labkit" / "data"
RECORDINGS = DATA / "recordings"
# Recordings kept apart from the top level (docs/record-replay.md) and conformance traces
# (tests/gpu/record_conformance.py, docs/conformance.md).
TRACES = sorted([*RECORDINGS.glob("*.lkrec"), *RECORDINGS.glob("cpu-tier/*.lkrec"),
                 *(DATA / "conformance").glob("*.lkrec")])
FULL = {
    ("real-h100-1gpu-cpu-tier", "colocated"), ("real-h100-chunked-long", "engine"),
    ("real-h100-1gpu-cpu-tier-pd", "prefill"), ("real-h100-1gpu-cpu-tier-pd", "decode"),
    ("real-h100-preempt-async", "engine"), ("real-h100-preempt-sync", "engine"),
    ("real-h100-pd-decode-preempt", "engine"), ("real-h100-prefix-evict", "engine"),
    ("real-h100-abort-prefill", "engine"),
    ("real-h100-1gpu-example", "prefill"), ("real-h100-1gpu-example", "decode"),
    ("real-h200-1gpu-fp8", "prefill"), ("real-h200-1gpu-fp8", "decode"),
    ("real-h200x2-nixl-chunk256", "prefill"), ("real-h200x2-nixl-chunk256", "decode"),
    ("real-h200x2-nixl", "prefill"), ("real-h200x2-nixl", "decode"),
    ("real-h200x4-nixl-tp2", "prefill"), ("real-h200x4-nixl-tp2", "decode"),
    ("sim-lab-1b-pd", "prefill"), ("sim-lab-1b-pd", "decode"),
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
    (trace, *_) = load_traces(str(RECORDINGS / "real-h100-1gpu-example.lkrec"))
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


def _recv(tokens: int, end: float) -> obs.KVTransfer:
    return obs.KVTransfer(ts=end, req_id="r", direction="recv", num_tokens=tokens, num_bytes=0,
                          start=end - 0.01, end=end, connector="NixlConnector")


def test_an_async_load_after_a_local_hit_leaves_the_hits_to_the_recv() -> None:
    """NIXL decode of a 712-token prompt with 32 blocks (512 tokens) hit locally: the read brings
    200 tokens, then vLLM computes 711 (`_update_waiting_for_remote_kv`). The hits are
    712 - 200 = 512, not 711 - 200 = 511 (which shared 31 blocks and scheduled 216 tokens)."""
    assert _kv_sources(200, _recv(200, 1.0), True, 711, 712, first_ts=2.0) == (200, 512, True)
    # the recv missing: RequestAllocated's count, the blocks allocated steps before it ran
    assert _kv_sources(200, None, True, 711, 712, first_ts=2.0) == (200, 512, True)
    # a synchronous load (ExampleConnector) lands in the step: computed = hits + loaded
    assert _kv_sources(272, None, False, 288, 300, first_ts=2.0) == (272, 16, False)
    assert _kv_sources(272, _recv(272, 3.0), False, 288, 300, first_ts=2.0) == (272, 16, False)


def test_nixl_prefill_frees_sent_requests_in_the_recorded_order() -> None:
    """vLLM frees the requests of one step's finished_sending in that set's iteration order,
    the order the observer emitted their sends in; replaying them as a set reordered the
    uncached tail blocks that the next allocation takes first."""
    (trace,) = [t for t in load_traces(str(RECORDINGS / "real-h200x2-nixl.lkrec")) if t.name == "prefill"]
    from labkit.telemetry.recording import read_recording

    sends = [ev.req_id for _, d in read_recording(str(RECORDINGS / "real-h200x2-nixl.lkrec")).frames
             for b in d.observer if b.engine_id == "prefill"
             for ev in b.events if isinstance(ev, obs.KVTransfer) and ev.direction == "send"]
    replayed = [rid for i in sorted(trace.sends_done) for rid in trace.sends_done[i]]
    assert replayed == sends[:len(replayed)]  # sends after the last step free nothing replayed
    assert len(trace.sends_done[4]) == 8  # eight requests' blocks freed before one step
    assert compare(trace.steps, replay(trace))["block_ids_equal"] == 100.0


CONFORMANCE = DATA / "conformance"


def test_preemption_traces_preempt_and_conform() -> None:
    """The 100-block pools (H100, vLLM 0.26.0): requests are preempted and resumed, on a
    colocated engine with and without async scheduling and on a PD decode engine that loads
    through ExampleConnector; every preemption, resume, block id and free count matches. The
    resumed requests come back as new ones (Model Runner V2), their prefix hits included."""
    for name, async_scheduling in (("preempt-async", True), ("preempt-sync", False),
                                   ("pd-decode-preempt", True)):
        (trace,) = load_traces(str(CONFORMANCE / f"real-h100-{name}.lkrec"))
        assert trace.settings["num_gpu_blocks"] == 100
        assert trace.settings["async_scheduling"] is async_scheduling
        res = compare(trace.steps, replay(trace))
        assert res["num_preempt_resume"] >= 10, (name, res)
        resumed_hits = [(st.index, rid) for st in trace.steps for rid, c in st.num_computed_tokens.items() if c]
        assert resumed_hits, name  # resumed requests with prefix hits, reported as new ones
        assert res["steps_equal"] == 100.0 and res["prefix_hits_equal"] == 100.0, (name, res["first_diff"])


def test_an_abort_is_replayed_where_the_trace_finished_the_request() -> None:
    """Two requests aborted while one computed its prompt in 64-token chunks and the other
    waited (never scheduled, so not in the replay): the running one is aborted before the
    step after its RequestFinished; its blocks come back a step later (deferred free), and
    the next request waits for room for its whole prompt. Replayed without the abort, the
    request runs on from that step."""
    (trace,) = load_traces(str(CONFORMANCE / "real-h100-abort-prefill.lkrec"))
    (step, rids), = trace.aborts.items()
    assert [r.split("-")[1] for r in rids] == ["1"]
    assert not any(r.startswith("req-2-") for r in trace.requests)
    assert compare(trace.steps, replay(trace))["steps_equal"] == 100.0
    trace.aborts = {}
    res = compare(trace.steps, replay(trace))
    assert res["first_diff"]["step"] == step and res["scheduled_tokens_equal"] < 100.0


def test_a_step_scheduled_before_the_previous_output_keeps_its_blocks() -> None:
    """A PD prefill engine (async scheduling): a 64-token request arrived while a 6,000-token
    prefill ran, so vLLM scheduled it before that step's output freed the long request's 375
    blocks (its RequestFinished came after the next StepScheduled). The replay admits the
    request during that step; without it the free count is 375 blocks too high."""
    (trace, _) = load_traces(str(RECORDINGS / "real-h100-1gpu-example.lkrec"))
    assert trace.name == "prefill" and trace.overlapped
    assert compare(trace.steps, replay(trace))["free_counts_equal"] == 100.0
    trace.overlapped = set()
    res = compare(trace.steps, replay(trace))
    assert res["free_counts_equal"] < 100.0
    d = res["first_diff"]
    assert d["sim"]["num_free"] - d["real"]["num_free"] == 375
