"""labkit.teach: the computations behind the notebooks.

Expected values that do not come from labkit itself are vLLM's: Llama-3.1-8B's 131,072 KV
bytes per token, ExampleConnector moving 1,072 tokens of a 1,081-token prompt (block 16).
"""

from __future__ import annotations

import pytest
import torch

from labkit.teach import exercises, experiments, kv_cost, paged_attention, placement
from labkit.teach.result import Result


# ---------------------------------------------------------------- paged attention
def _filled_cache(seed: int = 1) -> tuple[paged_attention.PagedKVCache, dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    lens = {"a": 45, "b": 16, "c": 70}
    cache = paged_attention.PagedKVCache(
        num_blocks=16, block_size=16, num_heads=2, head_dim=8, seed=seed
    )
    ks = {s: torch.randn(n, 2, 8, generator=gen) for s, n in lens.items()}
    vs = {s: torch.randn(n, 2, 8, generator=gen) for s, n in lens.items()}
    for start in range(0, 70, 7):  # interleaved writes: scattered physical blocks
        for s in lens:
            cache.append(s, ks[s][start : start + 7], vs[s][start : start + 7])
    return cache, ks, vs


@pytest.mark.parametrize("num_queries", [1, 5])
def test_paged_attention_equals_contiguous(num_queries: int) -> None:
    cache, ks, vs = _filled_cache()
    assert cache.block_tables["c"] != sorted(cache.block_tables["c"])  # really scattered
    assert 0 not in {b for t in cache.block_tables.values() for b in t}  # null block unused
    for s in ks:
        q = torch.randn(num_queries, 2, 8)
        paged = paged_attention.paged_attention(q, cache, s)
        ref = paged_attention.contiguous_attention(q, ks[s], vs[s])
        assert torch.allclose(paged, ref, atol=1e-5), s


def test_a_wrong_block_table_gives_a_different_answer() -> None:
    cache, ks, vs = _filled_cache()
    cache.block_tables["c"][0] = cache.block_tables["a"][0]  # logical 0 -> another's block
    q = torch.randn(1, 2, 8)
    assert not torch.allclose(
        paged_attention.paged_attention(q, cache, "c"),
        paged_attention.contiguous_attention(q, ks["c"], vs["c"]),
        atol=1e-5,
    )


def test_pool_runs_out_and_blocks_are_reused() -> None:
    cache = paged_attention.PagedKVCache(num_blocks=4, block_size=16, num_heads=1, head_dim=4)
    cache.append("x", torch.zeros(40, 1, 4), torch.zeros(40, 1, 4))  # 3 blocks: all usable
    with pytest.raises(MemoryError):
        cache.append("y", torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
    freed = list(cache.block_tables["x"])
    cache.free("x")
    cache.append("y", torch.zeros(20, 1, 4), torch.zeros(20, 1, 4))
    assert set(cache.block_tables["y"]) <= set(freed)


def test_demo_rows_are_measured_and_close() -> None:
    _, res = paged_attention.demo()
    assert res.kind == "measured" and all(r["allclose"] for r in res)


def test_fragmentation() -> None:
    lens = [300, 1200, 45, 17]
    res = paged_attention.fragmentation(
        lens, max_model_len=4096, block_sizes=(16,), model="llama-3.1-8b"
    )
    contiguous, paged = res.rows
    assert contiguous["reserved_tokens"] == 4 * 4096
    assert paged["reserved_tokens"] == 304 + 1200 + 48 + 32
    assert paged["wasted_tokens"] < 16 * len(lens)
    assert paged["wasted_MiB"] == pytest.approx(paged["wasted_tokens"] * 131072 / 2**20)


# ---------------------------------------------------------------- KV-cache cost, measured
def test_no_cache_cost_grows_faster_than_cached() -> None:
    res = kv_cost.measure(lengths=(16, 128), repeats=3)
    short, long = res.rows
    assert res.kind == "measured"
    assert short["same_tokens"] and long["same_tokens"]  # the cache never changes the output
    assert long["ratio"] > 1.5 * short["ratio"], res
    assert long["s_without_cache"] > long["s_with_cache"]
    # FLOPs: ~quadratic without the cache, ~linear with it
    assert long["gflop_without_cache"] / short["gflop_without_cache"] > 30
    assert long["gflop_with_cache"] / short["gflop_with_cache"] < 12


# ---------------------------------------------------------------- exercise checkers
RIGHT_AND_WRONG = [
    (exercises.check_kv_bytes_per_token, ("llama-3.1-8b", "auto"), 131072, 262144),
    (exercises.check_kv_bytes_per_token, ("llama-3.1-8b", "fp8"), 65536, 131072),
    (exercises.check_blocks_needed, (300, 16), 19, 18),
    (exercises.check_blocks_needed, (320, 16), 20, 21),
    (exercises.check_chunk_steps, (1000, 256), 4, 3),
    (exercises.check_tp_kv_per_gpu, ("llama-3.1-8b", 2, "auto"), 65536, 131072),
    (exercises.check_tp_kv_per_gpu, ("llama-3.1-8b", 16, "auto"), 16384, 8192),
    (exercises.check_pd_transfer_tokens, (1081, 16, "example"), 1072, 1081),
    (exercises.check_pd_transfer_tokens, (1081, 16, "nixl"), 1081, 1072),
    (exercises.check_kv_gpus, ("llama-3.1-8b", 2, 4), [0, 1], [2, 3]),
]


@pytest.mark.parametrize(
    "check,args,right,wrong", RIGHT_AND_WRONG, ids=lambda v: getattr(v, "__name__", None)
)
def test_checker_accepts_right_rejects_wrong(check, args, right, wrong, capsys) -> None:
    assert check(*args, right)
    assert "Right" in capsys.readouterr().out
    assert not check(*args, wrong)
    assert "Not quite" in capsys.readouterr().out
    assert not check(*args, None)
    assert "Not answered" in capsys.readouterr().out


def test_weight_check_has_a_tolerance_and_can_reveal(capsys) -> None:
    assert exercises.check_weight_gib("llama-3.1-8b", 15.0)  # 14.96 GiB
    assert not exercises.check_weight_gib("llama-3.1-8b", 8.0, reveal=True)
    assert "labkit computes 14.96" in capsys.readouterr().out


# ---------------------------------------------------------------- simulated experiments
def test_chunk_sweep_shows_the_trade_off() -> None:
    work = experiments.workload(num_requests=30, rate=6.0)
    res = experiments.chunk_sweep(chunks=(256, 8192), work=work)
    small, big = res.rows
    assert res.kind == "sim" and small["finished"] == big["finished"] == 30
    assert big["itl_p99_ms"] > 3 * small["itl_p99_ms"]  # big chunks stall decodes
    assert small["ttft_p50_ms"] > big["ttft_p50_ms"]  # small chunks delay first tokens
    assert big["longest_step_ms"] > small["longest_step_ms"]


def test_pd_keeps_inter_token_latency_steady() -> None:
    res = experiments.pd_vs_colocated(
        work=experiments.workload(num_requests=30), connectors=("nixl",)
    )
    colo, pd = res.rows
    assert res.kind == "sim" and pd["finished"] == colo["finished"] == 30
    assert pd["itl_p99_ms"] < colo["itl_p99_ms"]
    assert pd["kv_moved_GB"] > 0 and colo["kv_moved_GB"] == 0


# ---------------------------------------------------------------- planner tables
def test_claim_check_kv_beside_weights() -> None:
    res = placement.claim_check("llama-3.1-8b")
    assert "article" not in res.title and "GPUs 2-3" in res.title
    assert res.extra["kv_gpus"] == res.extra["weight_gpus"] == [0, 1]
    assert [r["holds"] for r in res.rows[2:]] == ["nothing", "nothing"]
    assert "beside the weights" in res.note


def test_separation_options() -> None:
    res = placement.separation_options("llama-3.1-8b", offload_gib=64)
    base, pd, cpu, fp8, frac = res.rows
    assert pd["kv_on_gpus"] == "[0, 1, 2, 3]"
    assert cpu["kv_tokens_cpu_tier"] == 64 * 2**30 // (2 * 65536)  # total over 2 TP ranks
    assert fp8["decode_kv_tokens_gpu"] == pytest.approx(2 * base["decode_kv_tokens_gpu"], rel=1e-3)
    assert frac["decode_kv_tokens_gpu"] < base["decode_kv_tokens_gpu"]
    assert "--kv-offloading-size 64" in placement.engine_command(
        res.extra["plans"]["CPU KV tier of 64 GiB"]
    )


def test_placement_table_reports_refusals() -> None:
    res = placement.placement_table("llama-3.1-70b", layouts=((1, 1), (4, 1)), num_gpus=4)
    one, four = res.rows
    assert one["error"] and four["error"] == ""
    assert four["gpus"] == "[0, 1, 2, 3]"


def test_block_map_keeps_each_sequence_colour() -> None:
    """Freeing B and writing E (notebook 03) does not recolour A, C or D."""
    import torch

    cache, _ = paged_attention.demo(block_size=16, num_blocks=16)

    def colours(fig) -> dict[str, float]:
        hm = fig.data[0]
        cells = [(z, t.split("<br>")[1]) for zr, tr in zip(hm.z, hm.text, strict=True)
                 for z, t in zip(zr, tr, strict=True)]
        return {label[0]: z for z, label in cells if label not in ("free", "null")}

    before = colours(paged_attention.block_map_figure(cache))
    cache.free("B")
    cache.append("E", torch.randn(20, 2, 8), torch.randn(20, 2, 8))
    after = colours(paged_attention.block_map_figure(cache))
    assert "B" in before and "B" not in after and "E" in after
    assert {s: after[s] for s in "ACD"} == {s: before[s] for s in "ACD"}
    assert after["E"] not in {before[s] for s in "ACD"}  # a newcomer gets a colour of its own


def test_result_says_what_it_is() -> None:
    res = Result("t", "sim", [{"a": 1, "b": 2.5}])
    assert "SIMULATED" in res._repr_html_() and "SIMULATED" in str(res)
    assert res.column("b") == [2.5]


# ---------------------------------------------------------------- a running (simulated) lab
def test_live_trace_and_dashboard_session(tmp_path, monkeypatch) -> None:
    import labkit
    from labkit.bench import workloads
    from labkit.teach import live, session

    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path))
    with labkit.Lab(
        mode="sim", model="lab-tiny", chunk=256, num_gpu_blocks=64, max_num_seqs=16
    ) as lab:
        trace = live.send(lab, prompt_len=600, max_tokens=4)
        dash = session.DashboardSession(lab)
        try:
            assert dash.box.children == (dash.watch.beat, dash.dashboard.widget)
            assert dash.dashboard.running and dash.watch.timeout_s is None  # not Voila: no watch
            assert dash.summary() == "no traffic sent yet"
            fut = dash.send(workloads.fixed(3, prompt_len=100, output_len=4, rate=20.0))
            result = fut.result(timeout=60)
            summary = dash.summary()
        finally:
            dash.dashboard.stop()
    steps = trace.steps()
    assert trace.kind == steps.kind == "sim"
    prefill = [r for r in steps if r["engine"] == "prefill"]
    assert [r["tokens_scheduled"] for r in prefill] == [256, 256, 88]  # the chunks
    assert [r["computed_before"] for r in prefill] == [0, 256, 512]  # not 0, 0, 0
    decode = [r for r in steps if r["engine"] == "decode"]
    assert [r["computed_before"] for r in decode[:3]] == [599, 600, 601]  # received KV, then +1
    allocs = trace.allocations()
    assert [r["engine"] for r in allocs] == ["prefill", "decode", "decode"]
    assert [r["external_tokens"] for r in allocs] == [0, 600, 0]
    assert "WAITING_FOR_REMOTE_KVS" in allocs.rows[1]["why"]
    assert allocs.rows[2]["why"].startswith("KV received") and "twice" in allocs.note
    assert sum(r["new_blocks"] for r in prefill) == 38  # ceil(600 / 16)
    recv = [r for r in trace.transfers() if r["direction"] == "recv"]
    assert recv and recv[0]["tokens"] == 600 and recv[0]["connector"] == "nixl"
    events = [r["event"] for r in trace.timeline()]
    assert events[0] == "arrival" and events[-1] == "finish" and "kv_transfer_end" in events
    assert all(r.ok for r in result.records) and summary.rows[0]["finished"] == 3


