"""The PD proxy over real HTTP: fake vLLM engines (tests/upstream_fake.py) in a subprocess, the
proxy started with `python -m labkit.pd` (and with create_app in a thread), the openai client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from labkit.pd.proxy import NIXL_PREFILL_PARAMS, create_app
from labkit.pd.timeline import Timeline

sys.path.insert(0, str(Path(__file__).parent))
import upstream_fake  # noqa: E402

FAKE = Path(upstream_fake.__file__)
REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not upstream_fake.HTTP.exists(), reason="vLLM 0.26 fixtures absent"),
]
IN_ORDER = ["arrival", "prefill_start", "prefill_end", "kv_transfer_start", "kv_transfer_end"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


@contextmanager
def spawn(args: list[str]) -> Iterator[subprocess.Popen]:
    """A child in its own session, its output in a temporary log (LABKIT_TEST_LOGS keeps it);
    killed (whole group) on exit."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.NamedTemporaryFile(
        "w+",
        prefix="labkit-proxy-test-",
        suffix=".log",
        dir=os.environ.get("LABKIT_TEST_LOGS"),
        delete="LABKIT_TEST_LOGS" not in os.environ,
    ) as log:
        proc = subprocess.Popen(
            [sys.executable, *args],
            env=env,
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def start_fakes(prefill: int, decode: int) -> tuple[list[str], list[str], list[str]]:
    """Ports and URLs for `prefill` + `decode` fake engines, and the fake's argument list."""
    roles = ["prefill"] * prefill + ["decode"] * decode
    ports = [free_port() for _ in roles]
    args = [str(FAKE)] + [a for r, p in zip(roles, ports, strict=True) for a in (f"--{r}", str(p))]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    return urls[:prefill], urls[prefill:], args


@contextmanager
def serve_app(app) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def received(engine_url: str, req_id: str | None = None) -> list[dict]:
    entries = httpx.get(f"{engine_url}/_received").json()
    return [e for e in entries if req_id is None or e["x_request_id"] == req_id]


def events_of(proxy_url: str, req_id: str) -> list[dict]:
    return [e for e in httpx.get(f"{proxy_url}/timeline").json()["events"] if e["req_id"] == req_id]


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, list[str]]]:
    """Two prefill and one decode fake engine, one process."""
    prefills, decodes, args = start_fakes(2, 1)
    with spawn(args):
        for url in prefills + decodes:
            wait_ready(f"{url}/health")
        yield {"prefill": prefills, "decode": decodes}


@pytest.fixture(scope="module")
def proxy(engines: dict[str, list[str]]) -> Iterator[str]:
    """The proxy through its command line, nixl mode."""
    port = free_port()
    args = ["-m", "labkit.pd", "--port", str(port), "--connector", "nixl"]
    args += [a for u in engines["prefill"] for a in ("--prefill", u)]
    args += [a for u in engines["decode"] for a in ("--decode", u)]
    with spawn(args):
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/health")
        yield url


@pytest.fixture()
def client(proxy: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy}/v1", api_key="sk-lab", max_retries=0, timeout=10)


def rid() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def test_completion_goes_prefill_then_decode(client, engines, proxy) -> None:
    req_id = rid()
    raw = client.completions.with_raw_response.create(
        model="lab",
        prompt="one two three four five",
        max_tokens=5,
        extra_body={"min_tokens": 2},
        extra_headers={"X-Request-Id": req_id},
    )
    completion = raw.parse()
    assert raw.headers["x-request-id"] == req_id
    assert completion.choices[0].text == " t0 t1 t2 t3 t4"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 5)

    (pre,) = [e for url in engines["prefill"] for e in received(url, req_id)]
    assert pre["body"]["max_tokens"] == 1 and pre["body"]["stream"] is False
    assert "min_tokens" not in pre["body"]
    assert pre["body"]["kv_transfer_params"] == NIXL_PREFILL_PARAMS
    (dec,) = received(engines["decode"][0], req_id)
    assert dec["body"]["kv_transfer_params"] == pre["reply_kv_transfer_params"]
    assert dec["body"]["kv_transfer_params"]["remote_num_tokens"] == 5
    assert dec["body"]["max_tokens"] == 5 and dec["body"]["min_tokens"] == 2
    assert dec["body"]["prompt"] == pre["body"]["prompt"] == "one two three four five"
    assert dec["authorization"] == pre["authorization"] == "Bearer sk-lab"


