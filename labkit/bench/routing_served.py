"""The routing comparison through a served lab: the chat workload sent over HTTP to the PD
proxy of an xPyD `Lab`, prefix hits read from each prefill engine's /metrics.

    with Lab(num_prefill=2, num_decode=2, routing_policy="kv-aware") as lab:
        print(serve_chat(lab, ChatWorkload(num_conversations=8, num_turns=4)))

labkit/bench/routing.py runs the same workload on in-process engines under one simulated
clock (exact, fast, no HTTP); this runs it the way a user's client does: each conversation
a thread that sends its turns one after the other (the next when the answer is in), the
proxy routing each request under the lab's policy. What is counted is what the engines say:
`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total` (tokens).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from labkit.bench.routing import ChatWorkload, PrefixHits


@dataclass
class ServedResult(PrefixHits):
    """One workload through one served lab, per prefill engine (metric deltas over the run)."""

    policy: str
    hit_tokens: dict[str, int]
    query_tokens: dict[str, int]
    requests: dict[str, int]  # requests whose prefill each engine served (the proxy's count)
    num_ok: int
    num_failed: int
    errors: list[str] = field(default_factory=list, repr=False)

    def line(self) -> str:
        per = ", ".join(f"{n} {self.hit_tokens[n]:,} ({self.requests.get(n, 0)} req)"
                        for n in self.hit_tokens)
        return (f"{self.policy:<13} prefix-hit tokens {self.total_hit_tokens:>7,} "
                f"({self.hit_rate:.1%} of prompt tokens): {per}; {self.num_ok} answered, "
                f"{self.num_failed} failed")


def prefix_cache_counts(lab: Any) -> dict[str, tuple[int, int]]:
    """(hit tokens, queried tokens) so far on each prefill engine of `lab`, from /metrics."""
    from labkit.telemetry.metrics import scrape

    out = {}
    for name, eng in lab.engines.items():
        if eng.role != "prefill":
            continue
        snap = scrape(eng.base_url)
        out[name] = (int(snap.sum("vllm:prefix_cache_hits")),
                     int(snap.sum("vllm:prefix_cache_queries")))
    return out


def serve_chat(lab: Any, workload: ChatWorkload | None = None, *, max_tokens: int = 16,
               max_workers: int = 8, time_scale: float = 1.0,
               timeout: float = 120.0) -> ServedResult:
    """Send `workload`'s conversations through `lab`'s proxy: each starts at its time in
    `workload.starts()` and sends its turns in order, each `think_s` after the previous
    answer (both times multiplied by `time_scale`; 0: at once), up to `max_workers`
    conversations at a time. Each answer is capped at `max_tokens` tokens (the next turn's
    prompt carries the workload's own reply tokens, as a chat client resends the history).
    Returns the prefix-cache deltas the prefill engines report."""
    wl = workload or ChatWorkload()
    convs = wl.conversations(lab.plan.model.vocab_size)
    model = lab.plan.model.name
    before = prefix_cache_counts(lab)
    routed_before = lab.routing()["routed"]
    errors: list[str] = []

    t0 = time.monotonic()
    starts = wl.starts()

    def talk(c: int) -> int:
        ok = 0
        time.sleep(max(0.0, t0 + starts[c] * time_scale - time.monotonic()))
        with httpx.Client(timeout=timeout) as client:
            for k, (prompt, n_out) in enumerate(convs[c]):
                if k:
                    time.sleep(wl.think_s * time_scale)
                body = {"model": model, "prompt": prompt, "max_tokens": min(n_out, max_tokens),
                        "ignore_eos": True}
                try:
                    r = client.post(f"{lab.url}/v1/completions", json=body)
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    continue
                if r.status_code == 200:
                    ok += 1
                else:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
        return ok

    with ThreadPoolExecutor(max(1, min(max_workers, len(convs)))) as pool:
        num_ok = sum(pool.map(talk, range(len(convs))))
    after = prefix_cache_counts(lab)
    routed = lab.routing()
    return ServedResult(
        routed["policy"],
        {n: after[n][0] - before.get(n, (0, 0))[0] for n in after},
        {n: after[n][1] - before.get(n, (0, 0))[1] for n in after},
        {n: routed["routed"][n] - routed_before.get(n, 0) for n in after},
        num_ok, sum(len(c) for c in convs) - num_ok, errors)
