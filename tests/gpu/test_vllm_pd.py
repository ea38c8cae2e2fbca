"""Real vLLM 0.26 on one GPU: a PD pair through ExampleConnector, watched by the observer.

One module-scoped run (pd_run.run_pd_proof) starts the engines once; each test checks one
claim against what was measured. Figures land in $OUT/pd_run.json and docs/gpu-runs.md.
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.gpu

PROMPT = 1081
BLOCK = 16
ALIGNED = (PROMPT - 1) // BLOCK * BLOCK  # ExampleConnector: whole blocks of prompt-minus-one
KV_BYTES_PER_TOKEN_LAYER = 2 * 8 * 128 * 2  # K and V, 8 KV heads, head_dim 128, bf16


@pytest.fixture(scope="module")
def run():
    from pd_run import run_pd_proof

    res = run_pd_proof()
    assert not res["errors"], res["errors"]
    return res


def _ev(run, engine, kind):
    return [e for e in run["events"] if e["engine"] == engine and e["type"] == kind]


def _prompt_step(run, engine):
    """The StepScheduled that scheduled the prompt of the 1,081-token request."""
    for e in _ev(run, engine, "StepScheduled"):
        for rid, n in e["num_scheduled_tokens"].items():
            if n + e["num_computed_tokens"].get(rid, 0) == PROMPT and rid in e["new_block_ids"]:
                return rid, e
    raise AssertionError(f"no prompt step on {engine}")


def test_all_engines_started_and_answered(run):
    assert run["proxy_status"] == 200
    assert run["stream_chunks"] >= 190
    assert run["solo_request"] == 200
    for name, st in run["startup"].items():
        assert st["stage"] == "api_ready" and not st["errors"], name
        assert st["kv_cache_tokens"] > 0 and st["weights_gib"] > 1.0


def test_decode_loaded_block_aligned_prompt(run):
    m = run["metrics"]
    assert m["decode"]["by_source"]["external_kv_transfer"] == ALIGNED == 1072
    assert m["prefill"]["by_source"]["local_compute"] == PROMPT
    (alloc,) = [a for a in _ev(run, "decode", "RequestAllocated") if a["num_external_tokens"]]
    assert alloc["num_external_tokens"] == ALIGNED


def test_observer_block_ids_are_physical(run):
    for engine in ("prefill", "decode"):
        rid, step = _prompt_step(run, engine)
        ids = step["new_block_ids"][rid]
        assert len(ids) == math.ceil(PROMPT / BLOCK) == 68
        assert len(set(ids)) == len(ids) and 0 not in ids  # block 0 is the null block
        assert max(ids) < run["metrics"][engine]["num_gpu_blocks"]
    rid, step = _prompt_step(run, "decode")
    assert step["num_computed_tokens"][rid] == ALIGNED
    assert step["num_scheduled_tokens"][rid] == PROMPT - ALIGNED


def test_pool_snapshot_matches_usage_gauge(run):
    d = run["during"]
    used_gauge = d["kv_cache_usage_perc"] * (d["num_gpu_blocks"] - 1)
    # blocks the running request holds: prompt + ~60..80 tokens generated
    used_snap = [c[2] + c[3] for _, _, c in d["snapshots"]]
    assert used_snap, "no PoolSnapshot from decode while the request ran"
    assert any(abs(u - used_gauge) <= 2 for u in used_snap), (used_snap, used_gauge)
    assert 68 <= round(used_gauge) <= math.ceil((PROMPT + 100) / BLOCK)
    snaps = _ev(run, "decode", "PoolSnapshot")
    assert all(s["num_blocks"] == d["num_gpu_blocks"] for s in snaps)
    ts = [s["ts"] for s in snaps]
    assert all(b - a >= 0.2 for a, b in zip(ts, ts[1:], strict=False))  # <= 4 Hz
    # after the request: its blocks are free but cached (prefix cache), none in use
    assert snaps[-1]["state_counts"][2] + snaps[-1]["state_counts"][3] == 0
    assert snaps[-1]["state_counts"][1] >= 67


def test_layer_timing_brackets_example_connector_save(run):
    rid, _ = _prompt_step(run, "prefill")
    saves = [e for e in _ev(run, "prefill", "LayerTiming")
             if e["op"] == "save" and rid in e["req_ids"] and e["layer"] != "wait_for_save"]
    first = {}
    for e in saves:  # the prompt's step: the one whose bytes are the whole prompt
        if e["num_bytes"] == PROMPT * KV_BYTES_PER_TOKEN_LAYER:
            first[e["layer"]] = e
    assert len(first) == 16
    durations = [e["end"] - e["start"] for e in first.values()]
    assert all(d > 0 for d in durations)  # ExampleConnector writes each layer to /dev/shm
    (recv,) = [k for k in _ev(run, "decode", "KVTransfer") if k["direction"] == "recv"]
    assert recv["num_tokens"] == ALIGNED
    assert recv["num_bytes"] == ALIGNED * KV_BYTES_PER_TOKEN_LAYER * 16
    assert recv["connector"] == "ExampleConnector" and recv["end"] > recv["start"]


def test_solo_observer_publishes_steps(run):
    steps = _ev(run, "solo", "StepScheduled")
    assert any(sum(s["num_scheduled_tokens"].values()) == 100 for s in steps)
    assert _ev(run, "solo", "RequestFinished")


def test_kv_events_arrive(run):
    assert run["kv_event_kinds"].get("BlockStored", 0) >= 1
    assert run["kv_event_stored_blocks"] >= PROMPT // BLOCK


def test_nvml_memory_per_engine(run):
    for name in ("prefill", "decode"):
        st = run["startup"][name]
        expected = (st["weights_gib"] + st["kv_cache_gib"]) * (1 << 30)
        got = run["nvml_engine_bytes"][name]
        assert expected <= got <= expected + 4 * (1 << 30), (name, got / 2**30, expected / 2**30)


def test_cuda_graph_engine_reports_capture(run):
    st = run["startup"]["graphs"]
    assert st["eager"] is False and st["graph_capture_s"] is not None
    assert run["startup"]["prefill"]["eager"] is True


def test_layer_timing_only_on_prompt_steps(run):
    # decode computes one prompt step (the last 9 tokens, after loading 1,072): 16 "load"
    # events (ExampleConnector loaded in start_load_kv already) and 16 "save" + wait_for_save;
    # the 199 decode-only steps publish none
    timings = _ev(run, "decode", "LayerTiming")
    saves = [e for e in timings if e["op"] == "save" and e["layer"] != "wait_for_save"]
    loads = [e for e in timings if e["op"] == "load"]
    assert len(saves) == 16 and len(loads) == 16 and len(timings) == 33
    assert all(e["num_bytes"] == 9 * KV_BYTES_PER_TOKEN_LAYER for e in saves)
    assert all(e["num_bytes"] == ALIGNED * KV_BYTES_PER_TOKEN_LAYER for e in loads)


def test_fp8_doubles_kv_capacity(run):
    auto, fp8 = run["startup"]["solo"]["kv_cache_tokens"], run["startup"]["fp8"]["kv_cache_tokens"]
    assert abs(fp8 / auto - 2.0) < 0.02, (auto, fp8)


def test_stop_leaves_nothing(run):
    assert all(not pids for pids in run["left_after_stop"].values()), run["left_after_stop"]
    assert abs(run["gpu_used_after"] - run["gpu_used_before"]) < 512 * (1 << 20)
