"""A tiny stand-in for a vLLM 0.26 OpenAI server (prefill or decode role), for the proxy tests.

It answers with the shapes of the real captures in fixtures/vllm-0.26/http/, checks the few
things vLLM checks that the tests use (unknown model, max_tokens < 1, prompt longer than the
context), and records every request it got so a test can see what the proxy forwarded:

    GET /_received -> [{"path", "x_request_id", "authorization", "body",
                        "reply_kv_transfer_params", "labkit_timing"}, ...]

Prompt tokens are whitespace-separated words. Test-only knobs, read from the request body
(vLLM ignores unknown fields, so the proxy forwards them untouched):
    labkit_fake_delay_s: sleep before answering;  labkit_fake_timing: add `labkit_timing`.

Run: python tests/upstream_fake.py --prefill PORT [--prefill PORT ...] [--decode PORT ...]
(one process, one uvicorn server per port, all on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

FIXTURES = Path(os.environ.get("LABKIT_VLLM_FIXTURES")
                or Path(__file__).resolve().parent / "fixtures" / "vllm-0.26")
HTTP = FIXTURES / "http"
MAX_MODEL_LEN = 1024  # error-prompt-too-long.json's model
BLOCK_SIZE = 16
TOKEN_GAP_S = 0.01  # between streamed tokens


def fixture(name: str) -> tuple[int, Any]:
    """(status, body) of one capture: the first line is the status, the rest the body."""
    status, _, body = (HTTP / name).read_text().partition("\n")
    return int(status), json.loads(body) if name.endswith(".json") else body


def sse_templates() -> tuple[dict, dict]:
    """A token chunk and the usage chunk from nixl-decode-stream.sse."""
    chunks = [
        json.loads(line[6:])
        for line in fixture("nixl-decode-stream.sse")[1].splitlines()
        if line.startswith("data: {")
    ]
    return chunks[0], next(c for c in chunks if c.get("usage"))


def count_prompt_tokens(body: dict, chat: bool) -> int:
    if chat:
        return sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    prompt = body.get("prompt", "")
    return len(prompt) if isinstance(prompt, list) else len(str(prompt).split())


def error(name: str, **fmt: Any) -> JSONResponse:
    """A vLLM error capture, its message re-made with this request's numbers when given."""
    status, body = fixture(name)
    if "message" in fmt:
        body["error"]["message"] = fmt["message"]
    return JSONResponse(body, status_code=status)