def test_apply_restarts_the_lab_and_keeps_the_previous_run(tmp_path, monkeypatch) -> None:
    """Dashboard Apply: validated config -> new lab (chunk 64) -> old dashboard kept, titled."""
    import labkit
    from labkit.engines.base import pids_in_group
    from labkit.teach import session
    from labkit.viz.controls import LabSettings, WorkloadSettings

    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path))
    lab = labkit.Lab(mode="sim", model="lab-tiny", chunk=256, num_gpu_blocks=64, max_num_seqs=16)
    lab.start(progress=False)
    dash = session.DashboardSession(lab)
    old_widget, old_groups = dash.dashboard.widget, [e.pgid for e in lab.engines.values()]
    try:
        cfg = labkit.lab.build_config("lab-tiny", chunk=64, num_gpu_blocks=64, max_num_seqs=16)
        plan = labkit.plan.validate(cfg, labkit.hardware.simulated(2, "h100"))
        dash.apply(LabSettings(cfg, plan, WorkloadSettings(rate=20.0, prompt_len=100,
                                                           output_len=4, shared_prefix=0.0)))
        assert dash.lab is not lab and dash.lab.is_running()
        assert dash.lab.plan.engine("prefill").max_num_batched_tokens == 64
        assert all(not pids_in_group(g) for g in old_groups)  # the old engines are gone
        assert dash.box.children[1] is dash.dashboard.widget
        acc = dash.box.children[-1]
        assert acc.children[0] is old_widget and "max_num_batched_tokens 256" in acc.get_title(0)
        assert dash.loads[-1].result(timeout=60).records  # the controls' workload was sent
    finally:
        dash.stop()
