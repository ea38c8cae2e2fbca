"""What the PD proxy says to one upstream engine: the two requests (prefill with one token
and NixlConnector's parameters; decode with prefill's answer), vLLM's error shape and the
failures of a transport turned into 502/504, and the SSE scanner for streamed answers.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httpx
from fastapi.responses import JSONResponse

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
# What the prefill engine is told with NixlConnector: "compute the prompt, keep the blocks for a
# remote decode". Its answer carries the remote_* fields the decode engine pulls from.
NIXL_PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
def error_body(message: str, status: int, err_type: str, param: str | None = None) -> dict:
    """vLLM's error shape (vllm/entrypoints/openai/engine/protocol.py: ErrorResponse)."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


class ProxyError(Exception):
    """A request that ends at the proxy with `status` and a vLLM-shaped error body."""

    def __init__(self, status: int, body: dict) -> None:
        self.status, self.body = status, body
        super().__init__(body["error"]["message"])

    @classmethod
    def from_upstream(cls, engine: Engine, status: int, content: bytes) -> ProxyError:
        """Pass an engine's error through: its own body when vLLM-shaped, else wrapped."""
        with contextlib.suppress(ValueError):
            body = json.loads(content)
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                body["error"].setdefault("message", f"{engine.name} answered {status}")
                return cls(status, body)
        text = content[:500].decode(errors="replace")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        return cls(status, error_body(f"{engine.name} answered {status}: {text}", status, phrase))

    def response(self, req_id: str) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers={"x-request-id": req_id})


@dataclass
class Engine:
    """One upstream vLLM (or simulated) server and the connection pool to it."""

    role: str  # "prefill" | "decode"
    url: str
    client: httpx.AsyncClient
    label: str = ""  # the router's name for it ("prefill-0"; the lab's engine name)

    @property
    def name(self) -> str:
        return f"{self.role} engine {self.url}"

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turn a transport failure into a 504 (timed out) or 502 (down, refused, cut off)."""
        try:
            yield
        except httpx.TimeoutException as exc:
            msg = f"{self.name} timed out ({type(exc).__name__})"
            raise ProxyError(504, error_body(msg, 504, "GatewayTimeoutError")) from exc
        except httpx.RequestError as exc:
            msg = f"{self.name} is unreachable ({type(exc).__name__}: {exc})"
            raise ProxyError(502, error_body(msg, 502, "BadGatewayError")) from exc


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False,
               "on": True, "off": False, "t": True, "f": False, "y": True, "n": False}


def _invalid(loc: tuple, err_type: str, msg: str, value: Any) -> ProxyError:
    """A 400 in the shape of vLLM's validation handler (one pydantic error, input shortened)."""
    shown = value if not isinstance(value, str | list | dict) or len(value) <= 64 else "..."
    err = {"type": err_type, "loc": ("body", *loc), "msg": msg, "input": shown}
    return ProxyError(400, error_body(f"1 validation error:\n  {err}", 400, "Bad Request",
                                      ".".join(str(p) for p in loc) or None))


def _as_bool(name: str, value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.lower()]
    raise _invalid((name,), "bool_type", "Input should be a valid boolean", value)


def _as_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _invalid((name,), "int_type", "Input should be a valid integer", value)
    return value


