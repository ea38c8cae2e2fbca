"""An async load generator for any OpenAI completions endpoint on this machine.

Each request of a Workload is sent at its arrival time as a streaming `/v1/completions`
with the prompt as token ids, `ignore_eos` and `max_tokens` = its output length (so every
request produces exactly what the workload asked, as vLLM's own serving benchmark does).
Every SSE chunk's arrival is timed; from those come TTFT, ITL, TPOT and e2e per request.

    result = run_load(lab.url, workload)          # blocking; works inside Jupyter too
    result = await load(lab.url, workload)        # in an event loop

Only loopback URLs are accepted: the lab benchmarks its own engines, nothing else.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from labkit.bench.workloads import Workload

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class RequestResult:
    """One request as the client saw it. Times are seconds since the run started.

    `arrival` is when the workload scheduled it, `sent` when it went out, `token_times`
    the arrival of each streamed chunk that carried output (vLLM streams one chunk per
    engine step, one token each unless speculative decoding is on).
    """

    index: int
    arrival: float
    prompt_len: int
    output_len: int  # asked (max_tokens)
    sent: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None
    num_output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish is not None and self.first_token is not None

    @property
    def ttft(self) -> float | None:
        """First token time minus arrival (queueing in the client included)."""
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finish is None or self.error else self.finish - self.arrival

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive output chunks (vLLM bench's ITL)."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (finish - first token) / (n - 1)."""
        if not self.ok or self.num_output_tokens < 2:
            return None
        return (self.finish - self.first_token) / (self.num_output_tokens - 1)  # type: ignore[operator]


@dataclass
class LoadResult:
    """Every request of one run, plus the run's wall duration and what it was aimed at."""

    url: str
    model: str
    workload: str
    records: list[RequestResult]
    duration_s: float
    time_scale: float = 1.0  # simulated seconds per measured second (paced simulators)


def check_loopback(url: str) -> str:
    """`url` without a trailing slash; ValueError unless it is http(s) on this machine."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK:
        raise ValueError(f"the load generator only targets this machine (127.0.0.1), got {url!r}")
    return url.rstrip("/")


async def _served_model(client: httpx.AsyncClient, url: str) -> str:
    r = await client.get(f"{url}/v1/models")
    r.raise_for_status()
    return str(r.json()["data"][0]["id"])


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], rec: RequestResult,
               t0: float, sem: asyncio.Semaphore | None) -> None:
    """Send one streaming completion and time its chunks into `rec`."""
    now = time.perf_counter
    try:
        if sem is not None:
            await sem.acquire()
        rec.sent = now() - t0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:200]}"
                return
            usage_tokens: int | None = None
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                t = now() - t0
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = str(chunk["error"])[:200]
                    return
                if chunk.get("usage"):
                    usage_tokens = int(chunk["usage"].get("completion_tokens", 0))
                for choice in chunk.get("choices") or []:
                    ids = choice.get("token_ids")
                    rec.num_output_tokens += len(ids) if ids else 1
                    if rec.first_token is None:
                        rec.first_token = t
                    rec.token_times.append(t)
            rec.finish = now() - t0
            if usage_tokens is not None:
                rec.num_output_tokens = usage_tokens
            if rec.first_token is None:
                rec.error = "stream ended without a token"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if sem is not None and rec.sent is not None:
            sem.release()


async def load(url: str, workload: Workload, *, model: str | None = None,
               max_requests: int | None = None, max_duration_s: float | None = None,
               max_concurrency: int | None = None, request_timeout_s: float = 600.0,
               time_scale: float = 1.0, vocab_size: int = 32000,
               extra_body: dict[str, Any] | None = None) -> LoadResult:
    """Replay `workload` against `url` (an OpenAI server on 127.0.0.1); see module doc.

    Args:
        url: the proxy of a Lab (`lab.url`) or one engine.
        model: served model name; default: the first of `/v1/models`.
        max_requests: send at most this many (the first by arrival).
        max_duration_s: stop sending after this many seconds; requests still running at
            that time plus `request_timeout_s` are cancelled and recorded with an error.
        max_concurrency: at most this many requests in flight (None: open loop).
        time_scale: simulated seconds per wall second of a paced simulator (Lab speed):
            arrivals are compressed by it and measured times stretched back.
        vocab_size: prompt token ids are drawn below this.
        extra_body: more fields for every request body.
    Returns:
        A LoadResult with one RequestResult per request sent, in workload order.
    """
    url = check_loopback(url)
    reqs = workload.requests[:max_requests] if max_requests is not None else workload.requests
    prompts = workload.token_ids(vocab_size)[:len(reqs)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(request_timeout_s, connect=10.0)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        model = model or await _served_model(client, url)
        records = [RequestResult(i, r.arrival_s / time_scale, r.prompt_len, r.output_len)
                   for i, r in enumerate(reqs)]
        tasks: list[asyncio.Task[None]] = []
        t0 = time.perf_counter()
        deadline = math.inf if max_duration_s is None else max_duration_s
        for rec, prompt in zip(records, prompts, strict=True):
            if rec.arrival > deadline:
                break
            delay = rec.arrival - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            body = {"model": model, "prompt": prompt, "max_tokens": rec.output_len,
                    "ignore_eos": True, "stream": True, "return_token_ids": True,
                    "stream_options": {"include_usage": True}, **(extra_body or {})}
            tasks.append(asyncio.create_task(_one(client, url, body, rec, t0, sem)))
        sent = records[:len(tasks)]
        if tasks:
            wait = None if max_duration_s is None else max(
                0.0, max_duration_s + request_timeout_s - (time.perf_counter() - t0))
            _, pending = await asyncio.wait(tasks, timeout=wait)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for rec in sent:
                if rec.finish is None and rec.error is None:
                    rec.error = "cancelled at the run's time limit"
        duration = time.perf_counter() - t0
    if time_scale != 1.0:
        for rec in sent:
            _scale(rec, time_scale)
        duration *= time_scale
    return LoadResult(url, model, workload.name, sent, duration, time_scale)


def _scale(rec: RequestResult, k: float) -> None:
    """Measured wall seconds -> simulated seconds."""
    rec.arrival *= k
    for name in ("sent", "first_token", "finish"):
        v = getattr(rec, name)
        if v is not None:
            setattr(rec, name, v * k)
    rec.token_times = [t * k for t in rec.token_times]


def run_load(url: str, workload: Workload, **kwargs: Any) -> LoadResult:
    """Blocking `load(...)`; inside a running event loop (Jupyter) it runs on a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(load(url, workload, **kwargs))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, load(url, workload, **kwargs)).result()
