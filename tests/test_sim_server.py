"""The simulated engine over real HTTP: one `python -m labkit.engines.sim` subprocess (started
through SimEngineProcess, --fast, a tiny KV pool), the openai client, /metrics parsed with
prometheus_client, vLLM's error bodies compared with the 0.26 captures, and KV / observer
events read from ZMQ sockets and decoded with labkit.telemetry."""
from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import zmq
from labfixtures import FIXTURES
from prometheus_client.parser import text_string_to_metric_families

from labkit.engines.sim.metrics import TTFT_BUCKETS
from labkit.engines.sim.process import SimEngineProcess
from labkit.telemetry import observer_schema as obs
from labkit.telemetry.kv_events import BlockRemoved, BlockStored, decode_frames

pytestmark = pytest.mark.timeout(60)
HTTP = FIXTURES / "http"
NUM_BLOCKS = 24  # with the null block: 23 usable blocks of 16 tokens
MAX_LEN = 256


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixture(name: str) -> tuple[int, str]:
    status, _, body = (HTTP / name).read_text().partition("\n")
    return int(status), body


def _keys(d: object) -> object:
    """The key structure of a JSON value (dicts -> sorted keys with nested structure)."""
    if isinstance(d, dict):
        return {k: _keys(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_keys(d[0])] if d and isinstance(d[0], dict) else []
    return None


class Engine:
    """The running engine plus the ZMQ sockets that listen to it."""

    def __init__(self, proc: SimEngineProcess, kv_sub: zmq.Socket, obs_sub: zmq.Socket) -> None:
        self.proc, self.kv_sub, self.obs_sub = proc, kv_sub, obs_sub
        self.url = proc.base_url

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(self, name: str, **labels: str) -> float:
        want = {"engine": "0", "model_name": "lab-1b", **labels}
        return self.metrics()[(name, tuple(sorted(want.items())))]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    run = tmp_path_factory.mktemp("run")
    ctx = zmq.Context.instance()
    kv_ep = f"tcp://127.0.0.1:{_port()}"
    obs_sub = ctx.socket(zmq.SUB)
    obs_sub.setsockopt(zmq.SUBSCRIBE, obs.OBS_TOPIC)
    obs_port = obs_sub.bind_to_random_port("tcp://127.0.0.1")
    proc = SimEngineProcess("sim", run_dir=run, log_path=run / "sim.log", fast=True,
                            model="lab-1b", num_gpu_blocks_override=NUM_BLOCKS,
                            max_model_len=MAX_LEN, kv_events_endpoint=kv_ep,
                            observer_endpoint=f"tcp://127.0.0.1:{obs_port}")
    kv_sub = ctx.socket(zmq.SUB)
    kv_sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    kv_sub.bind(kv_ep)  # like vLLM, the simulator connects its KV-event PUB to a concrete address
    proc.start()
    try:
        proc.wait_ready(timeout=30)
        time.sleep(0.3)  # PUB/SUB slow joiner
        yield Engine(proc, kv_sub, obs_sub)
    finally:
        proc.stop()
        kv_sub.close(0)
        obs_sub.close(0)


def test_openai_client_completes_and_streams(engine: Engine) -> None:
    client = openai.OpenAI(base_url=f"{engine.url}/v1", api_key="none")
    done = client.completions.create(model="lab-1b", prompt="the memory cache of the model",
                                     max_tokens=5)
    assert done.id.startswith("cmpl-")
    assert done.usage.completion_tokens == 5 and done.usage.prompt_tokens > 1
    assert done.choices[0].finish_reason == "length" and done.choices[0].text
    chunks = list(client.completions.create(model="lab-1b", prompt=[1, 500, 501, 502],
                                            max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == 4
    assert [c.choices[0].finish_reason for c in token_chunks] == [None, None, None, "length"]
    assert chunks[-1].usage.prompt_tokens == 4 and chunks[-1].usage.completion_tokens == 4
    chat = client.chat.completions.create(model="lab-1b", max_tokens=3,
                                          messages=[{"role": "user", "content": "hello"}])
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3


def test_sse_stream_shape_matches_vllm(engine: Engine) -> None:
    status, body = _fixture("nixl-decode-stream.sse")
    real = [json.loads(line[6:]) for line in body.splitlines()
            if line.startswith("data: {")]
    with httpx.stream("POST", f"{engine.url}/v1/completions", json={
            "prompt": list(range(10, 40)), "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == status
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and body.rstrip().endswith("data: [DONE]")
    ours = [json.loads(line[6:]) for line in lines[:-1]]
    assert len(ours) == len(real) == 6
    assert [list(c) for c in ours] == [list(c) for c in real]  # same keys, same order
    assert [list(c["choices"][0]) for c in ours[:-1]] == [list(c["choices"][0]) for c in real[:-1]]
    assert ours[-1]["usage"] == {"prompt_tokens": 30, "total_tokens": 35, "completion_tokens": 5}


def test_models_and_health_match_fixture(engine: Engine) -> None:
    status, body = _fixture("models.json")
    resp = httpx.get(f"{engine.url}/v1/models")
    assert resp.status_code == status
    assert _keys(resp.json()) == _keys(json.loads(body))
    card = resp.json()["data"][0]
    assert card["id"] == "lab-1b" and card["max_model_len"] == MAX_LEN and card["owned_by"] == "vllm"
    health = httpx.get(f"{engine.url}/health")
    assert (health.status_code, health.content) == (200, b"")


def test_completion_body_matches_fixture(engine: Engine) -> None:
    _, body = _fixture("completion-text-prompt.json")
    resp = httpx.post(f"{engine.url}/v1/completions", json={"prompt": "hello there", "max_tokens": 4})
    assert resp.status_code == 200
    assert _keys(resp.json()) == _keys(json.loads(body))


@pytest.mark.parametrize(("fixture", "payload"), [
    ("error-bad-json.json", {"prompt": 5}),
    ("error-negative-max-tokens.json", {"prompt": "x", "max_tokens": -3}),
    ("error-unknown-model.json", {"model": "nope", "prompt": "x"}),
    ("error-prompt-too-long.json", {"prompt": [7] * 1989, "max_tokens": 4}),
])
def test_errors_match_vllm(engine: Engine, fixture: str, payload: dict) -> None:
    status, body = _fixture(fixture)
    want = json.loads(body)["error"]
    resp = httpx.post(f"{engine.url}/v1/completions", json=payload)
    got = resp.json()["error"]
    assert resp.status_code == status == got["code"]
    assert list(got) == list(want) and got["type"] == want["type"] and got["param"] == want["param"]
    # same sentence with our numbers (max_model_len here is 256, not 1024)
    pattern = re.escape(want["message"]).replace("1024", str(MAX_LEN))
    assert re.fullmatch(pattern, got["message"]), (got["message"], want["message"])


def test_invalid_json_is_a_400(engine: Engine) -> None:
    resp = httpx.post(f"{engine.url}/v1/completions", content=b"{bad",
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "Bad Request"


def test_metrics_count_prompt_tokens(engine: Engine) -> None:
    before = engine.value("vllm:prompt_tokens_total")
    gen_before = engine.value("vllm:generation_tokens_total")
    for n in (17, 33):
        httpx.post(f"{engine.url}/v1/completions",
                   json={"prompt": list(range(3000 + n, 3000 + 2 * n)), "max_tokens": 2})
    m = engine.metrics()
    lab = (("engine", "0"), ("model_name", "lab-1b"))
    assert m[("vllm:prompt_tokens_total", lab)] - before == 17 + 33
    assert m[("vllm:generation_tokens_total", lab)] - gen_before == 4
    by_source = sum(m[("vllm:prompt_tokens_by_source_total", tuple(sorted((*lab, ("source", s)))))]
                    for s in ("local_compute", "local_cache_hit", "external_kv_transfer"))
    assert by_source == m[("vllm:prompt_tokens_total", lab)]
    ttft_le = sorted(float(dict(k[1])["le"]) for k in m
                     if k[0] == "vllm:time_to_first_token_seconds_bucket")
    assert ttft_le == [*TTFT_BUCKETS, float("inf")]
    info = [dict(k[1]) for k in m if k[0] == "vllm:cache_config_info"]
    assert info[0]["num_gpu_blocks"] == str(NUM_BLOCKS) and info[0]["block_size"] == "16"
    sim = [dict(k[1]) for k in m if k[0] == "labkit:sim_info"]
    assert sim and sim[0]["kind"] == "sim" and sim[0]["gpu_type"] == "h100"


def _drain_kv(sock: zmq.Socket, seconds: float) -> list:
    events, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sock.poll(100):
            topic, _seq, batch = decode_frames(sock.recv_multipart())
            assert topic == "kv"
            events.extend(batch.events)
    return events


def test_kv_events_stored_then_removed_on_eviction(engine: Engine) -> None:
    _drain_kv(engine.kv_sub, 0.2)  # what earlier tests caused
    first = list(range(20000, 20064))  # 4 full blocks
    httpx.post(f"{engine.url}/v1/completions", json={"prompt": first, "max_tokens": 1})
    stored = [e for e in _drain_kv(engine.kv_sub, 0.5) if isinstance(e, BlockStored)]
    hashes = {h for e in stored for h in e.block_hashes}
    assert len(hashes) == 4 and stored[0].block_size == 16 and stored[0].medium == "GPU"
    assert stored[0].token_ids[:16] == first[:16]
    for i in range(4):  # 4 x 9 blocks through a pool of 23: the first prompt's blocks go
        prompt = list(range(21000 + 1000 * i, 21000 + 1000 * i + 130))
        httpx.post(f"{engine.url}/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    removed = {h for e in _drain_kv(engine.kv_sub, 0.5) if isinstance(e, BlockRemoved)
               for h in e.block_hashes}
    assert hashes <= removed


def test_observer_events(engine: Engine) -> None:
    sub = engine.obs_sub
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and sub.poll(50):
        sub.recv_multipart()  # drop the backlog
    resp = httpx.post(f"{engine.url}/v1/completions",
                      json={"prompt": list(range(26000, 26040)), "max_tokens": 3}).json()
    seen: dict[str, list] = {}
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if sub.poll(100):
            batch = obs.decode_observer_frames(sub.recv_multipart())
            assert batch.kind == "sim" and batch.role == "both"
            for ev in batch.events:
                seen.setdefault(type(ev).__name__, []).append(ev)
        if "RequestFinished" in seen and "PoolSnapshot" in seen:
            break
    rid = next(e.req_id for e in seen["RequestAllocated"] if e.req_id.startswith(resp["id"]))
    alloc = next(e for e in seen["RequestAllocated"] if e.req_id == rid)
    assert len(alloc.block_ids) == 3 and 0 not in alloc.block_ids  # 40 tokens + 1: 3 blocks
    steps = [s for s in seen["StepScheduled"] if rid in s.num_scheduled_tokens]
    assert [s.num_scheduled_tokens[rid] for s in steps] == [40, 1, 1]
    assert steps[0].new_block_ids[rid] == alloc.block_ids
    fin = next(e for e in seen["RequestFinished"] if e.req_id == rid)
    assert fin.block_ids == alloc.block_ids and not fin.delay_free
    snap = seen["PoolSnapshot"][-1]
    assert snap.num_blocks == NUM_BLOCKS and len(snap.block_state) == NUM_BLOCKS


def test_startup_log_is_vllm_shaped_and_says_simulated(engine: Engine) -> None:
    state = engine.proc.startup
    assert state.kv_cache_tokens == NUM_BLOCKS * 16 and state.ready
    text = Path(engine.proc.log_path).read_text()
    assert "SIMULATED" in text and "GPU KV cache size: 384 tokens" in text
