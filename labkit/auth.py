"""The lab's bearer token: one random secret that every endpoint checks when it is set.

A lab on one host binds 127.0.0.1 and sets no token. A cluster lab (labkit/cluster) binds the
nodes' addresses, so it makes a token (`new_token`) and hands it to every process it starts
in the environment ($LABKIT_API_TOKEN, never in an argument list, which `ps` shows): the
simulated engines and the PD proxy refuse any request without `Authorization: Bearer <token>`
(401, vLLM's body for a bad API key), and every labkit HTTP client sends it (`headers()`).
Real vLLM gets the same secret as $VLLM_API_KEY, which guards its /v1 routes only.

A leaf: imports nothing from labkit, and nothing heavy.
"""

from __future__ import annotations

import hmac
import os
import secrets
from typing import Any

TOKEN_ENV = "LABKIT_API_TOKEN"


def new_token() -> str:
    """A fresh random token (32 bytes, URL-safe)."""
    return secrets.token_urlsafe(32)


def token() -> str | None:
    """The token this process was given, or None (no check, no header)."""
    return os.environ.get(TOKEN_ENV) or None


def headers(tok: str | None = None) -> dict[str, str]:
    """The Authorization header for `tok` (default: this process's token); {} without one."""
    tok = tok if tok is not None else token()
    return {"Authorization": f"Bearer {tok}"} if tok else {}


def is_authorized(header_value: str | None, tok: str) -> bool:
    """Whether an Authorization header value carries `tok` (constant-time compare)."""
    if not header_value or not header_value.startswith("Bearer "):
        return False
    return hmac.compare_digest(header_value[len("Bearer "):].encode(), tok.encode())


class BearerAuth:
    """ASGI middleware: every HTTP request must carry the token, or it gets 401.

    Args:
        app: the ASGI app to guard.
        token: the secret; None or "" lets everything through (a lab on 127.0.0.1).
    """

    BODY = b'{"error":"Unauthorized"}'  # vLLM's answer to a missing or wrong API key

    def __init__(self, app: Any, token: str | None = None) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.token:
            await self.app(scope, receive, send)
            return
        value = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                      if k == b"authorization"), None)
        if is_authorized(value, self.token):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(self.BODY)).encode())]})
        await send({"type": "http.response.body", "body": self.BODY})
