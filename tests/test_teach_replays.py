"""labkit.teach.replays against the shipped recordings of REAL vLLM 0.26 runs on H200s.

The facts asserted come from the recordings themselves (the raw observer events, the engines'
own logs) or from vLLM's arithmetic: lab-1b keeps 65,536 KV bytes per token (16 layers x
8 KV heads x 128 x 2 x 2 bytes), TP=2 halves it per GPU; the TP=2 engines got 255,300 blocks (planned 253,995).
"""

from __future__ import annotations

import pytest

import labkit
from labkit.models import get_model
from labkit.teach import replays
from labkit.teach.exercises import simulated_chunk_steps
from labkit.telemetry.replay import Replay

CHUNK = 256


@pytest.fixture(scope="module")
def chunk256() -> Replay:
    return labkit.replay("real-h200x2-nixl-chunk256", speed=None)


@pytest.fixture(scope="module")
def tp2() -> Replay:
    return labkit.replay("real-h200x4-nixl-tp2", speed=None)


def _steps(rp: Replay, engine: str) -> list:
    return [
        e
        for _, d in rp.recording.frames
        for b in d.observer
        if b.engine_id == engine
        for e in b.events
        if type(e).__name__ == "StepScheduled"
    ]


# ---- chunked prefill on a real engine ---------------------------------------------------------
def test_the_raw_recording_never_schedules_more_than_the_chunk(chunk256: Replay) -> None:
    steps = _steps(chunk256, "prefill")
    assert len(steps) > 20
    assert {e.token_budget for e in steps} == {CHUNK}
    assert max(sum(e.num_scheduled_tokens.values()) for e in steps) == CHUNK  # budget used
    assert replays.token_budgets(chunk256) == {CHUNK}


def test_prefill_chunks_add_up_to_each_prompt(chunk256: Replay) -> None:
    table = replays.prefill_chunks(chunk256)
    assert table.kind == "replay" and "REPLAY of a real vLLM run" in table.title
    records = replays.prefill_records(chunk256)
    timeline = {
        ev["prompt_tokens"]
        for _, d in chunk256.recording.frames
        for ev in d.timeline
        if ev["event"] == "finish"
    }
    assert {r.prompt_tokens for r in records} == timeline  # every finished prompt, found
    for r in records:
        assert r.cached_tokens + sum(r.chunks) == r.prompt_tokens, r
        assert max(r.chunks) <= CHUNK
        assert r.steps == sorted(r.steps)
    several = [r for r in records if len(r.chunks) > 1]
    assert several, "some prompt must have taken several steps"
    assert all(c == CHUNK for r in several for c in r.chunks[:-1])  # full chunks, then the rest
    assert any(r.cached_tokens > 0 for r in records)  # the shared system prompt: cache hits


