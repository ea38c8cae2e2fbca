"""A simulated prefill + decode pair in two processes, for both connector modes of vLLM 0.26.

The flow is the one a PD proxy drives: the prompt goes to prefill with max_tokens=1, then to
decode (with prefill's kv_transfer_params for NIXL). Decode's /metrics must count what vLLM's
connectors count: ExampleConnector loads whole blocks of prompt-minus-one (1,081 tokens ->
1,072, example_connector.py), NIXL pulls every prompt token decode lacks (1,081,
nixl/pull_scheduler.py get_num_new_matched_tokens; the fixture nixl-decode.txt shows 1,088 of
1,088). NIXL's prefill holds the blocks until decode's read notification frees them.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from simpair import sim_pd_processes

from labkit.engines.base import EngineStartError
from labkit.engines.sim.process import SimEngineProcess

pytestmark = pytest.mark.timeout(60)
PROMPT = list(range(1000, 1000 + 1081))
BLOCK = 16
NIXL_PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False,
                       "remote_engine_id": None, "remote_block_ids": None,
                       "remote_host": None, "remote_port": None}


def metric(url: str, name: str, **labels: str) -> float:
    want = {"engine": "0", "model_name": "lab-1b", **labels}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            if s.name == name and s.labels == want:
                return s.value
    raise KeyError(name)


def wait_for(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.fixture(params=["example", "nixl"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, str, Path]]:
    connector = request.param
    with sim_pd_processes(tmp_path, connector, kv_link="nvlink") as (prefill, decode):
        yield connector, prefill, decode, tmp_path


def test_prefill_then_decode(pair: tuple[str, str, str, Path]) -> None:
    connector, prefill, decode, run_dir = pair
    body = {"model": "lab-1b", "prompt": PROMPT, "max_tokens": 1}
    if connector == "nixl":
        body["kv_transfer_params"] = NIXL_PREFILL_PARAMS
    first = httpx.post(f"{prefill}/v1/completions", json=body, timeout=20).json()
    assert first["usage"] == {"prompt_tokens": 1081, "total_tokens": 1082, "completion_tokens": 1,
                              "prompt_tokens_details": None}
    params = first["kv_transfer_params"]
    num_blocks = -(-1081 // BLOCK)  # 68
    info = httpx.get(f"{prefill}/labkit/info").json()
    usage_after_prefill = metric(prefill, "vllm:kv_cache_usage_perc")
    if connector == "nixl":
        # prefill keeps the blocks for decode to read (delay-free), as vLLM's NixlConnector
        assert params["do_remote_prefill"] is True and params["remote_num_tokens"] == 1081
        assert len(params["remote_block_ids"][0]) == num_blocks
        assert params["remote_engine_id"] == info["engine_id"]
        assert params["remote_port"] == int(prefill.rsplit(":", 1)[1])
        assert usage_after_prefill == pytest.approx(num_blocks / (info["num_gpu_blocks"] - 1))
    else:
        assert params is None and usage_after_prefill == 0.0  # saved to storage, freed at once
        assert len(list((run_dir / "kv-store").glob("*.json"))) == 1

    second = {"model": "lab-1b", "prompt": PROMPT, "max_tokens": 8}
    if connector == "nixl":
        second["kv_transfer_params"] = params
    out = httpx.post(f"{decode}/v1/completions", json=second, timeout=20).json()
    assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["finish_reason"] == "length"

    external = metric(decode, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    local = metric(decode, "vllm:prompt_tokens_by_source_total", source="local_compute")
    if connector == "example":
        assert (external, local) == (1072, 9)
    else:
        assert (external, local) == (1081, 0)
        per_token = info["kv_bytes_per_token"]
        assert metric(decode, "vllm:nixl_bytes_transferred_sum") == num_blocks * BLOCK * per_token
        assert metric(decode, "vllm:nixl_bytes_transferred_count") == 1
        # decode's read notification released prefill's blocks
        assert wait_for(lambda: metric(prefill, "vllm:kv_cache_usage_perc") == 0.0)
        freed = httpx.get(f"{prefill}/labkit/info").json()["num_free_blocks"]
        assert freed == info["num_gpu_blocks"] - 1
    assert metric(decode, "vllm:external_prefix_cache_hits_total") == external


def test_storage_outside_run_dir_is_refused(tmp_path: Path) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    proc = SimEngineProcess("bad", connector="example", kv_storage=str(outside),
                            run_dir=tmp_path / "run", log_path=tmp_path / "bad.log", fast=True)
    proc.start()
    try:
        with pytest.raises(EngineStartError, match="outside the run directory"):
            proc.wait_ready(timeout=20)
    finally:
        proc.stop()
    assert not outside.exists()


@pytest.mark.parametrize("pair", ["nixl"], indirect=True)
def test_read_notification_for_unknown_request_is_404(pair: tuple[str, str, str, Path]) -> None:
    _, prefill, _, _ = pair
    resp = httpx.post(f"{prefill}/labkit/kv/read", json={"remote_request_id": "cmpl-nope"})
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "remote_request_id"
