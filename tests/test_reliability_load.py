"""Load and soak through the PD proxy in front of a simulated pair (as fast as possible).

- 1,000 requests, at most 100 in flight (asyncio + httpx): every one answered 200 once, with
  its own id, the tokens it asked for; decode's `vllm:request_success` and the proxy's
  timeline count exactly 1,000 and prefill's pool is empty again.
- Soak (marked slow; runs when LABKIT_SOAK=1): a steady load for LABKIT_SOAK_S seconds
  (default 60; 600 for the long run) with every process's RSS sampled: flat within a tolerance.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import labkit
from labkit import faults

NUM_REQUESTS = 1000
MAX_IN_FLIGHT = 64
MAX_TOKENS = 8


def counter(url: str, name: str) -> float:
    """Sum of a Prometheus counter's `_total` samples at `url`/metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == name
        for s in fam.samples
        if s.name == f"{name}_total"
    )


async def drive(
    url: str, n: int, in_flight: int, prefix: str, stream_every: int = 4, until: float | None = None
) -> list[dict]:
    """Send `n` requests (or until the monotonic time `until`), at most `in_flight` at once."""
    gate = asyncio.Semaphore(in_flight)
    # idle connections dropped before the proxy's 5 s keep-alive closes them (else a POST
    # can go out on a closing connection: ReadError, a client-side race)
    limits = httpx.Limits(
        max_connections=in_flight, max_keepalive_connections=in_flight, keepalive_expiry=2.0
    )

    async def one(client: httpx.AsyncClient, i: int) -> dict:
        rid = f"{prefix}-{i}"
        body = {
            "model": "lab-1b",
            "prompt": f"request {i}: the PD lab under load",
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "stream": i % stream_every == 0,
        }
        if body["stream"]:  # vLLM refuses stream_options without stream (400), as the proxy does
            body["stream_options"] = {"include_usage": True}
        async with gate:
            t0 = time.monotonic()
            async with client.stream(
                "POST", f"{url}/v1/completions", json=body, headers={"X-Request-Id": rid}
            ) as r:
                raw = (await r.aread()).decode()
            out = {
                "i": i,
                "rid": rid,
                "echo": r.headers.get("x-request-id"),
                "status": r.status_code,
                "s": time.monotonic() - t0,
                "raw": raw,
            }
        if body["stream"]:
            chunks = [ln[6:] for ln in raw.splitlines() if ln.startswith("data: {")]
            out["ids"] = {httpx.Response(200, content=c).json()["id"] for c in chunks}
            out["tokens"] = (
                httpx.Response(200, content=chunks[-1]).json()["usage"]["completion_tokens"]
                if chunks
                else 0
            )
        elif r.status_code == 200:
            data = httpx.Response(200, content=raw).json()
            out["ids"], out["tokens"] = {data["id"]}, data["usage"]["completion_tokens"]
        return out

    async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as client:
        if until is None:
            return list(await asyncio.gather(*(one(client, i) for i in range(n))))
        results, i = [], 0
        while time.monotonic() < until:  # steady: refill up to in_flight
            batch = await asyncio.gather(*(one(client, i + k) for k in range(in_flight)))
            results += batch
            i += in_flight
        return results


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with labkit.Lab(
        mode="sim",
        model="lab-1b",
        num_gpu_blocks=512,
        speed=0,
        observe=False,
        connector="nixl",
        run_dir=tmp_path_factory.mktemp("load"),
    ) as lab:
        yield lab


