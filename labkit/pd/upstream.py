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


