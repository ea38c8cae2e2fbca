"""The CPU tier (vLLM 0.26's OffloadingConnector, --kv-offloading-size) in the simulator.

Numbers are checked against a real vLLM 0.26 offload engine
(../shared/fixtures/vllm-0.26/metrics/offload-small.txt): 80 GPU blocks, 1 GiB of host
memory, twelve 600-token prompts then three repeats -> 12 stores of 37 blocks
(465,567,744 B), 3 loads of 37 blocks (116,391,936 B), 1,776 external prompt tokens.
"""
from __future__ import annotations

import random
import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from labkit.engines.sim.engine import SimEngine
from labkit.engines.sim.offload import CPUOffloadingManager, LookupResult
from labkit.engines.sim.process import SimEngineProcess
from labkit.telemetry import observer_schema as obs
from labkit.viz.offload import OffloadState, OffloadView
from labkit.vocab import HOST_LOADING, HOST_STORED, HOST_STORING

pytestmark = pytest.mark.timeout(60)


def drive(e: SimEngine) -> None:
    """Step until idle; an idle engine jumps to its next transfer's end (as the runner does)."""
    for _ in range(10_000):
        if not e.has_unfinished():
            return
        r = e.step()
        if not r.num_scheduled_tokens and not r.emitted:
            nxt = e.next_event_time()
            if nxt is not None:
                e.clock.advance_to(max(nxt, e.clock.now()))
    raise AssertionError("engine did not go idle")


def prompts(n: int, length: int = 600, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 30000) for _ in range(length)] for _ in range(n)]


def fixture_workload(e: SimEngine, ps: list[list[int]]) -> None:
    for i, p in enumerate(ps):
        e.add_request(f"r{i}", p, 4)
        drive(e)
    for i in range(3):
        e.add_request(f"again{i}", ps[i], 4)
        drive(e)


def test_resent_prompt_after_gpu_eviction_loads_from_cpu_tier_like_vllm() -> None:
    e = SimEngine("lab-1b", "h100", num_gpu_blocks=80, max_model_len=1024, kv_offloading_size=1.0)
    o = e.offload
    assert o is not None and o.manager.num_blocks == 1024  # 1 GiB / 1 MiB per lab-1b block
    fixture_workload(e, prompts(12))
    assert o.stats["GPU_to_CPU"][0] == 465_567_744 and len(o.stats["GPU_to_CPU"][2]) == 12
    assert o.stats["CPU_to_GPU"][0] == 116_391_936 and len(o.stats["CPU_to_GPU"][2]) == 3
    by = e.stats.prompt_tokens_by_source
    assert by["external_kv_transfer"] == 1776 and by["local_cache_hit"] == 0
    assert e.external_prefix_cache_stats[1] == 1776
    states = o.manager.block_states()
    assert states.count(HOST_STORED) == 444 and HOST_STORING not in states and HOST_LOADING not in states
    # Simulated host link: the GPU's PCIe peak (64 GB/s on an H100); the real run got ~38 GB/s.
    assert 0.005 < o.stats["GPU_to_CPU"][1] < 0.0125


def test_without_cpu_tier_the_resent_prompt_is_recomputed() -> None:
    e = SimEngine("lab-1b", "h100", num_gpu_blocks=80, max_model_len=1024)
    fixture_workload(e, prompts(12))
    assert e.offload is None
    assert e.stats.prompt_tokens_by_source["external_kv_transfer"] == 0


def test_cpu_tier_lru_evicts_the_oldest_prompt_head_first_like_vllm() -> None:
    # 120 CPU blocks, 37 per prompt: the fourth store evicts 28 blocks of the first prompt.
    # complete_store makes a job's blocks evictable in order (manager.py), so the LRU drops
    # the HEAD of the oldest prompt first: its 9 tail blocks stay stored but no prefix
    # lookup can reach them, and a re-sent first prompt is recomputed.
    e = SimEngine("lab-1b", "h100", num_gpu_blocks=80, max_model_len=1024,
                  kv_offloading_size=120 * 2**20 / 2**30)
    ps = prompts(4)
    hashes = []
    for i, p in enumerate(ps):
        e.add_request(f"r{i}", p, 2)
        hashes.append(list(e.get_request(f"r{i}").block_hashes))
        drive(e)
    mgr = e.offload.manager
    assert mgr.num_blocks == 120 and len(mgr.evictable) == 120
    assert [mgr.lookup(h) for h in hashes[0]] == [LookupResult.MISS] * 28 + [LookupResult.HIT] * 9
    e.add_request("again0", ps[0], 2)
    drive(e)
    by = e.stats.prompt_tokens_by_source
    assert by["external_kv_transfer"] == 0 and by["local_cache_hit"] == 0
    # Storing it again evicted the next least recent heads (the second prompt's); the third
    # prompt is still whole in the CPU tier: what the GPU no longer holds loads from it.
    assert mgr.lookup(hashes[1][0]) == LookupResult.MISS
    e.add_request("again2", ps[2], 2)
    drive(e)
    assert by["external_kv_transfer"] >= 16 * 16
    assert by["external_kv_transfer"] + by["local_cache_hit"] == 37 * 16


