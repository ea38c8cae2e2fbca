"""What the PD proxy records of each request it carries: timeline events and Prometheus metrics.

A `Flight` is one request on its way through the proxy (arrival -> prefill -> decode -> finish).
It folds what the decode engine answers (a JSON body, or SSE chunk by chunk) into the
`Timeline` (labkit/pd/timeline.py, architecture.md contract 4) and the proxy's `ProxyMetrics`,
and relays decode's stream to the client unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from labkit.pd.timeline import Timeline
from labkit.pd.upstream import Engine, ProxyError, SSEScanner, error_body

# vLLM's TTFT buckets (vllm/v1/metrics/loggers.py), for every proxy histogram.
# fmt: off
_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# fmt: on


class ProxyMetrics:
    """The proxy's own Prometheus registry; names prefixed `labkit:proxy_` like vLLM's `vllm:`."""

    HISTOGRAMS = {  # attribute: (name after `labkit:proxy_`, help)
        "ttft": ("time_to_first_token_seconds", "Arrival to the first streamed token."),
        "e2e": ("e2e_request_latency_seconds", "Arrival to finish."),
        "prefill": ("prefill_time_seconds", "Prefill call, sent to answered."),
        "transfer_wait": ("kv_transfer_wait_seconds", "Decode call to its first byte: the KV "
                          "transfer plus the first decode step, seen from outside."),
    }  # fmt: skip
    ttft: Histogram
    e2e: Histogram
    prefill: Histogram
    transfer_wait: Histogram

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("labkit:proxy_requests", "Requests answered, by route and HTTP "
                                "status (499: the client went away).", ["route", "status"],
                                registry=r)  # fmt: skip
        self.in_flight = Gauge("labkit:proxy_requests_in_flight", "Requests now.", registry=r)
        self.upstream_errors = Counter("labkit:proxy_upstream_errors", "Requests that failed "
                                       "(5xx) at an engine, by role.", ["role"], registry=r)  # fmt: skip
        self.released = Counter("labkit:proxy_kv_released", "Requests that ended after prefill "
                                "and before decode read their KV, whose blocks the proxy told "
                                "prefill to free, by prefill's answer.", ["status"],
                                registry=r)  # fmt: skip
        for attr, (name, doc) in self.HISTOGRAMS.items():
            setattr(
                self, attr, Histogram(f"labkit:proxy_{name}", doc, registry=r, buckets=_BUCKETS)
            )


@dataclass
class Flight:
    """What the proxy knows of one request while it runs, and where it records it."""

    timeline: Timeline = field(repr=False)
    metrics: ProxyMetrics = field(repr=False)
    req_id: str
    route: str
    arrival: float
    prefill: Engine | None = None
    decode: Engine | None = None
    decode_sent: float = 0.0
    decode_answered: bool = False
    num_tokens: int = 0
    first_token: float | None = None
    ids: dict[str, str | None] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    on_finish: Callable[[], None] | None = field(default=None, repr=False)  # once, at finish

    async def relay(self, resp: httpx.Response) -> AsyncIterator[bytes]:
        """Pass decode's SSE through chunk by chunk, timestamping each token on the way."""
        scanner, error = SSEScanner(), None
        status = resp.status_code
        try:
            assert self.decode is not None
            with self.decode.errors():
                async for chunk in resp.aiter_raw():
                    for data in scanner.feed(chunk):
                        with contextlib.suppress(ValueError):
                            obj = json.loads(data)
                            if isinstance(obj, dict):
                                self.on_decode_data(obj, streamed=True)
                    yield chunk
        except ProxyError as exc:  # the decode engine went away mid-stream
            status, error = exc.status, exc
            yield f"data: {json.dumps(exc.body)}\n\ndata: [DONE]\n\n".encode()
        except (asyncio.CancelledError, GeneratorExit):
            status = 499
            error = ProxyError(499, error_body("the client went away", 499, "ClientClosed"))
            raise
        finally:
            await resp.aclose()
            self.finish(status, None, error)

    def on_decode_data(self, obj: dict, streamed: bool) -> None:
        """Fold one decode answer (a JSON body, or one SSE chunk) into the timeline."""
        tl, now = self.timeline, self.timeline.now()
        if not self.decode_answered:  # the first byte: KV transfer + first decode step are done
            self.decode_answered = True
            timing = obj.get("labkit_timing")
            tl.record(
                self.req_id,
                "kv_transfer_end",
                ts=now,
                wait_s=now - self.decode_sent,
                engine_timing=timing if isinstance(timing, dict) else None,
                decode_id=obj.get("id"),  # decode's response id: the views join its events
            )
            self.metrics.transfer_wait.observe(now - self.decode_sent)
        self.ids["decode_id"] = self.ids.get("decode_id") or obj.get("id")
        if isinstance(obj.get("usage"), dict):
            self.usage.update({k: v for k, v in obj["usage"].items() if v is not None})
        if isinstance(obj.get("error"), dict):  # vLLM reports a mid-stream failure in the stream
            err = obj["error"]
            tl.record(self.req_id, "error", status=err.get("code"), message=err.get("message"))
        if not streamed:
            return  # a whole answer has no per-token times
        for choice in obj.get("choices") or []:
            delta = choice.get("delta")
            if isinstance(delta, dict) and delta.get("role"):
                continue  # chat's opening chunk names the role; it carries no token
            self.num_tokens += 1
            if self.first_token is None:
                self.first_token = now
                tl.record(self.req_id, "first_token", ts=now, ttft_s=now - self.arrival)
                self.metrics.ttft.observe(now - self.arrival)
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            tl.record(
                self.req_id,
                "token",
                ts=now,
                n=self.num_tokens,
                index=choice.get("index", 0),
                text=text,
            )

    def finish(
        self, status: int, response: Response | None, error: ProxyError | None = None
    ) -> Response | None:
        """Record `error` (if any) and `finish`, count the request, return `response`."""
        tl = self.timeline
        if error is not None:
            tl.record(self.req_id, "error", status=status, message=str(error))
            if status >= 500:
                role = (
                    self.decode.role
                    if self.decode
                    else (self.prefill.role if self.prefill else None)
                )
                self.metrics.upstream_errors.labels(role or "proxy").inc()
        now = tl.now()
        tl.record(
            self.req_id,
            "finish",
            ts=now,
            status=status,
            e2e_s=now - self.arrival,
            prefill_engine=self.prefill.url if self.prefill else None,
            decode_engine=self.decode.url if self.decode else None,
            prefill_name=self.prefill.label if self.prefill else None,
            decode_name=self.decode.label if self.decode else None,
            prompt_tokens=self.usage.get("prompt_tokens"),
            completion_tokens=self.usage.get(
                "completion_tokens", self.num_tokens if self.first_token else None
            ),
            **self.ids,
        )
        self.metrics.requests.labels(self.route, str(status)).inc()
        self.metrics.e2e.observe(now - self.arrival)
        self.metrics.in_flight.dec()
        if self.on_finish is not None:
            done, self.on_finish = self.on_finish, None
            done()
        return response