def test_thousand_concurrent_requests_none_lost_or_duplicated(lab) -> None:
    decode, prefill = lab.engines["decode"].base_url, lab.engines["prefill"].base_url
    before = counter(decode, "vllm:request_success"), counter(prefill, "vllm:request_success")
    t0 = time.monotonic()
    results = asyncio.run(drive(lab.url, NUM_REQUESTS, MAX_IN_FLIGHT, "load"))
    wall = time.monotonic() - t0
    bad = [r for r in results if r["status"] != 200]
    assert not bad, bad[:3]
    assert all(r["echo"] == r["rid"] for r in results), "a reply carried another request's id"
    assert all(r["tokens"] == MAX_TOKENS for r in results)
    engine_ids = [i for r in results for i in r["ids"]]
    assert len(engine_ids) == len(set(engine_ids)) == NUM_REQUESTS, "an engine id repeats"
    # the engines' own counters: each request prefilled once and decoded once
    after = counter(decode, "vllm:request_success"), counter(prefill, "vllm:request_success")
    assert after[0] - before[0] == NUM_REQUESTS
    assert after[1] - before[1] == NUM_REQUESTS
    # the proxy's timeline: one arrival and one 200 finish per request id, nothing else
    events = httpx.get(f"{lab.url}/timeline", params={"limit": 10**6}, timeout=30).json()
    mine = [e for e in events["events"] if str(e["req_id"]).startswith("load-")]
    arrivals = Counter(e["req_id"] for e in mine if e["event"] == "arrival")
    finishes = Counter(e["req_id"] for e in mine if e["event"] == "finish")
    assert set(arrivals) == set(finishes) == {r["rid"] for r in results}
    assert set(arrivals.values()) == set(finishes.values()) == {1}
    assert all(e.get("status") == 200 for e in mine if e["event"] == "finish")
    assert not [e for e in mine if e["event"] == "error"]
    # every block prefill held for a NIXL read was read and freed
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        info = httpx.get(f"{prefill}/labkit/info", timeout=5).json()
        if info["num_free_blocks"] == info["num_gpu_blocks"] - 1:
            break
        time.sleep(0.1)
    assert info["num_free_blocks"] == info["num_gpu_blocks"] - 1, info["num_free_blocks"]
    lat = sorted(r["s"] for r in results)
    print(
        f"\nload: {NUM_REQUESTS} requests, {MAX_IN_FLIGHT} in flight, {wall:.1f} s "
        f"({NUM_REQUESTS / wall:.0f} req/s); latency p50 {lat[len(lat) // 2]:.3f} s, "
        f"p99 {lat[int(len(lat) * 0.99)]:.3f} s, max {lat[-1]:.3f} s"
    )


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LABKIT_SOAK") != "1", reason="set LABKIT_SOAK=1 to soak")
@pytest.mark.timeout(0)
def test_soak_memory_is_flat(lab) -> None:
    seconds = float(os.environ.get("LABKIT_SOAK_S", "60"))
    pids = {name: faults.pids_in_groups([g]) for name, g in faults.lab_groups(lab).items()}
    samples: dict[int, list[tuple[float, int]]] = {p: [] for ps in pids.values() for p in ps}

    async def sample(until: float) -> None:
        while time.monotonic() < until:
            for p in samples:
                samples[p].append((time.monotonic(), faults.rss_bytes(p)))
            await asyncio.sleep(max(1.0, seconds / 60))

    async def main() -> list[dict]:
        until = time.monotonic() + seconds
        res, _ = await asyncio.gather(drive(lab.url, 0, 16, "soak", until=until), sample(until))
        return res

    results = asyncio.run(main())
    assert results and all(r["status"] == 200 for r in results)
    report = []
    for name, ps in pids.items():
        for p in ps:
            s = samples[p]
            # from the midpoint: warm pools, and the proxy's timeline (a deque of at most
            # 100,000 events) full or filling slowly; a leak keeps growing past it
            warm = s[len(s) // 2][1]
            last = s[-1][1]
            growth = last - warm
            report.append(f"{name}[{p}] {warm / 2**20:.1f} -> {last / 2**20:.1f} MiB")
            # flat: within 10 % + 16 MiB
            assert growth < 0.10 * warm + 16 * 2**20, report[-1]
    print(f"\nsoak {seconds:.0f} s, {len(results)} requests: " + "; ".join(report))
