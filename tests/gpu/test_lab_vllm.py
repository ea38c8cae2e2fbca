"""The PRODUCT path on real GPUs: `labkit.Lab(mode="vllm")` end to end.

Everything goes through what a notebook uses: `Lab(...)` (the planner, `vllm_args`, the
observer wiring of labkit.plan), `lab.url` (the PD proxy), `lab.telemetry()` (observer
events, proxy timeline, NVML, /metrics) and `lab.stop()`. Each test saves what it measured
to $OUT/<name>.json before asserting, and a recording (labkit.telemetry.recording) where
that module exists.

    one GPU : pytest -m gpu tests/gpu/test_lab_vllm.py -k one_gpu
    two GPUs: pytest -m gpu tests/gpu/test_lab_vllm.py -k two_gpu     (NIXL, TP=2, fp8)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _lab_support import (  # noqa: E402
    PROMPT_TOKENS,
    Poller,
    by_source,
    gpu_used,
    layer_stats,
    metrics,
    num_gpu_blocks,
    prompt_ids,
    recorder,
    stream,
    transfers,
    wait_gpu_back,
)
from _support import out_dir, save_json  # noqa: E402

pytestmark = pytest.mark.gpu


def _num_gpus() -> int:
    try:
        from labkit.telemetry import nvml

        return len(nvml.read_sample().gpus) if nvml.available() else 0
    except Exception:
        return 0


two_gpus = pytest.mark.skipif(_num_gpus() < 2, reason="needs two GPUs")


def _lab(tmp: Path, **knobs: Any) -> Any:
    from labkit.lab import Lab

    return Lab(mode="vllm", model="lab-1b", run_dir=tmp, **knobs)


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists()
            and "Z" not in (Path(f"/proc/{p}/stat").read_text().split()[2:3] or ["Z"])]


def _stop_and_check(lab: Any, res: dict[str, Any], before: list[int]) -> None:
    pids = [p for e in lab.engines.values() for p in e.group_pids()]
    if lab.proxy is not None:
        pids += lab.proxy.group_pids()
    t0 = time.time()
    lab.stop()
    res["stop_s"] = round(time.time() - t0, 2)
    res["pids_left"] = _alive(pids)
    after = wait_gpu_back(before, sorted({g for ep in lab.plan.engines for g in ep.gpus}))
    res["gpu_used_before_mib"] = [b >> 20 for b in before]
    res["gpu_used_after_mib"] = [a >> 20 for a in after]


# ---------------------------------------------------------------------------- one GPU
def test_one_gpu_lab_example_pair(tmp_path: Path) -> None:
    """Lab on one GPU: engines one after the other, ExampleConnector, everything observed."""
    before = gpu_used()
    lab = _lab(tmp_path, num_gpus=1, connector="example")
    res: dict[str, Any] = {"describe": lab.describe(), "plan_blocks": {
        e.name: e.num_blocks for e in lab.plan.engines}}
    t0 = time.time()
    lab.start(progress=False)
    res["start_s"] = round(time.time() - t0, 1)
    try:
        tel = lab.telemetry()
        time.sleep(1.0)  # the engines' observer PUBs reconnect to the bound SUB (ZMQ)
        gpu = lab.plan.gpu_type.name.lower().replace("nvidia ", "").split()[0]  # h100, h200
        src = recorder(tel, lab, f"real-{gpu}-1gpu-example.lkrec", out_dir(),
                       {"workload": "1,081-token prompt, then 8 mixed requests", "test": __name__})
        model = lab.plan.model.name
        with Poller(src) as poll:
            res["first"] = stream(lab.url, model, prompt_ids(PROMPT_TOKENS), 64)
            time.sleep(0.6)
            dec, pre = metrics(lab.engines["decode"].base_url), \
                metrics(lab.engines["prefill"].base_url)
            res["decode_by_source"], res["prefill_by_source"] = by_source(dec), by_source(pre)
            res["engine_blocks"] = {"prefill": num_gpu_blocks(pre), "decode": num_gpu_blocks(dec)}
            for i, n in enumerate((64, 300, 900, 500, 200, 1500, 64, 700)):
                res.setdefault("more", []).append(stream(lab.url, model, prompt_ids(n, i + 1), 32))
            time.sleep(1.5)
        res["telemetry"] = poll.summary()
        res["allocated_external"] = [e.num_external_tokens for _, e in
                                     poll.events("RequestAllocated", "decode")]
        res["save_layers_prefill"] = layer_stats(poll, "prefill", "save")
        res["load_layers_decode"] = layer_stats(poll, "decode", "load")
        res["transfers_decode"] = transfers(poll, "decode")[:4]
        res["peak_process_bytes"] = poll.peak_process_bytes()
        if hasattr(src, "close"):
            res["recording_bytes"] = src.close().stat().st_size
    finally:
        _stop_and_check(lab, res, before)
        save_json("lab_one_gpu.json", res)
    tel_sum = res["telemetry"]
    assert {"prefill", "decode"} <= set(tel_sum["observer_engines"])
    assert {"prefill=prefill", "decode=decode"} <= set(tel_sum["observer_roles"])
    assert res["decode_by_source"]["external_kv_transfer"] == 1072  # whole blocks minus one
    assert res["prefill_by_source"]["local_compute"] >= PROMPT_TOKENS
    assert res["allocated_external"][0] == 1072
    assert {"arrival", "first_token", "finish"} <= set(tel_sum["timeline_events"])
    assert set(tel_sum["metrics_engines"]) == {"prefill", "decode"}
    assert tel_sum["gpu_sample_kinds"] == ["vllm"]
    weights = lab.plan.engines[0].weight_bytes[0]
    for name in ("prefill", "decode"):  # each engine's own process holds weights + its KV
        assert res["peak_process_bytes"][name][0] > weights
    # bracket mode: a "save" LayerTiming per layer of the prompt step, on prefill
    assert res["save_layers_prefill"]["count"] >= lab.plan.model.num_layers
    assert res["pids_left"] == []
    assert res["gpu_used_after_mib"][0] <= res["gpu_used_before_mib"][0] + 512
    from labkit.plan import shared_storage_path  # ExampleConnector's KV files went with it

    assert not Path(shared_storage_path(lab.run_dir)).exists()


# ---------------------------------------------------------------------------- two GPUs
@two_gpus
def test_two_gpu_nixl_pair(tmp_path: Path) -> None:
    """Prefill on GPU 0, decode on GPU 1, NixlConnector; plus a prefill-heavy workload."""
    from labkit.bench.loadgen import run_load
    from labkit.bench.report import summarize
    from labkit.bench.workloads import prefill_heavy

    before = gpu_used()
    lab = _lab(tmp_path, connector="nixl", num_gpus=2)
    res: dict[str, Any] = {"describe": lab.describe(), "link": lab.plan.link}
    t0 = time.time()
    lab.start(progress=False)
    res["start_s"] = round(time.time() - t0, 1)
    try:
        tel = lab.telemetry()
        time.sleep(1.0)  # the engines' observer PUBs reconnect to the bound SUB (ZMQ)
        src = recorder(tel, lab, "real-h200x2-nixl.lkrec", out_dir(),
                       {"workload": "1,081-token prompt, then prefill_heavy(24)", "test": __name__})
        model = lab.plan.model.name
        with Poller(src) as poll:
            res["first"] = stream(lab.url, model, prompt_ids(PROMPT_TOKENS), 64)
            time.sleep(0.6)
            dec = metrics(lab.engines["decode"].base_url)
            res["decode_by_source"] = by_source(dec)
            res["nixl_bytes"] = dec.sum("vllm:nixl_bytes_transferred_sum")
            res["nixl_xfer_s"] = dec.sum("vllm:nixl_xfer_time_seconds_sum")
            res["nixl_xfers"] = dec.sum("vllm:nixl_xfer_time_seconds_count")
            if res["nixl_xfer_s"]:
                res["nixl_gbps"] = round(res["nixl_bytes"] / res["nixl_xfer_s"] / 1e9, 2)
            w = prefill_heavy(24, seed=1)
            load = run_load(lab.url, w, model=model, vocab_size=lab.plan.model.vocab_size,
                            max_concurrency=8)
            res["bench_pd"] = {k: v for k, v in summarize(load.records).items()
                               if k in ("num_ok", "num_errors", "ttft", "itl", "e2e",
                                        "throughput_rps", "output_tps", "duration_s")}
            res["bench_workload"] = w.stats()
            time.sleep(1.0)
        res["telemetry"] = poll.summary()
        ext = [e.num_external_tokens for _, e in poll.events("RequestAllocated", "decode")]
        res["allocated_external"] = [x for x in ext if x][:3]
        res["allocations_with_external"] = sum(1 for x in ext if x)
        recv = [t for t in transfers(poll, "decode") if t["direction"] == "recv"]
        res["recv_transfers"] = len(recv)
        res["recv_bytes_per_token"] = sorted({t["bytes"] // max(1, t["tokens"]) for t in recv})
        res["transfers_decode"] = recv[:6]
        res["peak_process_bytes"] = poll.peak_process_bytes()
        if hasattr(src, "close"):
            res["recording_bytes"] = src.close().stat().st_size
    finally:
        _stop_and_check(lab, res, before)
        save_json("lab_two_gpu_nixl.json", res)
    assert res["decode_by_source"]["external_kv_transfer"] > 1000
    assert res["allocated_external"][0] == res["decode_by_source"]["external_kv_transfer"]
    per_token = lab.plan.model.kv_bytes_per_token("auto", 1)
    assert res["nixl_bytes"] > 1000 * per_token * 0.9
    # one asynchronous KVTransfer per request, with its bytes; no second "load" once it landed
    assert res["recv_transfers"] == res["allocations_with_external"] == 25
    assert res["recv_bytes_per_token"] == [per_token]
    assert {"prefill", "decode"} <= set(res["telemetry"]["observer_engines"])
    assert res["bench_pd"]["num_errors"] == 0
    peak = res["peak_process_bytes"]
    assert list(peak["prefill"]) == [0] and list(peak["decode"]) == [1]
    assert res["pids_left"] == []


@two_gpus
def test_two_gpu_colocated_fp8_vs_auto(tmp_path: Path) -> None:
    """fp8 KV doubles the blocks the planner and vLLM give; the auto engine then serves the
    same prefill-heavy workload as the PD pair (colocated, one GPU)."""
    from labkit.bench.loadgen import run_load
    from labkit.bench.report import summarize
    from labkit.bench.workloads import prefill_heavy

    before = gpu_used()
    labs = {d: _lab(tmp_path / d, colocated=True, num_gpus=1, kv_cache_dtype=d,
                    gpu_memory_utilization=0.4) for d in ("fp8", "auto")}
    res: dict[str, Any] = {"plan_blocks": {d: lab.plan.engines[0].num_blocks
                                           for d, lab in labs.items()}}
    try:
        for d, lab in labs.items():  # one after the other on GPU 0
            lab.start(progress=False)
            res[f"{d}_blocks"] = num_gpu_blocks(metrics(lab.url))
        auto = labs["auto"]
        w = prefill_heavy(24, seed=1)
        load = run_load(auto.url, w, model=auto.plan.model.name,
                        vocab_size=auto.plan.model.vocab_size, max_concurrency=8)
        res["bench_colocated"] = {k: v for k, v in summarize(load.records).items()
                                  if k in ("num_ok", "num_errors", "ttft", "itl", "e2e",
                                           "throughput_rps", "output_tps", "duration_s")}
    finally:
        for lab in labs.values():
            lab.stop()
        res["gpu_used_after_mib"] = [a >> 20 for a in wait_gpu_back(before, [0])]
        save_json("lab_colocated_fp8_auto.json", res)
    assert res["plan_blocks"]["fp8"] == pytest.approx(2 * res["plan_blocks"]["auto"], rel=0.01)
    assert res["fp8_blocks"] == pytest.approx(2 * res["auto_blocks"], rel=0.03)
    assert res["bench_colocated"]["num_errors"] == 0


@two_gpus
def test_two_gpu_tp2_engine(tmp_path: Path) -> None:
    """One colocated TP=2 engine on GPUs 0 and 1: each holds half the weights and its KV."""
    before = gpu_used()
    lab = _lab(tmp_path, colocated=True, tp=2, num_gpus=2)
    ep = lab.plan.engines[0]
    res: dict[str, Any] = {"describe": lab.describe(), "plan_blocks": ep.num_blocks,
                           "plan_weights_per_gpu": ep.weight_bytes[0],
                           "plan_kv_bytes": ep.kv_cache_bytes,
                           "plan_gpu_lines": [[{"w": ln.weights, "kv": ln.kv} for ln in g.lines]
                                              for g in lab.plan.gpus]}
    t0 = time.time()
    lab.start(progress=False)
    res["start_s"] = round(time.time() - t0, 1)
    try:
        tel = lab.telemetry()
        time.sleep(1.0)  # the engines' observer PUBs reconnect to the bound SUB (ZMQ)
        with Poller(tel) as poll:
            res["first"] = stream(lab.url, lab.plan.model.name, prompt_ids(PROMPT_TOKENS), 32)
            time.sleep(1.0)
        res["engine_blocks"] = num_gpu_blocks(metrics(lab.url))
        res["telemetry"] = poll.summary()
        res["peak_process_bytes"] = poll.peak_process_bytes()
        res["gpu_used_mib"] = [u >> 20 for u in gpu_used()]
        st = lab.engines["colocated"].startup
        res["log"] = {k: getattr(st, k, None) for k in ("weights_gib", "kv_cache_gib",
                                                         "kv_cache_tokens")}
    finally:
        _stop_and_check(lab, res, before)
        save_json("lab_tp2.json", res)
    per_gpu = res["peak_process_bytes"].get("colocated", {})
    assert sorted(per_gpu) == [0, 1]  # both GPUs hold the engine's processes' memory
    for g in (0, 1):
        assert per_gpu[g] > ep.weight_bytes[0] + 0.5 * ep.kv_cache_bytes
    assert res["engine_blocks"] == pytest.approx(res["plan_blocks"], rel=0.1)
    assert res["first"]["chunks"] > 0
    assert res["pids_left"] == []
    assert res["plan_weights_per_gpu"] < 0.6 * lab.plan.model.weight_bytes(1, 1)[0]
