"""The NIXL prefill lease of vLLM 0.26, in the simulator.

A NIXL prefill engine holds a finished request's blocks for decode for `kv_lease_duration`
seconds (kv_connector_extra_config, default 30: nixl/base_scheduler.py); decode heartbeats
extend it by lease * 2 // 3 while the request waits (base_worker.py `_handle_heartbeat`); an
expired lease frees the blocks and counts vllm:nixl_num_kv_expired_reqs (base_worker.py
get_finished). In-process engines share a simulated clock; engine processes measure the
lease on the wall clock when fast.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from simpair import sim_pd_processes

from labkit.engines.sim.clock import SimClock
from labkit.engines.sim.connector import InProcessTransport, NixlConnector, nixl_extra_config
from labkit.engines.sim.engine import SimEngine
from labkit.hardware import LINKS

pytestmark = pytest.mark.timeout(60)
PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}
PROMPT = list(range(1000, 1000 + 100))  # 7 blocks of 16
BLOCKS = 7


def _pair(lease: float, **decode_kw: object) -> tuple[SimEngine, SimEngine, SimClock]:
    clock = SimClock()
    transport = InProcessTransport(LINKS["nvlink"], LINKS["same-gpu"])
    extra = {"kv_lease_duration": lease, "backends": ["UCX"]}  # other keys: vLLM's, ignored
    kw = dict(connector="nixl", transport=transport, clock=clock, num_gpu_blocks=64,
              kv_connector_extra_config=extra)
    prefill = SimEngine("lab-1b", engine_id="P", **kw)  # type: ignore[arg-type]
    decode = SimEngine("lab-1b", engine_id="D", **{**kw, **decode_kw})  # type: ignore[arg-type]
    return prefill, decode, clock


def _nixl(engine: SimEngine) -> NixlConnector:
    assert isinstance(engine.connector, NixlConnector)
    return engine.connector


def _prefill(prefill: SimEngine, rid: str = "r0") -> tuple[dict, float]:
    """Run one request through prefill; (its kv_transfer_params, the time it finished)."""
    prefill.add_request(rid, PROMPT, 1, kv_transfer_params=dict(PREFILL_PARAMS))
    for _ in range(20):
        res = prefill.step()
        for request, params in res.finished:
            if request.request_id == rid:
                return params, res.end
    raise AssertionError("prefill did not finish")


def _free(engine: SimEngine) -> int:
    return engine.kv_cache_manager.block_pool.get_num_free_blocks()


def test_lease_duration_comes_from_kv_connector_extra_config() -> None:
    prefill, _, _ = _pair(6)
    c = _nixl(prefill)
    assert (c.kv_lease_duration, c.heartbeat_interval, c.lease_extension) == (6, 1, 4)
    assert _nixl(SimEngine("lab-1b", connector="nixl", num_gpu_blocks=64)).kv_lease_duration == 30
    assert nixl_extra_config({"kv_lease_duration": 2, "backends": ["UCX"]}) == {"kv_lease_duration": 2}
    for bad in (0, -1, "30", True, float("inf")):
        with pytest.raises(ValueError, match="kv_lease_duration"):
            nixl_extra_config({"kv_lease_duration": bad})


def test_unread_blocks_are_freed_when_the_lease_expires() -> None:
    prefill, _, clock = _pair(3)
    free0 = _free(prefill)
    params, done = _prefill(prefill)
    assert params["remote_engine_id"] == "P" and len(params["remote_block_ids"][0]) == BLOCKS
    assert _free(prefill) == free0 - BLOCKS  # held for decode
    expiry = _nixl(prefill).next_lease_expiry()  # set when the request finished: + 3 s
    assert expiry is not None and done + 3 - 0.05 <= expiry <= done + 3 + 1e-9
    # the engine wants to wake at the expiry (nothing else is pending)
    assert prefill.next_event_time() == expiry
    clock.advance_to(expiry - 0.5)
    prefill.step()
    prefill.step()
    assert _free(prefill) == free0 - BLOCKS and _nixl(prefill).num_expired == 0
    clock.advance_to(expiry)
    prefill.step()
    prefill.step()
    assert _nixl(prefill).num_expired == 1
    assert _free(prefill) == free0
    assert prefill.get_request("r0") is None
    assert prefill.next_event_time() is None


def _decode_step(decode: SimEngine, prefill: SimEngine) -> object:
    """One decode step, then prefill at its end; an idle decode jumps to its next KV landing."""
    res = decode.step()
    if not res.num_scheduled_tokens and decode.next_event_time() is not None:
        decode.clock.advance_to(max(decode.clock.now(), decode.next_event_time()))
    prefill.step(now=max(res.end, decode.clock.now()))
    return res


def _decode_until(decode: SimEngine, prefill: SimEngine, rid: str, limit: int = 200) -> None:
    for _ in range(limit):
        res = _decode_step(decode, prefill)
        if any(r.request_id == rid for r, _ in res.finished):
            return
    raise AssertionError("decode did not finish")


def test_a_read_in_time_frees_the_blocks_and_nothing_expires() -> None:
    prefill, decode, clock = _pair(3)
    free0 = _free(prefill)
    params, _ = _prefill(prefill)
    decode.add_request("r0", PROMPT, 4, kv_transfer_params=params)
    _decode_until(decode, prefill, "r0")
    for _ in range(3):
        prefill.step()
    assert _free(prefill) == free0  # freed by the read notification
    assert _nixl(prefill).num_expired == 0
    assert _nixl(prefill).next_lease_expiry() is None
    clock.advance(10)  # long past the lease: nothing left to expire
    prefill.step()
    assert _nixl(prefill).num_expired == 0


def test_heartbeats_keep_a_queued_request_s_blocks() -> None:
    """Decode is full (max_num_seqs=1, a long request running): the second request waits in
    its queue past prefill's lease; its heartbeats keep prefill's blocks until the read."""
    prefill, decode, clock = _pair(6, max_num_seqs=1, num_gpu_blocks=512)
    free0 = _free(prefill)
    decode.add_request("long", list(range(5, 40)), 6000)  # local, no KV transfer
    decode.step()
    params, done = _prefill(prefill, "r1")
    decode.add_request("r1", PROMPT, 2, kv_transfer_params=params)
    _decode_step(decode, prefill)  # admitted (async scheduling: at the next step)
    assert _nixl(decode)._heartbeat_by_engine == {"P": {"r1"}}
    first_expiry = _nixl(prefill).next_lease_expiry()
    assert first_expiry is not None
    for _ in range(10_000):
        if clock.now() >= first_expiry + 8:  # well past the first lease
            break
        assert _decode_step(decode, prefill).num_scheduled_tokens  # the long one runs
        assert decode.get_request("r1").num_computed_tokens == 0  # still queued, not read
    assert _nixl(prefill).num_expired == 0
    assert _free(prefill) == free0 - BLOCKS
    assert _nixl(prefill).next_lease_expiry() > first_expiry + 8  # extended by the heartbeats
    decode.abort("long")
    _decode_until(decode, prefill, "r1", limit=400)
    for _ in range(3):
        prefill.step()
    assert _free(prefill) == free0 and _nixl(prefill).num_expired == 0
    assert _nixl(decode)._heartbeat_by_engine == {}  # stopped once the read landed


def test_without_heartbeats_the_queued_request_s_blocks_expire() -> None:
    """The same queue without heartbeats (kv_transfer_params lacking tp_size: vLLM's
    on_new_request does not track it): prefill frees after the lease."""
    prefill, decode, clock = _pair(6, max_num_seqs=1, num_gpu_blocks=512)
    free0 = _free(prefill)
    decode.add_request("long", list(range(5, 40)), 6000)
    decode.step()
    params, _ = _prefill(prefill, "r1")
    params = {k: v for k, v in params.items() if k != "tp_size"}
    decode.add_request("r1", PROMPT, 2, kv_transfer_params=params)
    _decode_step(decode, prefill)
    assert _nixl(decode)._heartbeat_by_engine == {}
    expiry = _nixl(prefill).next_lease_expiry()
    for _ in range(10_000):
        if clock.now() >= expiry + 1:
            break
        assert _decode_step(decode, prefill).num_scheduled_tokens
    assert _nixl(prefill).num_expired == 1 and _free(prefill) == free0


# ---- two engine processes: the lease on the wall clock, the metric on /metrics --------------
def _metric(url: str, name: str) -> float:
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[tuple[str, str]]:
    cfg = '{"kv_connector": "NixlConnector", "kv_connector_extra_config": {"kv_lease_duration": 2}}'
    with sim_pd_processes(tmp_path, "nixl", num_gpu_blocks=256, kv_transfer_config=cfg) as urls:
        yield urls


def test_engine_processes_expire_unread_blocks_and_count_them(processes: tuple[str, str]) -> None:
    prefill, decode = processes
    assert httpx.get(f"{prefill}/labkit/info").json()["args"]["kv_transfer_config"] == {
        "kv_connector": "NixlConnector", "kv_connector_extra_config": {"kv_lease_duration": 2}}
    body = {"model": "lab-1b", "prompt": PROMPT, "max_tokens": 1,
            "kv_transfer_params": PREFILL_PARAMS}
    read = httpx.post(f"{prefill}/v1/completions", json=body, timeout=20).json()
    t0 = time.monotonic()
    assert _metric(prefill, "vllm:kv_cache_usage_perc") > 0
    # decode reads one request in time: freed by the read, not expired
    dbody = {"model": "lab-1b", "prompt": PROMPT, "max_tokens": 2,
             "kv_transfer_params": read["kv_transfer_params"]}
    assert httpx.post(f"{decode}/v1/completions", json=dbody, timeout=20).status_code == 200
    deadline = time.monotonic() + 1.0
    while _metric(prefill, "vllm:kv_cache_usage_perc") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(prefill, "vllm:kv_cache_usage_perc") == 0
    assert time.monotonic() - t0 < 2  # before the lease could have run out
    assert _metric(prefill, "vllm:nixl_num_kv_expired_reqs_total") == 0
    # a second one decode never reads: held for the lease (2 s of wall time), then freed
    body["prompt"] = [7, *PROMPT]
    httpx.post(f"{prefill}/v1/completions", json=body, timeout=20).raise_for_status()
    t1 = time.monotonic()
    assert _metric(prefill, "vllm:kv_cache_usage_perc") > 0
    time.sleep(1.0)
    assert _metric(prefill, "vllm:kv_cache_usage_perc") > 0  # still held at 1 s
    while _metric(prefill, "vllm:nixl_num_kv_expired_reqs_total") < 1:
        assert time.monotonic() - t1 < 4, "the lease did not expire"
        time.sleep(0.05)
    waited = time.monotonic() - t1
    assert 1.8 <= waited <= 3.0, waited
    assert _metric(prefill, "vllm:kv_cache_usage_perc") == 0
    assert _metric(prefill, "vllm:nixl_num_kv_expired_reqs_total") == 1
    # a third one kept by heartbeats (what a decode engine sends while the request waits in
    # its queue): POST /labkit/kv/heartbeat every 0.3 s for 3 s, past the 2 s lease
    body["prompt"] = [8, *PROMPT]
    third = httpx.post(f"{prefill}/v1/completions", json=body, timeout=20).json()
    rid = third["kv_transfer_params"]["remote_request_id"]
    t2 = time.monotonic()
    while time.monotonic() - t2 < 3.0:
        hb = httpx.post(f"{prefill}/labkit/kv/heartbeat", json={"req_ids": [rid]}, timeout=5)
        assert hb.status_code == 200 and hb.json()["num_req_ids"] == 1
        time.sleep(0.3)
    assert _metric(prefill, "vllm:kv_cache_usage_perc") > 0  # still held
    assert _metric(prefill, "vllm:nixl_num_kv_expired_reqs_total") == 1
    while _metric(prefill, "vllm:nixl_num_kv_expired_reqs_total") < 2:  # heartbeats stopped
        assert time.monotonic() - t2 < 6, "the extended lease did not expire"
        time.sleep(0.05)
    assert _metric(prefill, "vllm:kv_cache_usage_perc") == 0
