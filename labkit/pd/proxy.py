"""Prefill -> decode proxy in front of vLLM 0.26 OpenAI servers, with a per-request timeline.

It does what vLLM's toy proxy does (tests/v1/kv_connector/nixl_integration/toy_proxy_server.py
in vLLM's repository) and adds the timeline, metrics, health and errors that name the engine::

    client --POST /v1/completions--> proxy --(max_tokens=1, stream=false,
                                      |        kv_transfer_params{do_remote_decode})--> prefill
                                      |   <--(kv_transfer_params: remote blocks, host, port)--
                                      +--(the client's request + those kv_transfer_params)--> decode
    client <------------- decode's JSON, or its SSE stream chunk by chunk ---------------------

Connector modes (set once, at start):
    "nixl"     NixlConnector's handshake (vllm/distributed/kv_transfer/kv_connector/v1/nixl/).
    "example"  ExampleConnector (.../v1/example_connector.py): no kv_transfer_params; the same
               prompt goes to decode, which finds the KV in the shared storage.

Engines are plain base URLs (`http://127.0.0.1:8100`); a labkit simulated engine speaks the same
API. Several prefill and decode URLs (xPyD, as vLLM's disaggregated examples take them) are
routed by labkit/pd/router.py: round-robin, least-loaded (each engine's /metrics) or kv-aware
(the prefill engines' KV events), switched live with `POST /router {"policy": ...}`. The
timeline's `prefill_start` and `kv_transfer_start` name the engine chosen (`engine_name`) and
why (`routing`: the router's Decision); `finish` names both (`prefill_name`, `decode_name`). An engine may add `labkit_timing` (a dict of engine-measured wall-clock seconds, e.g.
`{"kv_transfer_start": t0, "kv_transfer_end": t1}`) to its JSON answer or to its FIRST SSE chunk;
the timeline keeps it as `engine_timing` on `prefill_end` / `kv_transfer_end`.

What is said to one engine lives in upstream.py; what is recorded of each request (timeline
events, Prometheus metrics, the SSE relay) in flight.py; the timeline itself in timeline.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from labkit import auth
from labkit.pd.flight import Flight, ProxyMetrics
from labkit.pd.router import POLICIES, Policy, Router
from labkit.pd.timeline import Timeline, timeline_router
from labkit.pd.upstream import (  # noqa: F401  (public names of the proxy module)
    CHAT,
    COMPLETIONS,
    NIXL_PREFILL_PARAMS,
    Engine,
    ProxyError,
    SSEScanner,
    check_for_decode,
    decode_request,
    error_body,
    prefill_request,
    release_request,
)
from labkit.pd.watch import LOAD_INTERVAL_S, EngineWatch

logger = logging.getLogger(__name__)
CONNECTORS: tuple[str, ...] = ("nixl", "example")
UPSTREAM_KEEPALIVE_S = 2.0  # < the engines' 5 s keep-alive (see PDProxy._engine)
# Back-pressure: at most MAX_IN_FLIGHT requests are carried at once (and as many connections
# per engine); up to MAX_QUEUED more wait their turn; past that the proxy answers 503 with
# Retry-After. 1,000 requests thrown at an engine at once made its accept queue overflow
# (ConnectTimeout) and its KV handshakes time out, and every failed request leaked blocks.
MAX_IN_FLIGHT, MAX_QUEUED, RETRY_AFTER_S = 128, 2048, 1
MAX_BODY_BYTES = 32 << 20  # a larger body gets 413 before it is read whole
_PARSE_IN_THREAD = 256 << 10  # bodies above this are parsed off the event loop


def _check_unicode(body: dict) -> None:
    """A lone surrogate (JSON `"\\ud800"`) cannot be sent on as UTF-8: 400, not echoed."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProxyError(400, error_body(
            f"The request is not valid Unicode: a lone surrogate ({exc.reason}).", 400,
            "BadRequestError", "prompt")) from None


class _ClientGone(Exception):
    """The client disconnected while the proxy waited for decode."""


class _Admission:
    """A bounded queue in front of a semaphore: `enter()` waits its turn or refuses (503)."""

    def __init__(self, in_flight: int, queued: int) -> None:
        self.limit, self.queued_max = in_flight, queued
        self._sem = asyncio.Semaphore(in_flight)
        self.waiting = 0

    async def enter(self) -> bool:
        if self.waiting >= self.queued_max and self._sem.locked():
            return False
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        return True

    def leave(self) -> None:
        self._sem.release()