def check_for_decode(body: dict, route: str) -> bool:
    """What decode would refuse but the prefill request hides (prefill is sent max_tokens=1,
    stream=false, no stream_options / min_tokens, one kv_transfer_params): refuse it HERE,
    before prefill holds blocks for a request decode will never read. vLLM's messages
    (protocol.py validators, SamplingParams._verify_args). Returns the `stream` flag.

    Raises:
        ProxyError: 400 in vLLM's error shape.
    """
    stream = _as_bool("stream", body.get("stream"))
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _invalid(("stream_options",), "model_type", "Input should be a valid "
                           "dictionary or instance of StreamOptions", opts)
        for key in ("include_usage", "continuous_usage_stats"):
            _as_bool(f"stream_options.{key}", opts.get(key))
        if not stream:
            raise _invalid((), "value_error", "Value error, Stream options can only be defined "
                           "when `stream=True`.", "...")
    names = ("max_completion_tokens", "max_tokens") if route == CHAT else ("max_tokens",)
    limit = None
    for name in names:
        value = _as_int(name, body.get(name))
        if value is not None and value < 1:
            raise ProxyError(400, error_body(
                f"{name} must be at least 1, got {value}. (parameter={name}, value={value})",
                400, "BadRequestError", name))
        limit = value if limit is None else limit
    for name in ("min_tokens", "min_completion_tokens"):
        low = _as_int(name, body.get(name))
        if low is not None and (low < 0 or (limit is not None and low > limit)):
            raise ProxyError(400, error_body(
                f"min_tokens must be greater than or equal to 0 and less than or equal to "
                f"max_tokens={limit}, got {low}.", 400, "BadRequestError", name))
    n = _as_int("n", body.get("n"))
    if n is not None and n < 1:
        raise ProxyError(400, error_body(f"n must be at least 1, got {n}.", 400,
                                         "BadRequestError", "n"))
    prompt = body.get("prompt")
    if route == COMPLETIONS and isinstance(prompt, list) and prompt and \
            isinstance(prompt[0], str | list) and len(prompt) > 1:
        raise ProxyError(400, error_body(
            f"the PD proxy serves one prompt per request; this one has {len(prompt)} (prefill "
            f"would hold the KV of all of them and decode read one): send one request per "
            f"prompt", 400, "BadRequestError", "prompt"))
    return stream


def release_request(reply: dict) -> dict | None:
    """The body that tells a (simulated) NIXL prefill engine to free a request's held blocks:
    the read notification decode would have sent (`POST /labkit/kv/read`); None when prefill
    holds nothing for a remote decode."""
    params = reply.get("kv_transfer_params")
    if not isinstance(params, dict) or not params.get("remote_request_id"):
        return None
    blocks = params.get("remote_block_ids") or []
    if blocks and isinstance(blocks[0], list):
        blocks = blocks[0]
    return {"remote_request_id": params["remote_request_id"],
            "block_ids": [b for b in blocks if isinstance(b, int)],
            "remote_engine_id": params.get("remote_engine_id")}


def prefill_request(body: dict, route: str, connector: str) -> dict:
    """The prefill engine's request: one token, not streamed (vLLM's toy proxy rules)."""
    req = {
        k: v
        for k, v in body.items()
        if k not in ("stream_options", "min_tokens", "min_completion_tokens")
    }
    req["stream"] = False
    req["max_tokens"] = 1
    if route == CHAT:  # max_completion_tokens wins over max_tokens in vLLM's chat protocol
        req["max_completion_tokens"] = 1
    if connector == "nixl":
        req["kv_transfer_params"] = dict(NIXL_PREFILL_PARAMS)
    return req


def decode_request(body: dict, prefill_reply: dict, connector: str) -> dict:
    """The decode engine's request: the client's, plus prefill's kv_transfer_params (nixl)."""
    params = prefill_reply.get("kv_transfer_params")
    if connector == "nixl" and params:
        return {**body, "kv_transfer_params": params}
    return body


class SSEScanner:
    """Splits a byte stream into SSE `data:` payloads (vLLM writes `data: {...}\\n\\n`)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        payloads = []
        while (end := self._buf.find(b"\n\n")) >= 0:
            block, self._buf = self._buf[:end], self._buf[end + 2 :]
            lines = [ln.rstrip(b"\r")[5:] for ln in block.split(b"\n") if ln.startswith(b"data:")]
            if lines:
                payloads.append(
                    b"\n".join(ln[1:] if ln[:1] == b" " else ln for ln in lines).decode(
                        errors="replace"
                    )
                )
        return payloads


