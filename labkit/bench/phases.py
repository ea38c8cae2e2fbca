"""A PD request's TTFT split into its sides, from the PD proxy's timeline (real runs) or the
simulator's records (SimCluster): prefill side (proxy -> prefill -> back), decode side (proxy
-> decode -> first token), proxy TTFT. Used by labkit.bench.fidelity."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def rel_error(sim: float, real: float) -> float:
    """(sim - real) / real; nan where real is 0 or missing."""
    if real is None or sim is None or not real or math.isnan(real) or math.isnan(sim):
        return math.nan
    return (sim - real) / real


PHASE_EVENTS = ("arrival", "prefill_start", "prefill_end", "kv_transfer_start", "first_token",
                "finish")


def proxy_phases(url: str, n: int) -> list[dict[str, Any]]:
    """The PD proxy's own times for its last `n` requests (GET /timeline/requests): when each
    reached the proxy, went to prefill, came back, went to decode and gave its first token.
    They split a PD TTFT into prefill side, proxy and decode side (seconds, proxy clock)."""
    import httpx

    reqs = httpx.get(f"{url}/timeline/requests", params={"limit": n}, timeout=10).json()["requests"]
    return [{"prompt_tokens": r.get("prompt_tokens"),
             **{e: r.get(f"{e}_ts") for e in PHASE_EVENTS}} for r in reqs]


PHASE_SPANS = {"prefill_side": ("prefill_start", "prefill_end"),  # proxy -> prefill -> back
               "decode_side": ("kv_transfer_start", "first_token"),  # proxy -> decode -> token
               "proxy_ttft": ("arrival", "first_token")}


def phase_spans(phases: list[dict[str, Any]]) -> dict[str, float]:
    """Medians (seconds) over a PD case's requests of PHASE_SPANS (end - start of the proxy's
    events); requests missing an event are left out of that span."""
    return {name: float(np.median(xs)) if (xs := [p[b] - p[a] for p in phases
                                                  if p.get(a) is not None and p.get(b) is not None])
            else math.nan for name, (a, b) in PHASE_SPANS.items()}


def phase_table(real: dict[str, Any], sim: dict[str, Any]) -> str:
    """Markdown, one row per case whose real and simulated runs both have phases (PD):
    median prefill side, decode side and proxy TTFT, real / sim in ms with the error;
    "" when no case has them."""
    head = ["| case | prefill side real / sim (err) | decode side | proxy TTFT |",
            "| --- | --- | --- | --- |"]
    for key, r in real.items():
        if r.get("phases") and sim.get(key, {}).get("phases"):
            a, b = phase_spans(r["phases"]), phase_spans(sim[key]["phases"])
            head.append(f"| {key} | " + " | ".join(
                f"{a[k] * 1e3:.1f} / {b[k] * 1e3:.1f} ms ({rel_error(b[k], a[k]):+.0%})"
                for k in PHASE_SPANS) + " |")
    return "\n".join(head) if len(head) > 2 else ""


def sim_phases(records: list[Any]) -> list[dict[str, Any]]:
    """SimCluster records in the proxy's terms (PHASE_EVENTS): its router forwards at arrival,
    has prefill's answer when the prefill engine emits it and calls decode at once; each
    call's API time (the router hop, paid before the engine sees it) is inside its side."""
    return [{"prompt_tokens": r.prompt_len, "arrival": r.arrival, "prefill_start": r.arrival,
             "prefill_end": r.prefill_end, "kv_transfer_start": r.prefill_end,
             "first_token": r.first_token, "finish": r.finish} for r in records]