def test_round_robin_over_prefill_engines(client, engines) -> None:
    ids = [rid(), rid()]
    for req_id in ids:
        client.completions.create(
            model="lab", prompt="a b", max_tokens=1, extra_headers={"X-Request-Id": req_id}
        )
    hit = [[url for url in engines["prefill"] if received(url, r)] for r in ids]
    assert len(hit[0]) == len(hit[1]) == 1 and hit[0] != hit[1]


def test_streaming_completion_and_its_timeline(client, engines, proxy) -> None:
    req_id = rid()
    chunks = list(
        client.completions.create(
            model="lab",
            prompt="alpha beta gamma",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Request-Id": req_id},
        )
    )
    tokens = [c.choices[0].text for c in chunks if c.choices]
    assert tokens == [f" t{i}" for i in range(6)]
    assert chunks[-1].usage.completion_tokens == 6

    events = events_of(proxy, req_id)
    names = [e["event"] for e in events]
    assert names == IN_ORDER + ["first_token"] + ["token"] * 6 + ["finish"]
    stamps = [e["ts"] for e in events]
    assert stamps == sorted(stamps) and all(isinstance(t, float) for t in stamps)
    token_ts = [e["ts"] for e in events if e["event"] == "token"]
    assert token_ts[-1] - token_ts[0] >= 5 * upstream_fake.TOKEN_GAP_S * 0.8  # really streamed
    assert [e["text"] for e in events if e["event"] == "token"] == tokens
    by_name = {e["event"]: e for e in events}
    (dec,) = received(engines["decode"][0], req_id)
    assert by_name["prefill_end"]["kv_transfer_params"] == dec["body"]["kv_transfer_params"]
    assert by_name["kv_transfer_end"]["engine_timing"] is None
    finish = by_name["finish"]
    assert finish["status"] == 200 and finish["decode_engine"] == engines["decode"][0]
    assert finish["prefill_engine"] in engines["prefill"]
    assert (finish["prompt_tokens"], finish["completion_tokens"]) == (3, 6)
    assert finish["prefill_id"].startswith("cmpl-") and finish["decode_id"] == chunks[0].id
    assert 0 < by_name["first_token"]["ttft_s"] <= finish["e2e_s"]
    summary = {s["req_id"]: s for s in httpx.get(f"{proxy}/timeline/requests").json()["requests"]}
    assert summary[req_id]["num_tokens"] == 6 and summary[req_id]["status"] == 200

    page = httpx.get(f"{proxy}/timeline", params={"since": events[0]["seq"], "limit": 3}).json()
    assert [e["seq"] for e in page["events"]] == [events[0]["seq"] + i for i in range(3)]
    assert page["next"] == events[0]["seq"] + 3


def test_engine_timing_is_kept(client, engines, proxy) -> None:
    req_id = rid()
    list(
        client.completions.create(
            model="lab",
            prompt="x y",
            max_tokens=2,
            stream=True,
            extra_body={"labkit_fake_timing": True},
            extra_headers={"X-Request-Id": req_id},
        )
    )
    (dec,) = received(engines["decode"][0], req_id)
    (end,) = [e for e in events_of(proxy, req_id) if e["event"] == "kv_transfer_end"]
    assert dec["labkit_timing"] and end["engine_timing"] == dec["labkit_timing"]