def test_the_real_scheduler_chunks_like_the_simulator(chunk256: Replay) -> None:
    for prompt in (1081, 6000):
        real = replays.prefill_steps(chunk256, prompt)
        assert real == simulated_chunk_steps(prompt, CHUNK)
        assert len(real) == -(-prompt // CHUNK)


@pytest.mark.parametrize("name", ["real-h200x2-nixl-chunk256", "real-h200x2-nixl"])
def test_a_prompt_is_cut_only_where_its_step_ran_out_of_budget(name: str) -> None:
    """vLLM's scheduler gives a prompt min(remaining, token_budget left) tokens per step
    (vllm/v1/core/sched/scheduler.py): every chunk but the last fills its step's budget. With
    the default 8192 a prompt is cut only when several share a step (one is, in this run)."""
    rp = labkit.replay(name, speed=None)
    steps = {e.step: e for e in _steps(rp, "prefill")}
    records = replays.prefill_records(rp)
    assert any(len(r.chunks) > 1 for r in records)
    for r in records:
        for s in r.steps[:-1]:
            assert sum(steps[s].num_scheduled_tokens.values()) == steps[s].token_budget, (r, s)


def test_request_trace_is_live_traces_table_for_one_prompt(chunk256: Replay) -> None:
    steps = replays.request_trace(chunk256, 1081, engine="prefill").steps()
    assert steps.kind == "replay" and "REPLAY" in steps.title
    assert steps.column("engine") == ["prefill"] * 5
    assert steps.column("tokens_scheduled") == [256, 256, 256, 256, 57]
    assert steps.column("computed_before") == [0, 256, 512, 768, 1024]
    assert sum(steps.column("new_blocks")) == -(-1081 // 16)
    both = replays.request_trace(chunk256, 1081)
    moved = both.transfers().column("tokens")
    assert moved == [1081, 1081]  # NIXL: send on prefill, recv on decode
    assert both.timeline().column("event")[-1] == "finish"
    with pytest.raises(ValueError):
        replays.request_trace(chunk256, 12345)


def test_check_prefill_steps(chunk256: Replay, capsys: pytest.CaptureFixture[str]) -> None:
    assert not replays.check_prefill_steps(chunk256, 6000, None)
    assert not replays.check_prefill_steps(chunk256, 6000, 23)
    assert replays.check_prefill_steps(chunk256, 6000, 24)
    assert "256 ×23, 112" in capsys.readouterr().out


# ---- TP=2 on four GPUs ----------------------------------------------------------------------
def test_tp2_keeps_kv_on_four_gpus(tp2: Replay) -> None:
    table = replays.gpu_memory(tp2)
    assert table.kind == "replay" and "REPLAY" in table.title
    rows = {r["gpu"]: r for r in table}
    assert sorted(rows) == [0, 1, 2, 3]
    assert all(r["kv_GiB"] > 100 for r in table)  # H200: ~124 GiB of KV on every GPU
    assert [(rows[g]["engine"], rows[g]["rank"]) for g in range(4)] == [
        ("prefill", 0), ("prefill", 1), ("decode", 0), ("decode", 1)
    ]  # fmt: skip
    # the engines' own pools (observer snapshots): 255,300 blocks; labkit's plan said 253,995
    assert {r["engine_blocks"] for r in table} == {255_300}
    assert {r["planned_blocks"] for r in table} == {253_995}
    # KV on each GPU = the pool x one block's bytes there (vLLM's log said 124.66 GiB)
    assert all(r["kv_GiB"] == pytest.approx(124.66, abs=0.01) for r in table)


def test_tp2_halves_weights_and_kv_per_token_per_gpu(tp2: Replay, chunk256: Replay) -> None:
    tp1 = {r["engine"]: r for r in replays.gpu_memory(chunk256)}
    assert len(tp1) == 2
    for r in replays.gpu_memory(tp2):
        assert r["weights_GiB"] == pytest.approx(tp1[r["engine"]]["weights_GiB"] / 2, rel=0.01)
    lab1b = get_model("lab-1b")
    for engine in ("prefill", "decode"):
        assert replays.kv_bytes_per_token(tp2, engine) == lab1b.kv_bytes_per_token("auto", tp=2)
        assert replays.kv_bytes_per_token(chunk256, engine) == lab1b.kv_bytes_per_token("auto")
    # same KV memory per GPU, half the bytes per token: about twice the blocks per engine
    blocks = {r["engine_blocks"] for r in replays.gpu_memory(chunk256)}
    assert 255_300 / blocks.pop() == pytest.approx(2.0, rel=0.01)


def test_check_kv_bytes_per_token(tp2: Replay) -> None:
    assert not replays.check_kv_bytes_per_token(tp2, "decode", None)
    assert not replays.check_kv_bytes_per_token(tp2, "decode", 65536)  # TP=1's figure
    assert replays.check_kv_bytes_per_token(tp2, "decode", 32768)
    assert replays.check_kv_bytes_per_token(tp2, "decode", 32762)  # 124 GiB read off a table


def test_memory_view_of_a_replay_leaves_the_replay_in_place(tp2: Replay) -> None:
    fig = replays.view(tp2, "memory")
    assert "REPLAY" in fig.layout.title.text
    kv = [tr for tr in fig.data if str(tr.name).endswith(": KV cache")]
    per_gpu = [sum(tr.y[g] for tr in kv) for g in range(4)]
    assert all(v > 100 for v in per_gpu), per_gpu
    assert tp2.position == 0.0 and not tp2.done


def test_a_replay_name_works_too() -> None:
    assert replays.prefill_steps("real-h200x2-nixl-chunk256", 812) == [256, 256, 256, 44]
