"""`labkit demo`: the lab's main job in a terminal.

Starts a PD pair (real vLLM where GPUs and vLLM are present, else simulated, and says which),
sends one long prompt and then a burst of mixed requests (some sharing a system prompt)
through the PD proxy, and prints what the engines reported: blocks each engine held, the KV
that crossed from prefill to decode, and TTFT / ITL per request. Every figure comes from the
running engines' /metrics, observer events and the proxy's timeline.

With several engines (`labkit demo --num-prefill 2 --num-decode 2`) it prints every engine's
block strip, which engines served each request, and the routing summary: requests and
prefix-cache hits per engine under the lab's routing policy (--routing-policy).
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from labkit.vocab import BLOCK_STATE_CHARS


def stream_completion(url: str, model: str, prompt: list[int], max_tokens: int,
                      req_id: str | None = None) -> dict[str, Any]:
    """One streamed completion; returns TTFT, ITLs and end-to-end from the client's side
    (and `req_id`, the X-Request-Id the proxy's timeline knows it by)."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    headers = {"X-Request-Id": req_id} if req_id else None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers,
                      timeout=120) as r:
        if r.is_error:
            r.read()  # the engine's message goes with the error
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"req_id": req_id, "prompt_tokens": len(prompt), "tokens": len(stamps),
            "ttft": stamps[0] - t0 if stamps else float("nan"),
            "itl": sum(itl) / len(itl) if itl else float("nan"),
            "e2e": time.perf_counter() - t0}