def test_chat_completions(client, engines, proxy) -> None:
    messages = [{"role": "user", "content": "tell me four words"}]
    req_id = rid()
    chat = client.chat.completions.create(
        model="lab",
        messages=messages,
        max_completion_tokens=4,
        extra_headers={"X-Request-Id": req_id},
    )
    assert chat.choices[0].message.content == " t0 t1 t2 t3"
    (pre,) = [e for url in engines["prefill"] for e in received(url, req_id)]
    assert pre["path"] == "/v1/chat/completions"
    assert pre["body"]["max_tokens"] == pre["body"]["max_completion_tokens"] == 1
    (dec,) = received(engines["decode"][0], req_id)
    assert dec["body"]["max_completion_tokens"] == 4 and dec["body"]["messages"] == messages

    req_id = rid()
    chunks = list(
        client.chat.completions.create(
            model="lab",
            messages=messages,
            max_tokens=3,
            stream=True,
            extra_headers={"X-Request-Id": req_id},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " t0 t1 t2"
    names = [e["event"] for e in events_of(proxy, req_id)]
    assert names.count("token") == 3 and names.index("first_token") > names.index("kv_transfer_end")


def test_timeline_sse_stream_follows_requests(proxy) -> None:
    req_id = rid()
    since = httpx.get(f"{proxy}/timeline", params={"since": 10**9}).json()["next"]

    async def follow() -> list[dict]:
        seen: list[dict] = []
        async with httpx.AsyncClient(timeout=10) as http:
            async with http.stream(
                "GET", f"{proxy}/timeline/stream", params={"since": since}
            ) as stream:
                post = asyncio.create_task(
                    http.post(
                        f"{proxy}/v1/completions",
                        headers={"X-Request-Id": req_id},
                        json={"model": "lab", "prompt": "p q", "max_tokens": 2, "stream": True},
                    )
                )
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        seen.append(event)
                        if event["req_id"] == req_id and event["event"] == "finish":
                            break
                assert (await post).status_code == 200
        return seen

    seen = asyncio.run(asyncio.wait_for(follow(), 15))
    assert [e["seq"] for e in seen] == list(range(since, since + len(seen)))
    assert [e["event"] for e in seen if e["req_id"] == req_id] == (
        IN_ORDER + ["first_token", "token", "token", "finish"]
    )


def test_upstream_errors_pass_through(client, engines, proxy) -> None:
    req_id = rid()  # max_tokens -3: prefill gets 1 and passes, decode refuses
    resp = httpx.post(
        f"{proxy}/v1/completions",
        headers={"X-Request-Id": req_id},
        json={"model": "lab", "prompt": "a", "max_tokens": -3},
    )
    assert (resp.status_code, resp.json()) == upstream_fake.fixture(
        "error-negative-max-tokens.json"
    )
    assert [e["event"] for e in events_of(proxy, req_id)][-2:] == ["error", "finish"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="lab", prompt="a", max_tokens=-3)
    assert err.value.status_code == 400

    req_id = rid()  # too long for the context: prefill refuses, decode is never called
    resp = httpx.post(
        f"{proxy}/v1/completions",
        headers={"X-Request-Id": req_id},
        json={"model": "lab", "prompt": "w " * 1500, "max_tokens": 4},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "input_tokens" and "1500 input" in resp.text
    assert received(engines["decode"][0], req_id) == []
    finish = events_of(proxy, req_id)[-1]
    assert finish["status"] == 400 and finish["decode_engine"] is None

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a", max_tokens=2)


def test_bad_requests_stay_at_the_proxy(engines, proxy) -> None:
    before = len(received(engines["decode"][0]))
    for content in (b"{not json", b"[1, 2]", b""):
        resp = httpx.post(
            f"{proxy}/v1/completions", content=content, headers={"content-type": "application/json"}
        )
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400
    for method, path in (
        ("GET", "/v1/embeddings"),
        ("POST", "/v1/embeddings"),
        ("GET", "/admin"),
        ("GET", "/docs"),
    ):
        resp = httpx.request(method, f"{proxy}{path}")
        assert resp.status_code in (404, 405) and resp.json()["error"]["code"] == resp.status_code
    assert len(received(engines["decode"][0])) == before


def test_models_health_and_metrics(client, proxy) -> None:
    assert [m.id for m in client.models.list()] == [
        m["id"] for m in upstream_fake.fixture("models.json")[1]["data"]
    ]
    health = httpx.get(f"{proxy}/health")
    assert health.status_code == 200 and all(e["ok"] for e in health.json()["engines"])
    assert len(health.json()["engines"]) == 3

    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(f"{proxy}/metrics").text)
    }
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    ok = ("labkit:proxy_requests_total", (("route", "/v1/completions"), ("status", "200")))
    assert samples[ok] >= 3
    assert (
        samples[("labkit:proxy_requests_total", (("route", "/v1/completions"), ("status", "400")))]
        >= 1
    )
    assert samples[("labkit:proxy_requests_in_flight", ())] == 0
    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "prefill_time_seconds",
        "kv_transfer_wait_seconds",
    ):
        assert families[f"labkit:proxy_{name}"].type == "histogram"
        assert samples[(f"labkit:proxy_{name}_count", ())] >= 1


def test_example_connector_and_read_timeout(engines) -> None:
    app = create_app(
        engines["prefill"][:1], engines["decode"], connector="example", read_timeout=1.0
    )
    with serve_app(app) as url:
        req_id = rid()
        body = {"model": "lab", "prompt": "shared storage", "max_tokens": 3}
        resp = httpx.post(f"{url}/v1/completions", json=body, headers={"X-Request-Id": req_id})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
        (pre,) = received(engines["prefill"][0], req_id)
        assert "kv_transfer_params" not in pre["body"] and pre["body"]["max_tokens"] == 1
        (dec,) = received(engines["decode"][0], req_id)
        assert dec["body"] == body  # the same prompt; decode finds the KV in storage

        start = time.monotonic()
        resp = httpx.post(
            f"{url}/v1/completions", timeout=10, json={**body, "labkit_fake_delay_s": 4}
        )
        assert time.monotonic() - start < 2.5 and resp.status_code == 504
        error = resp.json()["error"]
        assert f"prefill engine {engines['prefill'][0]}" in error["message"]
        assert error["type"] == "GatewayTimeoutError"