def create_fake_app(role: str) -> FastAPI:
    """One fake engine; `role` "prefill" answers NIXL's handshake, "decode" generates."""
    app = FastAPI()
    received: list[dict[str, Any]] = []
    engine_id = str(uuid.uuid4())
    token_chunk, usage_chunk = sse_templates()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        status, body = fixture("models.json")
        return JSONResponse(body, status_code=status)

    @app.get("/_received")
    async def get_received() -> list[dict[str, Any]]:
        return received

    async def generate(request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error("error-bad-json.json", message="1 validation error: json_invalid")
        entry: dict[str, Any] = {
            "path": request.url.path,
            "body": body,
            "x_request_id": request.headers.get("x-request-id"),
            "authorization": request.headers.get("authorization"),
            "reply_kv_transfer_params": None,
            "labkit_timing": None,
        }
        received.append(entry)
        await asyncio.sleep(float(body.get("labkit_fake_delay_s") or 0))
        if body.get("model") == "nope":
            return error("error-unknown-model.json")
        max_out = body.get("max_completion_tokens") if chat else None
        max_out = max_out if max_out is not None else body.get("max_tokens")
        max_out = 16 if max_out is None else int(max_out)
        if max_out < 1:
            return error(
                "error-negative-max-tokens.json",
                message=f"max_tokens must be at "
                f"least 1, got {max_out}. (parameter=max_tokens, value={max_out})",
            )
        n_prompt = count_prompt_tokens(body, chat)
        if n_prompt + max_out > MAX_MODEL_LEN:
            return error(
                "error-prompt-too-long.json",
                message=(
                    f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you "
                    f"requested {max_out} output tokens and your prompt contains {n_prompt} input "
                    f"tokens, for a total of {n_prompt + max_out} tokens. Please reduce the length "
                    "of the input prompt or the number of requested output tokens. "
                    f"(parameter=input_tokens, value={n_prompt})"
                ),
            )
        req_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        params = body.get("kv_transfer_params") or {}
        if role == "prefill" and params.get("do_remote_decode"):
            kv = copy.deepcopy(fixture("nixl-prefill-response.json")[1]["kv_transfer_params"])
            kv.update(
                remote_engine_id=engine_id,
                remote_num_tokens=n_prompt,
                remote_request_id=f"{req_id}-0-{uuid.uuid4().hex[:8]}",
                remote_block_ids=[list(range(1, 1 + math.ceil(n_prompt / BLOCK_SIZE)))],
            )
            entry["reply_kv_transfer_params"] = kv
        if role == "decode" and body.get("labkit_fake_timing"):
            now = time.time()
            entry["labkit_timing"] = {"kv_transfer_start": now - 0.003, "kv_transfer_end": now}
        tokens = [f" t{i}" for i in range(max_out)]
        usage = {
            "prompt_tokens": n_prompt,
            "completion_tokens": max_out,
            "total_tokens": n_prompt + max_out,
        }
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage")
            chunks = stream_chunks(
                req_id,
                chat,
                tokens,
                usage if include_usage else None,
                entry["labkit_timing"],
                token_chunk,
                usage_chunk,
            )
            return StreamingResponse(chunks, media_type="text/event-stream")
        reply = full_reply(req_id, chat, "".join(tokens), usage)
        reply["kv_transfer_params"] = entry["reply_kv_transfer_params"]
        if entry["labkit_timing"]:
            reply["labkit_timing"] = entry["labkit_timing"]
        return JSONResponse(reply)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    return app


def full_reply(req_id: str, chat: bool, text: str, usage: dict) -> dict:
    """A non-streamed answer: nixl-decode-response.json's shape (chat: vLLM's chat shape)."""
    reply = copy.deepcopy(fixture("nixl-decode-response.json")[1])
    reply.update(
        id=req_id, created=int(time.time()), usage={**usage, "prompt_tokens_details": None}
    )
    if chat:
        reply.update(object="chat.completion", prompt_logprobs=None, prompt_token_ids=None)
        reply["choices"] = [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "token_ids": None,
            }
        ]
    else:
        reply["choices"][0]["text"] = text
    return reply


async def stream_chunks(
    req_id: str,
    chat: bool,
    tokens: list[str],
    usage: dict | None,
    timing: dict | None,
    token_chunk: dict,
    usage_chunk: dict,
) -> AsyncIterator[bytes]:
    """SSE like nixl-decode-stream.sse: one chunk per token, usage chunk, [DONE]."""
    base = {**token_chunk, "id": req_id, "created": int(time.time())}
    if chat:
        base["object"] = "chat.completion.chunk"
    deltas: list[tuple[str | None, str | None]] = [(t, None) for t in tokens]
    deltas[-1] = (tokens[-1], "length")
    if chat:  # vLLM's chat stream opens with the role (chat_completion/serving.py)
        deltas.insert(0, (None, None))
    for i, (text, finish) in enumerate(deltas):
        choice = {**token_chunk["choices"][0], "finish_reason": finish}
        if chat:
            choice.pop("text")
            choice["delta"] = (
                {"role": "assistant", "content": ""} if text is None else {"content": text}
            )
        else:
            choice["text"] = text
        chunk = {**base, "choices": [choice]}
        if i == 0 and timing:
            chunk["labkit_timing"] = timing
        yield f"data: {json.dumps(chunk)}\n\n".encode()
        await asyncio.sleep(TOKEN_GAP_S)
    if usage is not None:
        yield f"data: {json.dumps({**usage_chunk, 'id': req_id, 'usage': usage})}\n\n".encode()
    yield b"data: [DONE]\n\n"


async def serve(roles_ports: list[tuple[str, int]]) -> None:
    import uvicorn

    servers = [
        uvicorn.Server(
            uvicorn.Config(create_fake_app(role), host="127.0.0.1", port=port, log_level="warning")
        )
        for role, port in roles_ports
    ]
    await asyncio.gather(*(s.serve() for s in servers))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument("--decode", type=int, action="append", default=[], metavar="PORT")
    args = parser.parse_args()
    asyncio.run(
        serve([("prefill", p) for p in args.prefill] + [("decode", p) for p in args.decode])
    )