def test_manager_block_lifecycle_follows_vllm_ref_counts() -> None:
    m = CPUOffloadingManager(4)
    keys, ids, evicted = m.prepare_store([1, 2, 3])
    assert (keys, ids, evicted) == ([1, 2, 3], [0, 1, 2], [])
    assert m.lookup(1) == LookupResult.HIT_PENDING  # being written: the lookup defers
    m.complete_store([1, 2, 3])
    assert m.lookup(1) == LookupResult.HIT and m.usage()[0] == 0.0
    assert m.prepare_load([2]) == [1]
    assert m.block_states()[1] == HOST_LOADING
    m.touch([1])  # 1 most recent, 3 least recent evictable
    keys, ids, evicted = m.prepare_store([4, 5])  # one free block, one eviction
    assert evicted == [3] and sorted(ids) == [2, 3]
    assert m.prepare_store([6, 7, 8]) is None  # 2 evictable (1, 4 pending -> no), 2 loading
    m.complete_load([2])
    assert m.block_states()[1] == HOST_STORED


def test_pd_decode_with_offload_uses_multiconnector_and_nixl_first() -> None:
    from labkit.engines.sim.offload import MultiConnector

    e = SimEngine("lab-1b", "h100", num_gpu_blocks=200, connector="nixl", kv_offloading_size=1.0)
    assert isinstance(e.connector, MultiConnector) and e.connector.connectors[0].name == "nixl"
    assert e.scheduler.defer_block_free  # kv_both: a KV consumer


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sim_server_with_offload_exports_vllm_metrics(tmp_path) -> None:
    proc = SimEngineProcess("sim", run_dir=tmp_path, log_path=tmp_path / "sim.log", fast=True,
                            model="lab-1b", num_gpu_blocks_override=80, max_model_len=1024,
                            kv_offloading_size=1.0, port=_port())
    proc.start()
    try:
        proc.wait_ready(timeout=30)
        url = proc.base_url
        time.sleep(0.3)
        ps = prompts(4, length=600, seed=3)
        for p in [*ps, ps[0]]:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": p, "max_tokens": 2}, timeout=30)
            assert r.status_code == 200
        time.sleep(0.5)
        text = httpx.get(f"{url}/metrics").text
        vals = {(s.name, s.labels.get("transfer_type", "")): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert vals[("vllm:kv_offload_total_bytes_total", "GPU_to_CPU")] == 4 * 37 * 2**20
        assert vals[("vllm:kv_offload_total_bytes_total", "CPU_to_GPU")] == 37 * 2**20
        assert vals[("vllm:kv_offload_store_bytes_total", "")] == 4 * 37 * 2**20
        assert vals[("vllm:kv_offload_load_size_count", "")] == 1
        assert vals[("vllm:kv_offload_total_time_total", "CPU_to_GPU")] > 0
        assert vals[("vllm:kv_offload_cpu_allocation_size_sum", "")] == 4 * 37
        assert 'kv_offloading_size="1.0"' in text
        src = {s.labels.get("source"): s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples if s.name == "vllm:prompt_tokens_by_source_total"}
        assert src["external_kv_transfer"] == 592
    finally:
        proc.stop()


class _Capture:
    """Stands in for the runner's ObserverPublisher: keeps the batches."""

    def __init__(self) -> None:
        self.batches: list[obs.ObserverBatch] = []

    def publish(self, events: list, ts: float | None = None, **_: object) -> bool:
        self.batches.append(obs.ObserverBatch("sim-0", "both", "sim", ts or 0.0, list(events)))
        return True


def test_runner_emits_host_tier_and_offload_transfers_and_the_view_draws_them() -> None:
    from labkit.engines.sim.runner import EngineRunner, SimServerArgs

    runner = EngineRunner(SimServerArgs(model="lab-1b", num_gpu_blocks_override=80, max_model_len=1024,
                                        kv_offloading_size=1.0, fast=True))
    cap = _Capture()
    runner.observer = cap  # type: ignore[assignment]
    eng = runner.engine
    ps = prompts(4, seed=3)
    for i, p in enumerate([*ps, ps[0]]):
        eng.add_request(f"q{i}", p, 2)
        for _ in range(1000):
            if not eng.has_unfinished():
                break
            res = eng.step()
            runner._after_step(res)
            runner._snapshot(force=True)
            if not res.num_scheduled_tokens and not res.emitted:
                nxt = eng.next_event_time()
                if nxt is not None:
                    eng.clock.advance_to(max(nxt, eng.clock.now()))
    state = OffloadState()
    for b in cap.batches:  # through the wire format, as the lab receives them
        state.apply(obs.decode_observer_batch(obs.encode_observer_batch(b)))
    tier = state.engines["sim-0"]
    assert tier.num_jobs == {"GPU_to_CPU": 4, "CPU_to_GPU": 1}
    assert tier.total_bytes == {"GPU_to_CPU": 4 * 37 * 2**20, "CPU_to_GPU": 37 * 2**20}
    assert tier.num_blocks == 1024 and tier.counts[HOST_STORED] == 4 * 37
    view = OffloadView(state)
    assert view.update()
    assert list(view.figure.data[1].x) == [4 * 37]  # stored blocks of the engine
    assert sum(view.figure.data[5].y) == -37 * 2**20  # one load, drawn downwards
    assert "SIMULATED" in view.figure.layout.title.text


def test_old_recordings_still_load_and_show_no_cpu_tier() -> None:
    import labkit

    paths = [p for p in labkit.recordings()]
    assert paths
    for path in paths[:2]:
        src = labkit.replay(path, speed=0) if "speed" in labkit.replay.__code__.co_varnames else labkit.replay(path)
        state = OffloadState()
        delta = src.poll()
        for batch in delta.observer:
            state.apply(batch)
        assert state.engines == {}
        view = OffloadView(state)
        view.update()
        assert view.figure.layout.xaxis2.title.text in ("no CPU tier", None, "scheduler step")