class PDProxy:
    """Routes each request to a prefill and a decode engine (labkit/pd/router.py), carries the
    two-step request, keeps the timeline and metrics.

    Args (beyond create_app's): prefill_names / decode_names: the engines' names for the
    router and the timeline (default "prefill-0", ...); policy: the routing policy at start;
    block_size: the engines' KV block size (kv-aware cuts prompts with it); kv_events: prefill
    engine name -> its KV-event endpoint (kv-aware's prefix index).
    """

    def __init__(
        self,
        prefill_urls: list[str],
        decode_urls: list[str],
        connector: str = "nixl",
        connect_timeout: float = 2.0,
        read_timeout: float | None = 600.0,
        timeline: Timeline | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_queued: int = MAX_QUEUED,
        max_body_bytes: int = MAX_BODY_BYTES,
        *,
        prefill_names: list[str] | None = None,
        decode_names: list[str] | None = None,
        policy: Policy = "round-robin",
        block_size: int = 16,
        kv_events: dict[str, str] | None = None,
        load_interval: float = LOAD_INTERVAL_S,
    ) -> None:
        if max_in_flight < 1 or max_queued < 0 or max_body_bytes < 1:
            raise ValueError("max_in_flight and max_body_bytes must be >= 1, max_queued >= 0")
        if not prefill_urls or not decode_urls:
            raise ValueError("the proxy needs at least one prefill and one decode engine URL")
        if connector not in CONNECTORS:
            raise ValueError(f"connector must be one of {CONNECTORS}, not {connector!r}")
        self.connector = connector
        self.timeline = timeline if timeline is not None else Timeline()
        self.metrics = ProxyMetrics()
        self.admission = _Admission(max_in_flight, max_queued)
        self.max_body_bytes = max_body_bytes
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.health_timeout = httpx.Timeout(min(read_timeout or 5.0, 5.0), connect=connect_timeout)
        pnames = engine_names("prefill", prefill_urls, prefill_names)
        dnames = engine_names("decode", decode_urls, decode_names)
        if len(set(pnames + dnames)) < len(pnames) + len(dnames):
            raise ValueError(f"engine names must differ: {pnames + dnames}")
        unknown = set(kv_events or {}) - set(pnames)
        if unknown:
            raise ValueError(f"KV events for {sorted(unknown)}, which are not prefill engines "
                             f"({pnames})")
        self.prefills = [self._engine("prefill", u, timeout, max_in_flight, n)
                         for u, n in zip(prefill_urls, pnames, strict=True)]
        self.decodes = [self._engine("decode", u, timeout, max_in_flight, n)
                        for u, n in zip(decode_urls, dnames, strict=True)]
        self._by_name = {e.label: e for e in self.prefills + self.decodes}
        self.router = Router(pnames, dnames, policy, block_size=block_size)
        self.watch = EngineWatch(self.router, self.prefills + self.decodes, kv_events or {},
                                 load_interval)

    @staticmethod
    def _engine(role: str, url: str, timeout: httpx.Timeout, max_conn: int,
                label: str = "") -> Engine:
        url = url.rstrip("/").removesuffix("/v1")
        # Drop idle connections well before the engine does: vLLM's uvicorn closes them after
        # VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s, vllm/envs.py); a POST sent on a connection the
        # engine is closing fails with ReadError (seen under load as a 502).
        # Pool sized to the admission limit (+ room for /health and release calls): a request
        # admitted never waits for a connection, and an engine never sees more at once.
        limits = httpx.Limits(max_connections=max_conn + 8, max_keepalive_connections=max_conn,
                              keepalive_expiry=UPSTREAM_KEEPALIVE_S)
        client = httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, trust_env=False,
                                   headers=auth.headers())  # a cluster lab's token, if any
        return Engine(role, url, client, label or role)

    async def start(self) -> None:
        """Subscribe to the engines' KV events and start reading their loads."""
        await self.watch.start()

    async def aclose(self) -> None:
        await self.watch.close()
        await asyncio.gather(*(e.client.aclose() for e in self.prefills + self.decodes))

    def routing(self) -> dict[str, Any]:
        """GET /router: the policy, the engines, what was routed where, the index, the loads."""
        return {"policy": self.router.policy, "policies": list(POLICIES),
                "prefill": self.router.prefill, "decode": self.router.decode,
                **self.watch.describe()}

    def set_policy(self, policy: str) -> dict[str, Any]:
        """Switch the routing policy for the requests that arrive from now on.

        Raises:
            ProxyError: 400 for a policy the router does not have.
        """
        if policy not in POLICIES:
            raise ProxyError(400, error_body(
                f"unknown routing policy {policy!r}; one of {list(POLICIES)}", 400,
                "BadRequestError", "policy"))
        self.router.policy = policy  # type: ignore[assignment]
        logger.info("routing policy: %s", policy)
        return self.routing()

    async def completions(self, request: Request, route: str) -> Response:
        """POST /v1/completions or /v1/chat/completions: wait for a slot (or 503), then carry."""
        if not await self.admission.enter():
            req_id = request.headers.get("x-request-id") or f"pd-{uuid.uuid4().hex}"
            msg = (f"the PD proxy is at capacity ({self.admission.limit} in flight, "
                   f"{self.admission.waiting} waiting): retry after {RETRY_AFTER_S} s")
            self.metrics.requests.labels(route, "503").inc()
            return JSONResponse(error_body(msg, 503, "ServiceUnavailableError"), status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S), "x-request-id": req_id})
        released = False

        def leave() -> None:
            nonlocal released
            if not released:
                released = True
                self.admission.leave()

        try:
            resp = await self._carry(request, route, leave)
        except BaseException:
            leave()
            raise
        if not isinstance(resp, StreamingResponse):
            leave()
        return resp

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 past `max_body_bytes` (before it is read whole)."""
        declared = request.headers.get("content-length")
        too_big = ProxyError(413, error_body(
            f"the request body is larger than the proxy's limit of {self.max_body_bytes:,} "
            f"bytes", 413, "RequestEntityTooLarge", "body"))
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def _carry(self, request: Request, route: str, leave: Any) -> Response:
        """Prefill, then decode; `leave()` frees the admission slot once the request ends."""
        tl = self.timeline
        req_id = request.headers.get("x-request-id") or f"pd-{uuid.uuid4().hex}"
        fl = Flight(tl, self.metrics, req_id, route, tl.now())
        self.metrics.in_flight.inc()
        try:
            raw = await self._read_body(request)
            if len(raw) > _PARSE_IN_THREAD:  # a 10 MB body would hold the loop ~0.1 s
                body = await asyncio.to_thread(json.loads, raw)
            else:
                body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError(f"the body must be a JSON object, not {type(body).__name__}")
            stream = check_for_decode(body, route)
            _check_unicode(body)
        except ProxyError as err:
            tl.record(fl.req_id, "arrival", ts=fl.arrival, route=route)
            return fl.finish(err.status, err.response(fl.req_id), err)
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            tl.record(fl.req_id, "arrival", ts=fl.arrival, route=route)
            err = ProxyError(
                400, error_body(f"Invalid JSON body: {str(exc)[:200]}", 400, "Bad Request", "body")
            )
            return fl.finish(err.status, err.response(fl.req_id), err)
        tl.record(
            fl.req_id,
            "arrival",
            ts=fl.arrival,
            route=route,
            model=body.get("model"),
            stream=stream,
            connector=self.connector,
        )
        headers = {"X-Request-Id": fl.req_id}
        if auth := request.headers.get("authorization"):
            headers["Authorization"] = auth
        prefill_reply: dict | None = None
        decode_took_it = False
        try:
            prefill_reply = await self._prefill(fl, body, headers)
            fl.decode = decode = self._route_decode(fl, body)
            fl.decode_sent = tl.now()
            with decode.errors():
                upstream = decode.client.build_request(
                    "POST",
                    route,
                    json=decode_request(body, prefill_reply, self.connector),
                    headers=headers,
                )
                resp = await self._until_disconnect(request, decode.client.send(upstream,
                                                                                stream=True))
                decode_took_it = resp.status_code < 400
                if resp.status_code >= 400 or not stream:
                    try:
                        content = await self._until_disconnect(request, resp.aread())
                    finally:
                        await resp.aclose()
            if resp.status_code >= 400:
                raise ProxyError.from_upstream(decode, resp.status_code, content)
        except ProxyError as exc:
            if prefill_reply is not None and not decode_took_it:
                await self._release(fl, prefill_reply)
            return fl.finish(exc.status, exc.response(fl.req_id), exc)
        except _ClientGone:  # decode's work was cancelled with the client's request
            if prefill_reply is not None and not decode_took_it:
                await self._release(fl, prefill_reply)
            err = ProxyError(499, error_body("the client went away", 499, "ClientClosed"))
            return fl.finish(499, Response(status_code=499), err)
        except Exception as exc:  # a bug: still answer, count and close the request
            logger.exception("request %s failed in the proxy", fl.req_id)
            if prefill_reply is not None and not decode_took_it:
                await self._release(fl, prefill_reply)
            err = ProxyError(500, error_body(f"proxy error: {exc!r}", 500, "InternalServerError"))
            return fl.finish(500, err.response(fl.req_id), err)
        if stream:
            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in fl.relay(resp):
                        yield chunk
                finally:
                    leave()

            return StreamingResponse(
                relay(),
                status_code=resp.status_code,
                media_type=resp.headers.get("content-type"),
                headers={"x-request-id": fl.req_id},
            )
        reply: Any = None
        with contextlib.suppress(ValueError):
            reply = json.loads(content)
        if isinstance(reply, dict):
            fl.on_decode_data(reply, streamed=False)
        return fl.finish(
            resp.status_code,
            Response(
                content,
                status_code=resp.status_code,
                media_type="application/json",
                headers={"x-request-id": fl.req_id},
            ),
        )

    @staticmethod
    async def _until_disconnect(request: Request, work: Any) -> Any:
        """Await `work`, cancelled when the client disconnects (vLLM's `with_cancellation`):
        a client that leaves a non-streamed request must not keep decode generating."""
        task = asyncio.ensure_future(work)

        async def gone() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watch = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise _ClientGone()
        return task.result()

    async def _release(self, fl: Flight, prefill_reply: dict) -> None:
        """The request ends after prefill but before decode read its KV: tell prefill to free
        the blocks now (NIXL's read notification; vLLM 0.26 itself frees them only when their
        lease runs out, kv_lease_duration in kv_connector_extra_config, 30 s by default, and
        decode's heartbeats extend it). A real vLLM prefill answers 404: ignored."""
        body = release_request(prefill_reply)
        if body is None or fl.prefill is None or self.connector != "nixl":
            return
        try:
            resp = await fl.prefill.client.post("/labkit/kv/read", json=body, timeout=5.0)
            self.metrics.released.labels(str(resp.status_code)).inc()
        except httpx.HTTPError as exc:
            logger.warning("could not release %s's blocks on %s: %s", fl.req_id, fl.prefill.url,
                           exc)

    async def _route_prefill(self, fl: Flight, body: dict) -> Engine:
        """Pick the prefill engine; `prefill_start` says which and why."""
        tokens: list[int] | None = None
        if self.router.policy == "kv-aware":
            tokens = await self.watch.prompt_tokens(body, fl.route, self.prefills[0])
        decision = self.router.route_prefill(tokens or [], self.watch.loads_of(self.prefills))
        engine = self._by_name[decision.engine]
        self.timeline.record(fl.req_id, "prefill_start", engine=engine.url,
                             engine_name=engine.label, routing=decision.to_event())
        self.watch.sent(engine)
        return engine

    def _route_decode(self, fl: Flight, body: dict) -> Engine:
        """Pick the decode engine (room for prompt + max_tokens); `kv_transfer_start` says
        which and why. It counts as busy there until the request finishes."""
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        prompt = fl.usage.get("prompt_tokens") or 0
        need = (prompt if isinstance(prompt, int) else 0) + (limit if isinstance(limit, int) else 16)
        decision = self.router.route_decode(need, self.watch.loads_of(self.decodes))
        engine = self._by_name[decision.engine]
        self.timeline.record(fl.req_id, "kv_transfer_start", engine=engine.url,
                             engine_name=engine.label, routing=decision.to_event())
        self.watch.sent(engine)
        fl.on_finish = lambda: self.watch.answered(engine)
        return engine

    async def _prefill(self, fl: Flight, body: dict, headers: dict[str, str]) -> dict:
        """Run the prefill step; returns the prefill engine's JSON answer."""
        tl = self.timeline
        fl.prefill = engine = await self._route_prefill(fl, body)
        start = tl.now()
        try:
            with engine.errors():
                resp = await engine.client.post(
                    fl.route, json=prefill_request(body, fl.route, self.connector),
                    headers=headers)
        finally:
            self.watch.answered(engine)
        if resp.status_code >= 400:
            raise ProxyError.from_upstream(engine, resp.status_code, resp.content)
        try:
            reply = resp.json()
            assert isinstance(reply, dict)
        except (ValueError, AssertionError):
            msg = f"{engine.name} answered a body that is not a JSON object"
            raise ProxyError(502, error_body(msg, 502, "BadGatewayError")) from None
        fl.ids["prefill_id"] = reply.get("id")
        usage = reply.get("usage") or {}
        fl.usage["prompt_tokens"] = usage.get("prompt_tokens")
        end = tl.record(
            fl.req_id,
            "prefill_end",
            prefill_id=reply.get("id"),
            prompt_tokens=usage.get("prompt_tokens"),
            kv_transfer_params=reply.get("kv_transfer_params"),
            engine_timing=reply.get("labkit_timing"),
        )["ts"]
        self.metrics.prefill.observe(end - start)
        return reply

    async def health(self) -> JSONResponse:
        """200 when every engine answers /health with 200; 503 naming the ones that do not."""

        async def probe(engine: Engine) -> dict[str, Any]:
            state: dict[str, Any] = {"role": engine.role, "url": engine.url}
            try:
                with engine.errors():
                    resp = await engine.client.get("/health", timeout=self.health_timeout)
                state.update(ok=resp.status_code == 200, status=resp.status_code)
            except ProxyError as exc:
                state.update(ok=False, status=None, error=str(exc))
            return state

        engines = await asyncio.gather(*(probe(e) for e in self.prefills + self.decodes))
        down = [e for e in engines if not e["ok"]]
        if not down:
            return JSONResponse({"status": "ok", "engines": engines})
        msg = "; ".join(
            e.get("error") or f"{e['role']} engine {e['url']} answered /health with {e['status']}"
            for e in down
        )
        return JSONResponse(
            {**error_body(msg, 503, "ServiceUnavailableError"), "engines": engines}, status_code=503
        )

    async def models(self) -> Response:
        """GET /v1/models from the first decode engine (both engines serve the same model)."""
        engine = self.decodes[0]
        try:
            with engine.errors():
                resp = await engine.client.get("/v1/models")
        except ProxyError as exc:
            return JSONResponse(exc.body, status_code=exc.status)
        return Response(
            resp.content,
            status_code=resp.status_code,
            media_type=resp.headers.get("content-type", "application/json"),
        )


def create_app(
    prefill_urls: list[str],
    decode_urls: list[str],
    connector: str = "nixl",
    connect_timeout: float = 2.0,
    read_timeout: float | None = 600.0,
    timeline: Timeline | None = None,
    **limits: Any,
) -> FastAPI:
    """The proxy as an ASGI app (serve it with uvicorn on 127.0.0.1).

    Args:
        prefill_urls / decode_urls: engine base URLs, used round robin.
        connector: "nixl" (kv_transfer_params handshake) or "example" (shared storage).
        connect_timeout / read_timeout: seconds per upstream call (read None: no limit).
        timeline: share a Timeline with the caller (a new one by default).
        limits: max_in_flight, max_queued, max_body_bytes (PDProxy; module defaults), and the
            routing keywords of PDProxy (prefill_names, decode_names, policy, block_size,
            kv_events).
    Returns:
        A FastAPI app; `app.state.proxy` is the PDProxy, `app.state.timeline` its Timeline.
    """
    proxy = PDProxy(prefill_urls, decode_urls, connector, connect_timeout, read_timeout, timeline,
                    **limits)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        yield
        await proxy.aclose()

    app = FastAPI(
        title="labkit PD proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.proxy, app.state.timeline = proxy, proxy.timeline
    app.add_middleware(auth.BearerAuth, token=auth.token())  # a cluster lab's token; none: open

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase
        return JSONResponse(
            error_body(str(exc.detail), exc.status_code, phrase), status_code=exc.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc.errors()), 400, "Bad Request"), status_code=400)

    @app.post(COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await proxy.completions(request, COMPLETIONS)

    @app.post(CHAT)
    async def chat_completions(request: Request) -> Response:
        return await proxy.completions(request, CHAT)

    @app.get("/v1/models")
    async def models() -> Response:
        return await proxy.models()

    @app.get("/health")
    async def health() -> JSONResponse:
        return await proxy.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/router")
    async def routing() -> JSONResponse:
        return JSONResponse(proxy.routing())

    @app.post("/router")
    async def set_routing(request: Request) -> JSONResponse:
        """{"policy": "round-robin" | "least-loaded" | "kv-aware"}: switch live."""
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("policy"), str):
            return JSONResponse(error_body('send {"policy": "<one of ' + ", ".join(POLICIES)
                                           + '>"}', 400, "BadRequestError", "policy"),
                                status_code=400)
        try:
            return JSONResponse(proxy.set_policy(body["policy"]))
        except ProxyError as exc:
            return exc.response("router")

    app.include_router(timeline_router(proxy.timeline))
    return app


def engine_names(role: str, urls: list[str], names: list[str] | None) -> list[str]:
    """The engines' names: given (one per URL), else "prefill-0", "prefill-1", ..."""
    if names is None:
        return [f"{role}-{i}" for i in range(len(urls))]
    if len(names) != len(urls) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{len(urls)} {role} URLs need as many {role} names, got {names!r}")
    return list(names)