def block_strip(states: bytes, width: int = 64, rows: int = 4) -> list[str]:
    """The first physical blocks up to the last one not free (at most width*rows), one
    character each, whole rows (vLLM hands blocks out from the head of its free queue, so a
    young engine's activity is at the low ids)."""
    last = max((i for i, b in enumerate(states) if b), default=0)
    shown = min(len(states), width * rows, -(-(last + 1) // width) * width)
    chars = "".join(BLOCK_STATE_CHARS[b] for b in states[:shown])
    return [chars[r * width:(r + 1) * width] for r in range(rows) if chars[r * width:]]


def strip_caption(used: int, states: bytes, shown: int) -> str:
    """What the block strip shows, in words: how many in use of how many, what is left out."""
    total = len(states)
    rest = states[shown:]
    busy_rest = sum(1 for b in rest if b)
    tail = (f"; the other {len(rest):,} are free" if rest and not busy_rest else
            f"; {busy_rest:,} more not free among the other {len(rest):,}" if rest else "")
    return (f"busiest moment: {used:,} of {total:,} blocks in use ({used / max(total, 1):.1%}); "
            f"blocks 0-{shown - 1:,} below, one character a block ('#' in use, 'S' shared "
            f"prefix, 'c' cached, '.' free){tail}:")


def demo_lengths(max_model_len: int) -> tuple[int, int, list[int], list[int], float]:
    """(first prompt, shared system prompt, other prompt bodies, output lengths, scale): the
    demo's request sizes, scaled down to fit a small pool's max_model_len."""
    first, system, bodies, outs = 1081, 256, [64, 200, 500, 900], [16, 48, 96]
    need = max(first + 32, system + max(bodies) + max(outs))
    scale = min(1.0, (max_model_len - 1) / need)
    if scale < 1.0:
        first = int(first * scale)
        system = max(1, int(system * scale))
        bodies = [max(1, int(b * scale)) for b in bodies]
        outs = [max(1, int(o * scale)) for o in outs]
    return first, system, bodies, outs, scale


def run_demo(lab: Any, num_requests: int = 12, seed: int = 0) -> int:
    """Start `lab`, drive it, print the report, stop it. Returns an exit code."""
    max_len = min(e.max_model_len for e in lab.plan.engines)
    if max_len < 160:
        from labkit.plan import ConfigError

        bs = lab.plan.engines[0].config.block_size
        raise ConfigError(f"the engines take prompts of at most {max_len} tokens (a pool of "
                          f"{lab.plan.engines[0].num_blocks} blocks); the demo needs 160",
                          f"use --num-gpu-blocks {-(-160 // bs) * 2} or more, or leave it out")
    first_len, system_len, bodies, outs, scale = demo_lengths(max_len)
    print(lab.describe(), flush=True)
    if scale < 1.0:
        print(f"a small pool (max_model_len {max_len:,} tokens): the demo's requests are "
              f"scaled to {scale:.0%} of their size", flush=True)
    lab.start(progress=True)
    try:
        tel = lab.telemetry()
        tel.wait_connected(10.0)  # at once if Lab.start already connected it
        model, url = lab.plan.model.name, lab.url
        vocab = min(lab.plan.model.vocab_size, 30000)
        rng = random.Random(seed)
        first = [rng.randrange(100, vocab) for _ in range(first_len)]
        print(f"\n1) one {first_len:,}-token prompt through the PD proxy ...", flush=True)
        tag = f"demo-{time.time_ns() % 10**9:09d}"
        results = [stream_completion(url, model, first, max(1, int(32 * scale)), f"{tag}-0")]
        system = [rng.randrange(100, vocab) for _ in range(system_len)]
        prompts = []
        for i in range(num_requests):
            body = [rng.randrange(100, vocab) for _ in range(rng.choice(bodies))]
            prompts.append((system + body) if i % 2 == 0 else body)
        print(f"2) {num_requests} more at once (half share a {system_len}-token system "
              "prompt) ...", flush=True)
        peak: dict[str, tuple[int, bytes]] = {}
        kv: list[tuple[str, Any]] = []  # (engine, LayerTiming | KVTransfer)
        with ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(stream_completion, url, model, p, rng.choice(outs),
                                f"{tag}-{i + 1}") for i, p in enumerate(prompts)]
            while not all(f.done() for f in futs):
                _fold(tel.poll(), peak, kv)
                time.sleep(0.1)
            results += [f.result() for f in futs]
        _settle(tel, peak, kv)
        _report(lab, results, peak, kv)
        return 0
    finally:
        lab.stop()
        print("\nstopped: every engine and the proxy are gone.", flush=True)


def _settle(tel: Any, peak: dict[str, tuple[int, bytes]], kv: list[tuple[str, Any]],
            quiet_s: float = 0.5, max_s: float = 3.0) -> None:
    """Fold polls until the engines have said nothing new for `quiet_s` (the last steps,
    frees, pool snapshots and transfers are in), at most `max_s` seconds."""
    start = last = time.monotonic()
    while time.monotonic() - last < quiet_s and time.monotonic() - start < max_s:
        delta = tel.poll()
        if delta.observer:
            last = time.monotonic()
        _fold(delta, peak, kv)
        time.sleep(0.1)


def _fold(delta: Any, peak: dict[str, tuple[int, bytes]], kv: list[tuple[str, Any]]) -> None:
    """Keep from one poll's observer batches each engine's busiest pool snapshot and every
    KV-streaming event (per-layer timings, whole transfers)."""
    for batch in delta.observer:
        for ev in batch.events:
            kind = type(ev).__name__
            if kind in ("LayerTiming", "KVTransfer"):
                kv.append((batch.engine_id, ev))
            states = getattr(ev, "block_state", None)
            if states is None:
                continue
            used = sum(1 for b in states if b >= 2)
            if used >= peak.get(batch.engine_id, (-1, b""))[0]:
                peak[batch.engine_id] = (used, bytes(states))


def _report(lab: Any, results: list[dict[str, Any]], peak: dict[str, tuple[int, bytes]],
            kv: list[tuple[str, Any]]) -> None:
    from labkit.telemetry.metrics import scrape

    label = "REAL vLLM" if lab.kind == "vllm" else "SIMULATED"
    print(f"\n=== {label}: what the engines reported ===")
    for name, eng in lab.engines.items():
        snap = scrape(eng.base_url)
        src = {s: snap.get("vllm:prompt_tokens_by_source_total", source=s) or 0
               for s in ("local_compute", "local_cache_hit", "external_kv_transfer")}
        info = snap.info("vllm:cache_config_info") or {}
        print(f"{name:>8}: {info.get('num_gpu_blocks', '?')} KV blocks of "
              f"{info.get('block_size', '?')} tokens; prompt tokens computed "
              f"{src['local_compute']:.0f}, from its prefix cache {src['local_cache_hit']:.0f}, "
              f"received over the KV connector {src['external_kv_transfer']:.0f}")
        if name in peak:
            used, states = peak[name]
            strip = block_strip(states)
            print("          " + strip_caption(used, states, sum(len(s) for s in strip)))
            for line in strip:
                print("          " + line)
    print("\nPer request, as the client saw it:")
    print("  TTFT = time to first token (queueing + prefill + the KV transfer to decode);")
    print("  ITL  = inter-token latency, the mean gap between two streamed tokens (decode).")
    served = _served_by(lab) if getattr(lab, "is_xpyd", False) else {}
    where = f" {'prefill':>10} {'decode':>9}" if served else ""
    print(f"\n{'prompt tok':>10} {'output tok':>10} {'TTFT ms':>8} {'ITL ms':>7} "
          f"{'e2e ms':>7}{where}")
    for r in results:
        p, d = served.get(r.get("req_id"), ("?", "?"))
        print(f"{r['prompt_tokens']:>10,} {r['tokens']:>10,} {r['ttft'] * 1e3:>8.1f} "
              f"{r['itl'] * 1e3:>7.2f} {r['e2e'] * 1e3:>7.1f}"
              + (f" {p:>10} {d:>9}" if served else ""))
    if served:
        _print_routing(lab)
    _print_kv_streaming(kv)
    print(f"\nlabel: {label}. Logs: {lab.run_dir}")


def _served_by(lab: Any) -> dict[str, tuple[str, str]]:
    """Request id -> (prefill engine, decode engine), from the proxy's timeline summaries."""
    try:
        rows = httpx.get(f"{lab.url}/timeline/requests", params={"limit": 10_000},
                         timeout=5).json()["requests"]
    except (httpx.HTTPError, ValueError, KeyError):
        return {}
    return {r["req_id"]: (r.get("prefill_name") or "?", r.get("decode_name") or "?")
            for r in rows}


def routing_summary(lab: Any) -> list[str]:
    """The routing panel in words: the policy, requests per engine, prefix-cache hits per
    prefill engine (vllm:prefix_cache_hits_total / queries_total, tokens)."""
    from labkit.bench.routing_served import prefix_cache_counts

    state = lab.routing()
    hits = prefix_cache_counts(lab)
    lines = [f"routing policy: {state['policy']} (switch: lab.set_routing_policy(...) or "
             "POST /router on the proxy)"]
    for name in state["prefill"]:
        h, q = hits.get(name, (0, 0))
        lines.append(f"  {name:>10}: {state['routed'][name]:>3} requests, prefix-cache hits "
                     f"{h:,} of {q:,} prompt tokens ({h / q if q else 0:.0%})")
    for name in state["decode"]:
        lines.append(f"  {name:>10}: {state['routed'][name]:>3} requests")
    h = sum(v[0] for v in hits.values())
    q = sum(v[1] for v in hits.values())
    lines.append(f"  all prefill: {h:,} of {q:,} prompt tokens came from a prefix cache "
                 f"({h / q if q else 0:.0%})")
    return lines


def _print_routing(lab: Any) -> None:
    print("\nRouting (the proxy's counts; hits from each prefill engine's /metrics):")
    for line in routing_summary(lab):
        print(line)


def _print_kv_streaming(kv: list[tuple[str, Any]]) -> None:
    """Per-layer save/load times per engine (bracketed synchronous connectors) and whole
    request transfers (KVTransfer: asynchronous connectors such as NIXL, and synchronous loads)."""
    layers: dict[tuple[str, str], list[Any]] = {}
    moves: list[Any] = []
    for engine, e in kv:
        kind = type(e).__name__
        if kind == "LayerTiming" and e.layer != "wait_for_save" and e.num_bytes:
            layers.setdefault((engine, e.op), []).append(e)
        elif kind == "KVTransfer" and e.direction == "recv" and e.num_bytes:
            moves.append(e)
    for (engine, op), evs in sorted(layers.items()):
        ms = sorted((e.end - e.start) * 1e3 for e in evs)
        med = ms[len(ms) // 2]
        size = max(e.num_bytes for e in evs)
        if med < 0.01:  # an asynchronous connector (NIXL) does nothing inside the layer hooks
            print(f"\nper-layer KV {op} on {engine}: {len(ms)} layer events, no time spent "
                  "in the layer hooks (the connector moves KV asynchronously)")
            continue
        print(f"\nper-layer KV {op} on {engine} (observer, {len(ms)} layer events): median "
              f"{med:.2f} ms for up to {size / 1e6:.1f} MB a layer, "
              f"{size / (med / 1e3) / 1e9:.1f} GB/s")
    if moves:
        ms = sorted((e.end - e.start) * 1e3 for e in moves)
        total = sum(e.num_bytes for e in moves)
        secs = sum(e.end - e.start for e in moves)
        print(f"KV received by decode: {len(moves)} transfers ({moves[0].connector}), "
              f"{total / 1e6:.1f} MB, median {ms[len(ms) // 2]:.2f} ms per request from "
              "allocation to arrival" + (f" ({total / secs / 1e9:.1f} GB/s over those "
                                         "intervals)" if secs > 0 else ""))
