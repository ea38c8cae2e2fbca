"""Hostile input and bursts against a simulated NIXL pair behind the proxy (loopback only).

- Requests decode refuses but prefill would take (max_tokens 0/-1/"x", bad stream_options,
  several prompts, min_tokens > max_tokens, prompt + max_tokens past max_model_len): a
  vLLM-shaped 4xx, and prefill holds 0 blocks afterwards.
- Bursts of concurrent streams: each one answered 200 with all its tokens or 503 with
  Retry-After; 0 blocks left on either engine (1,000 x 3 with LABKIT_SOAK=1; 300 x 3 else).
- A 10 MB prompt: /health keeps answering within 100 ms; a body past the limit gets 413.
- kv_transfer_params naming a path or a foreign host: 400, no call made.
- n 0/-1/10^6, temperature "hot", a lone surrogate: 400, not 200/500.
- A non-streamed client that leaves: decode stops generating.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import httpx
import pytest

import labkit
from labkit.pd.proxy import PDProxy

MAX_MODEL_LEN = 1024


def gauge(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    family = name.removesuffix("_total")
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == family
               for s in fam.samples if s.name == name)


def wait_empty(url: str, timeout: float = 5.0) -> float:
    """Seconds until the engine holds no KV block and runs nothing (fails after `timeout`)."""
    t0 = time.monotonic()
    while True:
        usage = gauge(url, "vllm:kv_cache_usage_perc")
        busy = gauge(url, "vllm:num_requests_running") + gauge(url, "vllm:num_requests_waiting")
        if usage == 0 and busy == 0:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{url}: KV usage {usage}, {busy} requests after {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with labkit.Lab(mode="sim", model="lab-1b", num_gpu_blocks=512, speed=0, observe=False,
                    connector="nixl", max_model_len=MAX_MODEL_LEN,
                    run_dir=tmp_path_factory.mktemp("hostile")) as lab:
        yield lab


BASE = {"model": "lab-1b", "prompt": "the PD lab " * 40, "ignore_eos": True}
REJECTED = {
    "max_tokens 0": {"max_tokens": 0},
    "max_tokens -1": {"max_tokens": -1},
    "max_tokens a string": {"max_tokens": "x"},
    "stream_options without stream": {"stream_options": {"include_usage": True}},
    "stream_options a list": {"stream": True, "stream_options": [1]},
    "stream an object": {"stream": {"a": 1}},
    "min_tokens > max_tokens": {"max_tokens": 4, "min_tokens": 9},
    "three prompts": {"prompt": ["a b c", "d e f", "g h i"]},
    "5,000 prompts": {"prompt": ["hi"] * 5000},
    "prompt + max_tokens > max_model_len": {"max_tokens": MAX_MODEL_LEN},
    "n 0": {"n": 0},
}


@pytest.mark.parametrize("name", list(REJECTED))
def test_refused_request_leaves_no_prefill_blocks(lab, name) -> None:
    prefill = lab.engines["prefill"].base_url
    r = httpx.post(f"{lab.url}/v1/completions", json={**BASE, **REJECTED[name]}, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["code"] == r.status_code
    wait_empty(prefill, timeout=3.0)
    ok = httpx.post(f"{lab.url}/v1/completions", json={**BASE, "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_decode_refusal_after_prefill_is_released(lab) -> None:
    """The one refusal the proxy cannot see (the prompt's length is known after prefill):
    decode says 400 and the proxy tells prefill to free the blocks at once."""
    before = gauge(lab.url, "labkit:proxy_kv_released_total")
    r = httpx.post(f"{lab.url}/v1/completions",
                   json={**BASE, "max_tokens": MAX_MODEL_LEN - 100}, timeout=30)
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    assert gauge(lab.url, "labkit:proxy_kv_released_total") == before + 1
    wait_empty(lab.engines["prefill"].base_url, timeout=3.0)


def test_hostile_sampling_and_text_get_vllm_400(lab) -> None:
    decode = lab.engines["decode"].base_url
    for extra in ({"n": 0}, {"n": -1}, {"n": 10**6}, {"temperature": "hot"},
                  {"prompt": "a\ud800b"}):
        for url in (lab.url, decode):
            body = json.dumps({**BASE, "max_tokens": 2, **extra})  # \ud800 escaped, as sent
            r = httpx.post(f"{url}/v1/completions", content=body,
                           headers={"content-type": "application/json"}, timeout=30)
            assert r.status_code == 400, (extra, url, r.status_code, r.text[:200])
            assert "ud800" not in r.text and "\ud800" not in r.text


def test_kv_transfer_params_name_only_a_host_and_port(lab) -> None:
    """Decode calls nothing but a loopback host:port (the lab's engines)."""
    hits: list[bytes] = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            hits.append(conn.recv(4096))
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    decode = lab.engines["decode"].base_url
    try:
        for host, p in ((f"127.0.0.1:{port}/anything?x=", port), ("127.0.0.1", f"{port}/x"),
                        ("example.com", 80), ("10.0.0.1", port), ("127.0.0.1", 70000)):
            params = {"do_remote_prefill": True, "do_remote_decode": False,
                      "remote_engine_id": "x", "remote_request_id": "r", "remote_block_ids": [1],
                      "remote_host": host, "remote_port": p}
            r = httpx.post(f"{decode}/v1/completions", timeout=30,
                           json={**BASE, "max_tokens": 2, "kv_transfer_params": params})
            assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params"
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(2)
        srv.close()
    assert hits == []


def test_ten_mb_prompt_does_not_stall_health(lab) -> None:
    big = "the memory cache block " * (10_000_000 // 23)
    out: dict[str, httpx.Response] = {}

    def send(url: str) -> None:
        out[url] = httpx.post(f"{url}/v1/completions", json={**BASE, "prompt": big,
                                                             "max_tokens": 2}, timeout=60)

    for url in (lab.engines["prefill"].base_url, lab.url):
        t = threading.Thread(target=send, args=(url,))
        t.start()
        worst = 0.0
        with httpx.Client(timeout=5) as client:
            while t.is_alive():
                t0 = time.monotonic()
                assert client.get(f"{lab.engines['prefill'].base_url}/health").status_code == 200
                worst = max(worst, time.monotonic() - t0)
                time.sleep(0.01)
        t.join()
        assert out[url].status_code == 400 and len(out[url].content) < 2000
        assert "maximum context length" in out[url].json()["error"]["message"]
        assert worst < 0.1, f"/health took {worst:.3f} s while {url} got a 10 MB prompt"
    # past the body limit: 413 before the body is read whole, from proxy and engine alike
    huge = b'{"prompt": "' + b"a" * (33 << 20) + b'"}'
    for url in (lab.url, lab.engines["decode"].base_url):
        r = httpx.post(f"{url}/v1/completions", content=huge, timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == 413


def test_client_that_leaves_stops_decode(lab) -> None:
    """A non-streamed request whose client disconnects: decode aborts it (no 10,000 tokens
    generated for nobody) and both pools are whole again."""
    decode = lab.engines["decode"].base_url
    before = gauge(decode, "vllm:generation_tokens_total")
    body = {**BASE, "max_tokens": MAX_MODEL_LEN - 500}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{lab.url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.01))
    time.sleep(1.0)
    wait_empty(decode, timeout=5.0)
    wait_empty(lab.engines["prefill"].base_url, timeout=5.0)
    assert gauge(decode, "vllm:generation_tokens_total") - before < MAX_MODEL_LEN - 500


BURST = 1000 if os.environ.get("LABKIT_SOAK") else 300


def test_repeated_bursts_are_queued_or_refused_never_lost(lab) -> None:
    """Three bursts of concurrent streams through a proxy whose queue is smaller than the
    burst: each request is 200 with all its tokens, or 503 with Retry-After; nothing else;
    no block is left on either engine."""
    import uvicorn

    from labkit.pd.proxy import create_app

    app = create_app([lab.engines["prefill"].base_url], [lab.engines["decode"].base_url],
                     read_timeout=60, max_in_flight=32, max_queued=BURST // 2)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", backlog=4096))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    while not server.started:
        time.sleep(0.05)
    assert isinstance(app.state.proxy, PDProxy)

    async def burst(k: int) -> list[tuple[int, str, str | None]]:
        limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            async def one(i: int) -> tuple[int, str, str | None]:
                body = {**BASE, "prompt": f"burst {k} request {i}", "max_tokens": 4,
                        "stream": True, "stream_options": {"include_usage": True}}
                r = await client.post(f"{url}/v1/completions", json=body)
                return r.status_code, r.text, r.headers.get("retry-after")

            return await asyncio.gather(*(one(i) for i in range(BURST)))

    try:
        summary = []
        for k in range(3):
            t0 = time.monotonic()
            results = asyncio.run(burst(k))
            ok = [t for s, t, _ in results if s == 200]
            refused = [ra for s, _, ra in results if s == 503]
            other = [(s, t[:200]) for s, t, _ in results if s not in (200, 503)]
            assert not other, other[:3]
            assert all(ra is not None and int(ra) >= 1 for ra in refused)
            for text in ok:
                assert text.rstrip().endswith("data: [DONE]") and '"completion_tokens":4' in text
            assert ok, "a burst must not be refused whole"
            summary.append((len(ok), len(refused), round(time.monotonic() - t0, 1)))
        for engine in lab.engines.values():
            wait_empty(engine.base_url, timeout=10.0)
        print(f"bursts of {BURST}: (answered, 503, s) = {summary}")
    finally:
        server.should_exit = True
        th.join(10)