def test_dead_engines_give_502_and_health_503(engines) -> None:
    _, (doomed,), args = start_fakes(0, 1)
    nobody = f"http://127.0.0.1:{free_port()}"
    with (
        spawn(args) as proc,
        serve_app(create_app(engines["prefill"][:1], [doomed])) as url,
        serve_app(create_app([nobody], engines["decode"])) as url2,
    ):
        wait_ready(f"{doomed}/health")
        body = {"model": "lab", "prompt": "a b", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        long = {**body, "max_tokens": 300, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=10) as resp:
            chunks = resp.iter_raw()
            assert next(chunks).startswith(b"data: {")
            os.killpg(proc.pid, signal.SIGKILL)  # the decode engine dies mid-stream
            proc.wait(5)
            rest = b"".join(chunks).decode()
        assert f"decode engine {doomed}" in rest and rest.endswith("data: [DONE]\n\n")
        assert events_of(url, resp.headers["x-request-id"])[-1]["status"] == 502

        for stream in (False, True):
            start = time.monotonic()
            resp = httpx.post(f"{url}/v1/completions", json={**body, "stream": stream}, timeout=10)
            assert time.monotonic() - start < 2.0 and resp.status_code == 502
            error = resp.json()["error"]
            assert f"decode engine {doomed}" in error["message"] and error["code"] == 502
            assert events_of(url, resp.headers["x-request-id"])[-2]["event"] == "error"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and doomed in health.json()["error"]["message"]
        assert {e["role"]: e["ok"] for e in health.json()["engines"]} == {
            "prefill": True,
            "decode": False,
        }

        resp = httpx.post(f"{url2}/v1/completions", json=body)
        assert resp.status_code == 502 and f"prefill engine {nobody}" in resp.text
        metrics = httpx.get(f"{url2}/metrics").text
        assert 'labkit:proxy_upstream_errors_total{role="prefill"} 1.0' in metrics


def test_timeline_is_bounded_with_cursors() -> None:
    timeline = Timeline(max_events=5, max_requests=2)
    for i in range(8):
        timeline.record(f"r{i % 3}", "token", n=i)
    page = timeline.since(0)
    assert [e["n"] for e in page["events"]] == [3, 4, 5, 6, 7]
    assert (page["dropped"], page["next"]) == (3, 8)
    assert timeline.since(8) == {"events": [], "next": 8, "dropped": 0}
    assert timeline.since(99)["next"] == 8  # a cursor from a restarted proxy resets to now
    for name in ("a", "b", "c"):
        timeline.record(name, "arrival", model="lab")
    assert [s["req_id"] for s in timeline.requests()] == ["b", "c"]  # oldest dropped
    assert timeline.request("c")["model"] == "lab" and timeline.request("a") is None
    with pytest.raises(ValueError):
        timeline.record("r0", "teleport")

    async def follow() -> list[int]:
        got: list[int] = []
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lambda: timeline.record("r9", "finish", n=99))
        async for event in timeline.follow(heartbeat=0.01):
            if event is not None:
                got.append(event["n"])
                return got
        return got

    assert asyncio.run(asyncio.wait_for(follow(), 5)) == [99]


def test_client_leaving_mid_stream_is_recorded(proxy) -> None:
    req_id = rid()
    body = {"model": "lab", "prompt": "long", "max_tokens": 300, "stream": True}
    with httpx.stream(
        "POST", f"{proxy}/v1/completions", json=body, timeout=10, headers={"X-Request-Id": req_id}
    ) as resp:
        next(resp.iter_raw())  # one chunk, then hang up
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and events_of(proxy, req_id)[-1]["event"] != "finish":
        time.sleep(0.05)
    finish = events_of(proxy, req_id)[-1]
    assert finish["event"] == "finish" and finish["status"] == 499
    assert finish["e2e_s"] < 2.0  # not the 3 s the whole answer would take
    assert "labkit:proxy_requests_in_flight 0.0" in httpx.get(f"{proxy}/metrics").text
