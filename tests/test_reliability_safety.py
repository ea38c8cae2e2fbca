"""Safety: loopback only, only the OpenAI routes, no shell, storage in the run dir, bad input 4xx.

One simulated lab serves the module; each malformed request is followed by a good one, so a
server that crashed or wedged shows at once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest

import labkit
from labkit import faults
from labkit.engines.base import EngineStartError
from labkit.engines.sim.process import SimEngineProcess
from labkit.engines.sim.transport import check_storage_path
from labkit.plan import ConfigError


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with labkit.Lab(
        mode="sim",
        model="lab-1b",
        num_gpu_blocks=256,
        speed=0,
        observe=True,
        run_dir=tmp_path_factory.mktemp("safety"),
    ) as lab:
        yield lab


def _good(url: str) -> None:
    """The server still answers a well-formed request after a bad one."""
    r = httpx.post(
        f"{url}/v1/completions",
        timeout=10,
        json={"model": "lab-1b", "prompt": "still fine", "max_tokens": 2},
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def raw_http(url: str, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client-side path normalisation); (status, whole answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


# ---------------------------------------------------------------- loopback only
def test_every_listening_socket_is_loopback(lab) -> None:
    lab.telemetry()  # the observer's SUB socket and the KV-event readers, in this process
    pids = faults.pids_in_groups(faults.lab_groups(lab).values())
    socks = faults.listening_sockets(pids)
    ports = {p for _, p, _ in socks}
    for handle in [*lab.engines.values(), lab.proxy]:
        assert handle.port in ports, f"{handle.name}'s HTTP port is not among {socks}"
    mine = faults.listening_sockets([os.getpid()])
    for ep in (e.kv_events_endpoint for e in lab.engines.values()):
        # the engines connect their KV-event PUBs (vLLM's rule): the lab's readers bind
        assert int(ep.rsplit(":", 1)[1]) in {p for _, p, _ in mine}, f"KV-event reader {ep} not found"
    assert len(socks) >= 3
    wide = [s for s in socks if s[0] != "127.0.0.1"]
    assert not wide, f"bound beyond loopback: {wide}"
    assert all(a == "127.0.0.1" for a, _, _ in mine), mine


# ---------------------------------------------------------------- the proxy's surface
@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/admin"),
        ("GET", "/v1/../etc/passwd"),
        ("GET", "/../../etc/passwd"),
        ("POST", "/v1/embeddings"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/labkit/kv/read"),
        ("GET", "/labkit/info"),
        ("GET", "/v1/completions/../../admin"),
        ("GET", "/version"),
        ("POST", "/v1/models/../../labkit/kv/read"),
    ],
)
def test_proxy_serves_only_its_routes(lab, method: str, path: str) -> None:
    status, answer = raw_http(
        lab.url,
        f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode(),
    )
    assert status in (404, 405), (path, answer[:300])
    assert b"root:" not in answer


def test_proxy_routes_that_exist(lab) -> None:
    assert httpx.get(f"{lab.url}/v1/models", timeout=5).json()["data"][0]["id"] == "lab-1b"
    assert httpx.get(f"{lab.url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{lab.url}/v1/completions", timeout=5).status_code == 405


# ---------------------------------------------------------------- no shell
SHELLY = "lab-1b; touch {c} && touch {c} # $(touch {c}) `touch {c}` x' \"; touch {c} | cat"


def test_values_reach_the_engine_literally(tmp_path) -> None:
    """A name full of shell syntax is one argv element, shown verbatim, and runs nothing."""
    canary = tmp_path / "pwned"
    name = SHELLY.format(c=canary)
    eng = SimEngineProcess(
        "decode",
        model="lab-tiny",
        served_model_name=name,
        fast=True,
        log_path=tmp_path / "e.log",
        run_dir=tmp_path,
    )
    with eng:
        eng.start()
        eng.wait_ready(60)
        argv = faults.argv_of(eng.pid)
        assert name in argv and argv[argv.index(name) - 1] == "--served-model-name"
        served = httpx.get(f"{eng.base_url}/v1/models", timeout=5).json()["data"][0]["id"]
        assert served == name
        r = httpx.post(
            f"{eng.base_url}/v1/completions",
            timeout=10,
            json={"model": name, "prompt": "hi", "max_tokens": 1},
        )
        assert r.status_code == 200 and r.json()["model"] == name
    assert not canary.exists(), "a shell ran the value"


def test_shell_in_a_model_name_is_refused_by_the_lab(tmp_path) -> None:
    with pytest.raises(ConfigError, match="is unknown"):
        labkit.Lab(mode="sim", model=f"lab-1b; touch {tmp_path / 'pwned'}")
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- storage stays in the run dir
@pytest.mark.parametrize("where", ["/tmp/labkit-outside-kv", "{run}/../escape", "{link}/kv"])
def test_storage_outside_the_run_dir_is_refused(tmp_path, where: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "link").symlink_to(tmp_path)  # a link inside the run dir that leads out of it
    path = where.format(run=run, link=run / "link")
    with pytest.raises(ValueError, match="outside the run directory"):
        check_storage_path(path, run)
    assert check_storage_path(run / "kv", run) == (run / "kv").resolve()


def test_engine_with_outside_storage_does_not_start(tmp_path) -> None:
    outside = tmp_path / "outside"
    run = tmp_path / "run"
    eng = SimEngineProcess(
        "prefill",
        role="prefill",
        connector="example",
        kv_storage=str(outside),
        fast=True,
        run_dir=run,
        log_path=run / "prefill.log",
    )
    with eng:
        eng.start()
        with pytest.raises(EngineStartError, match="outside the run directory"):
            eng.wait_ready(60)
    assert not outside.exists(), "the engine created the outside folder"


# ---------------------------------------------------------------- malformed requests
BAD_BODIES: dict[str, bytes | dict] = {
    "not JSON": b"{'prompt': 'hi'",
    "empty body": b"",
    "JSON array": b"[1, 2, 3]",
    "JSON string": b'"hello"',
    "no prompt": {"model": "lab-1b", "max_tokens": 2},
    "prompt is a number": {"model": "lab-1b", "prompt": 42},
    "negative token id": {"model": "lab-1b", "prompt": [1, -5, 3]},
    "token id past the vocabulary": {"model": "lab-1b", "prompt": [1, 10**9]},
    "empty token list": {"model": "lab-1b", "prompt": []},
    "max_tokens negative": {"model": "lab-1b", "prompt": "hi", "max_tokens": -1},
    "max_tokens huge": {"model": "lab-1b", "prompt": "hi", "max_tokens": 10**12},
    "max_tokens a string": {"model": "lab-1b", "prompt": "hi", "max_tokens": "many"},
    "prompt past max_model_len": {"model": "lab-1b", "prompt": [5] * 9000, "max_tokens": 1},
    "unknown model": {"model": "gpt-9", "prompt": "hi"},
    "stream not a bool": {"model": "lab-1b", "prompt": "hi", "stream": {"a": 1}},
    "kv_transfer_params a list": {"model": "lab-1b", "prompt": "hi", "kv_transfer_params": [1]},
    "invalid UTF-8": b'{"model": "lab-1b", "prompt": "\xff\xfe"}',
    "deeply nested": b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
}


@pytest.mark.parametrize("target", ["proxy", "prefill", "decode"])
@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_malformed_request_gets_4xx_and_the_server_lives(lab, target: str, case: str) -> None:
    if target == "proxy" and case == "kv_transfer_params a list":
        pytest.skip("the proxy replaces kv_transfer_params with its own (a valid request)")
    url = lab.url if target == "proxy" else lab.engines[target].base_url
    bad = BAD_BODIES[case]
    kw = (
        {"json": bad}
        if isinstance(bad, dict)
        else {"content": bad, "headers": {"content-type": "application/json"}}
    )
    r = httpx.post(f"{url}/v1/completions", timeout=10, **kw)
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
    assert isinstance(r.json()["error"]["message"], str) and r.json()["error"]["message"]
    _good(url)


def test_bad_chat_and_oversized_body(lab) -> None:
    for url in (lab.url, lab.engines["decode"].base_url):
        r = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=10,
            json={"model": "lab-1b", "messages": "not a list"},
        )
        assert 400 <= r.status_code < 500, r.text[:300]
        big = {"model": "lab-1b", "prompt": "word " * 400_000, "max_tokens": 1}  # ~2 MB
        r = httpx.post(f"{url}/v1/completions", timeout=30, json=big)
        assert 400 <= r.status_code < 500, r.text[:300]
        _good(url)


def test_half_sent_request_does_not_wedge_the_proxy(lab) -> None:
    """A client that promises a body and goes away: the proxy serves the next one."""
    host, port = lab.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    _good(lab.url)
    assert Path(lab.run_dir).is_dir()
