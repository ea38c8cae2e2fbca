"""The simulated engine's `POST /tokenize` and `POST /detokenize` (vLLM 0.26's
vllm/entrypoints/serve/tokenize/): vLLM's bodies and errors, and, what the PD proxy's
kv-aware router relies on, /tokenize's ids are the ids the engine schedules and caches for
the same completion or chat request (checked against the engine's own KV events: the token
ids of the blocks it stored, rehashed into the router's PrefixIndex)."""
from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
import zmq
from labfixtures import FIXTURES

from labkit.engines.sim.process import SimEngineProcess
from labkit.pd.router import PrefixIndex, Router
from labkit.pd.upstream import CHAT, COMPLETIONS
from labkit.pd.watch import EngineWatch
from labkit.telemetry.kv_events import BlockStored, decode_frames

pytestmark = pytest.mark.timeout(60)
MAX_LEN, BLOCK = 4096, 16
WORDS = "the memory cache block token prefill decode model layer engine batch".split()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    run = tmp_path_factory.mktemp("run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        kv_ep = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    proc = SimEngineProcess("sim", run_dir=run, log_path=run / "sim.log", fast=True,
                            model="lab-1b", num_gpu_blocks_override=1024, max_model_len=MAX_LEN,
                            kv_events_endpoint=kv_ep)
    kv_sub = zmq.Context.instance().socket(zmq.SUB)
    kv_sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    kv_sub.bind(kv_ep)
    proc.start()
    try:
        proc.wait_ready(timeout=30)
        time.sleep(0.3)  # PUB/SUB slow joiner
        yield SimpleNamespace(url=proc.base_url, kv_sub=kv_sub)
    finally:
        proc.stop()
        kv_sub.close(0)


def _stored(sock: zmq.Socket, seconds: float = 0.5) -> list[BlockStored]:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sock.poll(50):
            out += [e for e in decode_frames(sock.recv_multipart())[2].events
                    if isinstance(e, BlockStored)]
    return out


def _text(seed: int, n_words: int) -> str:
    return f"conversation {seed}: " + " ".join(WORDS[(seed * 7 + k * 3) % len(WORDS)]
                                               for k in range(n_words))


