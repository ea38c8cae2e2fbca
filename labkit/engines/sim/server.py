"""The simulated engine served like `vllm serve`: vLLM 0.26's HTTP shapes around one SimEngine.

Endpoints and bodies follow vllm/entrypoints/openai/ (completion/, chat_completion/,
models/, engine/protocol.py) and the captures in ../shared/fixtures/vllm-0.26/http:
`/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/health`, `/metrics`, `/version`,
`/tokenize` and `/detokenize` (vllm/entrypoints/serve/tokenize/), plus
`POST /labkit/kv/read` (the NIXL read notification, see transport.py),
`POST /labkit/kv/heartbeat` (the NIXL lease heartbeat) and
`GET /labkit/info`.

One asyncio task steps the engine. Each step runs in simulated time; paced (default) it
then sleeps until the wall clock reaches the step's end (divided by `--speed`), so live
views see realistic timing; `--fast` steps back to back. HTTP handlers and the engine
loop share the event-loop thread: engine calls never race. The loop and the telemetry (ZMQ
KV events, observer events, /metrics) live in runner.EngineRunner; the request bodies and
vLLM's error shape in openai_protocol.py, the OpenAI routes' work in openai_serving.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from labkit.engines.sim.openai_protocol import (  # noqa: F401  (public names of this module)
    VLLM_VERSION,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    KVHeartbeatRequest,
    KVReadRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    validation_error_response,
)
from labkit.engines.sim.openai_serving import OpenAIServing
from labkit.engines.sim.runner import EngineRunner, SimServerArgs

logger = logging.getLogger("labkit.sim.server")
MAX_BODY_BYTES = 32 << 20  # a larger request body is answered 413 before it is read whole


class BodyLimit:
    """ASGI middleware: 413 (vLLM's error shape) for a body over `limit` bytes, judged by its
    Content-Length or, without one, by the bytes received so far."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        err = APIError(f"the request body is larger than the limit of {self.limit:,} bytes",
                       413, "RequestEntityTooLarge", "body").response()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(err.body)).encode())]})
        await send({"type": "http.response.body", "body": err.body})


class _TooLarge(Exception):
    pass


async def with_cancellation(request: Request, work: Any) -> Any:
    """Run a handler's `work`, cancelled if the client disconnects first (vLLM's
    `with_cancellation`): a non-streamed request whose client left stops generating."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return Response(status_code=499)
    return task.result()


def create_app(args: SimServerArgs) -> FastAPI:
    """The FastAPI app; the engine loop starts with the app (lifespan) and stops with it."""
    runner = EngineRunner(args)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runner.start()
        try:
            yield
        finally:
            await runner.stop()

    app = FastAPI(title="labkit simulated vLLM engine", lifespan=lifespan)
    app.state.runner = runner
    app.add_middleware(BodyLimit)
    from labkit.auth import BearerAuth, token

    app.add_middleware(BearerAuth, token=token())  # a cluster lab's token; none: no check
    api = OpenAIServing(runner)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        from http import HTTPStatus

        return APIError(str(exc.detail), exc.status_code, HTTPStatus(exc.status_code).phrase).response()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VLLM_VERSION}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        runner.metrics.update(runner.engine)  # gauges as of now, even when idle
        return Response(runner.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return api.models()

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        if req.stream:
            return await api.completions(req)
        return await with_cancellation(raw, api.completions(req))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatCompletionRequest, raw: Request) -> Any:
        if req.stream:
            return await api.chat(req)
        return await with_cancellation(raw, api.chat(req))

    @app.post("/tokenize", response_model=None)
    async def tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest, raw: Request) -> Any:
        return await with_cancellation(raw, api.tokenize(req))

    @app.post("/detokenize", response_model=None)
    async def detokenize(req: DetokenizeRequest, raw: Request) -> Any:
        return await with_cancellation(raw, api.detokenize(req))

    @app.post("/labkit/kv/read")
    async def kv_read(req: KVReadRequest) -> dict[str, Any]:
        try:
            return runner.deliver_read(req.remote_request_id, req.block_ids)
        except KeyError as exc:
            raise APIError(str(exc.args[0]), 404, "NotFoundError", "remote_request_id") from None
        except ValueError as exc:
            raise APIError(str(exc), 400, "BadRequestError", "block_ids") from None

    @app.post("/labkit/kv/heartbeat")
    async def kv_heartbeat(req: KVHeartbeatRequest) -> dict[str, Any]:
        try:
            return runner.deliver_heartbeat(req.req_ids)
        except KeyError as exc:
            raise APIError(str(exc.args[0]), 404, "NotFoundError", "req_ids") from None

    @app.get("/labkit/info")
    async def info() -> dict[str, Any]:
        return runner.info()

    return app

def serve(args: SimServerArgs, on_ready: Callable[[EngineRunner], None] | None = None) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn handles both); `on_ready(runner)` runs
    once the engine is built (the CLI logs its start-up lines there)."""
    import uvicorn

    app = create_app(args)
    if on_ready is not None:
        on_ready(app.state.runner)
    logger.info("Starting vLLM server on http://%s:%d (SIMULATED)", args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            access_log=False, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run()


__all__ = ["create_app", "serve", "SimServerArgs", "EngineRunner", "APIError"]