def _tokenize(engine: SimpleNamespace, **body) -> dict:
    resp = httpx.post(f"{engine.url}/tokenize", json={"model": "lab-1b", **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _full_blocks(engine: SimpleNamespace, route: str, body: dict) -> tuple[list[int], dict]:
    """Pad the prompt (one more word at a time) until /tokenize counts whole blocks, then send
    the same body to `route` (max_tokens=1: only prompt blocks are stored) and return
    /tokenize's ids with the answer; the request's BlockStored events then hold every id."""
    for _ in range(BLOCK * 2):
        ids = _tokenize(engine, **body)["tokens"]
        if len(ids) % BLOCK == 0:
            break
        if "prompt" in body:
            body["prompt"] += " the"
        else:
            body["messages"][-1]["content"] += " the"
    _stored(engine.kv_sub, 0.2)  # what came before
    answer = httpx.post(f"{engine.url}{route}", json={"model": "lab-1b", "max_tokens": 1,
                                                       **body}).json()
    return ids, answer


def _assert_cached_as_tokenized(engine: SimpleNamespace, ids: list[int], answer: dict) -> None:
    assert answer["usage"]["prompt_tokens"] == len(ids)
    stored = _stored(engine.kv_sub)
    assert [t for ev in stored for t in ev.token_ids] == ids  # the engine cached these ids
    index = PrefixIndex(BLOCK)
    index.apply("p", stored)
    assert index.match(ids) == {"p": (len(ids) - 1) // BLOCK * BLOCK}  # the router's view


def test_tokenize_shapes_match_vllm(engine) -> None:
    text = "hello the cache"
    got = _tokenize(engine, prompt=text)
    assert list(got) == ["count", "max_model_len", "tokens", "token_strs"]  # TokenizeResponse
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == MAX_LEN
    assert got["tokens"][0] == 1 and got["token_strs"] is None  # BOS <s>, as a completion adds
    bare = _tokenize(engine, prompt=text, add_special_tokens=False, return_token_strs=True)
    assert bare["tokens"] == got["tokens"][1:]
    assert "".join(bare["token_strs"]).replace("\u0120", " ") == text  # byte-level spelling
    back = httpx.post(f"{engine.url}/detokenize", json={"model": "lab-1b", "tokens": got["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "<s>" + text}  # specials kept
    chat = _tokenize(engine, messages=[{"role": "user", "content": "hi"}])
    assert chat["tokens"][0] == 1  # the template's {{ bos_token }}; add_special_tokens=False
    no_prompt = _tokenize(engine, messages=[{"role": "user", "content": "hi"}],
                          add_generation_prompt=False)
    assert chat["tokens"][: no_prompt["count"]] == no_prompt["tokens"]
    assert chat["count"] > no_prompt["count"]


def test_tokenize_errors_match_vllm(engine) -> None:
    status, _, body = (FIXTURES / "http" / "error-unknown-model.json").read_text().partition("\n")
    for path, payload in (("/tokenize", {"prompt": "x"}), ("/tokenize", {"messages": []}),
                          ("/detokenize", {"tokens": [1]})):
        resp = httpx.post(f"{engine.url}{path}", json={"model": "nope", **payload})
        assert (resp.status_code, resp.json()) == (int(status), json.loads(body))
    for path, payload in (
            ("/tokenize", {}),  # neither prompt nor messages
            ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                           "continue_final_message": True, "add_generation_prompt": True}),
            ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{1}}"}),
            ("/detokenize", {"tokens": [-1]}),
            ("/detokenize", {"tokens": [2**40]})):
        resp = httpx.post(f"{engine.url}{path}", json=payload)
        err = resp.json()["error"]
        assert resp.status_code == err["code"] == 400 and list(err) == ["message", "type", "param",
                                                                         "code"], (payload, err)


def test_tokenize_counts_past_max_model_len(engine) -> None:
    """vLLM's /tokenize sets no length limit (count and max_model_len are for the client to
    compare); a completion of the same text is refused. Long text goes off the event loop."""
    text = "the cache " * 3000  # 30,000 characters (6,000 tokens): off the event loop
    got = _tokenize(engine, prompt=text)
    assert got["count"] > MAX_LEN
    resp = httpx.post(f"{engine.url}/v1/completions", json={"prompt": text, "max_tokens": 1})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input_tokens"


def test_text_completion_caches_the_tokenized_ids(engine) -> None:
    ids, answer = _full_blocks(engine, "/v1/completions", {"prompt": _text(1, 60)})
    _assert_cached_as_tokenized(engine, ids, answer)


def test_chat_caches_the_tokenized_ids(engine) -> None:
    messages = [{"role": "system", "content": _text(2, 40)},
                {"role": "user", "content": _text(3, 20)}]
    ids, answer = _full_blocks(engine, "/v1/chat/completions", {"messages": messages})
    _assert_cached_as_tokenized(engine, ids, answer)


def test_chat_switches_apply_to_both_paths(engine) -> None:
    """continue_final_message (and add_generation_prompt=False) render the same on /tokenize
    and /v1/chat/completions: the prefilled assistant text is the prompt's end."""
    messages = [{"role": "user", "content": _text(4, 30)},
                {"role": "assistant", "content": _text(5, 30)}]
    ids, answer = _full_blocks(engine, "/v1/chat/completions", {
        "messages": messages, "add_generation_prompt": False, "continue_final_message": True})
    _assert_cached_as_tokenized(engine, ids, answer)
    text = httpx.post(f"{engine.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text.endswith(messages[-1]["content"])


def test_long_text_tokenized_off_the_loop_is_the_same(engine) -> None:
    body = {"prompt": _text(6, 1) + " the cache" * 1700}  # 17,000+ characters: off the loop
    ids, answer = _full_blocks(engine, "/v1/completions", body)
    assert len(body["prompt"]) > 16 << 10 and len(ids) <= MAX_LEN
    _assert_cached_as_tokenized(engine, ids, answer)


def test_watch_stops_asking_only_without_the_route() -> None:
    """The proxy's EngineWatch: a 404 for an unknown model is the client's mistake, not a
    missing /tokenize; it keeps asking (and only a 404 without vLLM's model error stops it)."""
    answers = iter([
        httpx.Response(404, json={"error": {"message": "The model `nope` does not exist.",
                                            "type": "NotFoundError", "param": "model",
                                            "code": 404}}),
        httpx.Response(200, json={"count": 2, "max_model_len": 9, "tokens": [1, 5],
                                  "token_strs": None}),
        httpx.Response(404, json={"detail": "Not Found"}),
    ])
    client = httpx.AsyncClient(base_url="http://prefill",
                               transport=httpx.MockTransport(lambda _: next(answers)))
    eng = SimpleNamespace(client=client, name="prefill engine x", label="p")
    watch = EngineWatch(Router(["p"]), [eng], {})  # type: ignore[list-item]

    async def ask() -> list:
        out = [await watch.prompt_tokens({"model": "nope", "prompt": "hi"}, COMPLETIONS, eng),
               await watch.prompt_tokens({"prompt": "hi"}, COMPLETIONS, eng),
               await watch.prompt_tokens({"messages": []}, CHAT, eng),
               await watch.prompt_tokens({"prompt": "hi"}, COMPLETIONS, eng)]
        await client.aclose()
        return out

    assert asyncio.run(ask()) == [None, [1, 5], None, None]
    assert watch._can_tokenize is False
