"""Routing policies compared on the simulator: prefix-hit tokens on prefill, per policy.

    python -m labkit.bench.routing                       # 2 prefill + 2 decode, 3 policies
    python -m labkit.bench.routing --prefill 3 --conversations 32 --json out.json

A multi-turn chat workload (`ChatWorkload`: one system prompt shared by every conversation,
each turn's prompt = the conversation so far + a new user message) runs through simulated
prefill and decode engines (NIXL, one clock) once per policy of labkit.pd.router. Each turn
is sent when the previous answer finished plus a think time (closed loop, like a person
chatting). The prefill engines' KV events feed the router's PrefixIndex when their step
ends (when vLLM would publish them). What is measured per policy: the prompt tokens each
prefill engine found in its prefix cache (vllm:prefix_cache_hits_total), their share of all
prompt tokens (hit rate), and TTFT p50 at the client.

The engines are driven here rather than through SimCluster because SimCluster routes
round-robin inside its event loop and sends open-loop arrivals; this driver asks a Router for
every phase and sends the next turn of a conversation when the previous one is answered.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from labkit.pd.router import POLICIES, Decision, EngineLoad, Policy, Router

FIRST_TOKEN_ID = 1000  # as labkit.bench.workloads: prompts avoid the special-token ids


@dataclass(frozen=True)
class ChatWorkload:
    """Conversations sharing one system prompt; lengths in tokens, (lo, hi) drawn uniformly."""

    num_conversations: int = 16
    num_turns: int = 5
    system_len: int = 512
    user_len: tuple[int, int] = (32, 160)
    reply_len: tuple[int, int] = (64, 256)
    rate: float = 4.0  # conversations started per second (Poisson)
    think_s: float = 1.0  # from an answer to the next question
    seed: int = 0

    def conversations(self, vocab_size: int = 32000) -> list[list[tuple[list[int], int]]]:
        """Per conversation, per turn: (prompt token ids, output length). Turn k's prompt is
        turn k-1's prompt + its reply (fixed tokens: what the assistant said) + a new user
        message, so it starts with everything the conversation has said so far."""
        rng = np.random.default_rng([self.seed, 0xC4A7])
        hi = max(FIRST_TOKEN_ID + 2, vocab_size)
        system = rng.integers(FIRST_TOKEN_ID, hi, size=self.system_len).tolist()
        out = []
        for _ in range(self.num_conversations):
            history, turns = list(system), []
            for _ in range(self.num_turns):
                user = rng.integers(FIRST_TOKEN_ID, hi, size=int(rng.integers(*self.user_len, endpoint=True)))
                n_out = int(rng.integers(*self.reply_len, endpoint=True))
                prompt = history + user.tolist()
                turns.append((prompt, n_out))
                history = prompt + rng.integers(FIRST_TOKEN_ID, hi, size=n_out).tolist()
            out.append(turns)
        return out

    def starts(self) -> list[float]:
        rng = np.random.default_rng([self.seed, 0x57A7])
        gaps = rng.exponential(1.0 / self.rate, size=self.num_conversations)
        gaps[0] = 0.0
        return np.cumsum(gaps).tolist()


@dataclass
class TurnRecord:
    """One request (one turn of one conversation), times in simulated seconds."""

    req_id: str
    conversation: int
    turn: int
    prompt_len: int
    arrival: float
    prefill_engine: str = ""
    decode_engine: str = ""
    predicted_hit_tokens: int = 0  # what the router's index said at the decision
    hit_tokens: int = 0  # what the prefill engine found in its prefix cache
    first_token: float | None = None
    finish: float | None = None
    prefill_reason: str = ""
    decode_reason: str = ""

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


class PrefixHits:
    """Prefix-cache hits of a routing run: `hit_tokens` and `query_tokens` per prefill engine."""

    hit_tokens: dict[str, int]
    query_tokens: dict[str, int]

    @property
    def total_hit_tokens(self) -> int:
        return sum(self.hit_tokens.values())

    @property
    def hit_rate(self) -> float:
        total = sum(self.query_tokens.values())
        return self.total_hit_tokens / total if total else 0.0


@dataclass
class PolicyResult(PrefixHits):
    """One policy's run, per prefill engine: prompt tokens looked up in the prefix cache and
    found there (vllm:prefix_cache_queries_total / hits_total; a request preempted and
    recomputed is looked up again), requests routed there."""

    policy: Policy
    query_tokens: dict[str, int]
    hit_tokens: dict[str, int]
    requests: dict[str, int]
    ttft_p50_s: float
    ttft_p99_s: float
    records: list[TurnRecord] = field(repr=False, default_factory=list)


    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "records"}
        d.update(total_hit_tokens=self.total_hit_tokens, hit_rate=self.hit_rate)
        return d


def _load(engine: Any) -> EngineLoad:
    """A SimEngine's numbers under vLLM's /metrics names."""
    return EngineLoad(engine.engine_id, engine.num_running, engine.num_waiting,
                      engine.kv_cache_usage, engine.num_gpu_blocks)


def simulate(policy: Policy, workload: ChatWorkload | None = None, *, num_prefill: int = 2,
             num_decode: int = 2, model: str = "lab-1b", gpu: str = "h100", link: str = "nvlink",
             block_size: int = 16, num_gpu_blocks: int | None = None,
             queue_penalty_tokens: int | None = None) -> PolicyResult:
    """Serve `workload` through num_prefill + num_decode simulated engines under `policy`.

    Args:
        num_gpu_blocks: each engine's pool (None: what the GPU holds; smaller pools evict).
        queue_penalty_tokens: kv-aware's load weight (None: the Router's default).
    """
    from labkit.engines.sim.clock import SimClock
    from labkit.engines.sim.cluster import NIXL_PREFILL_PARAMS
    from labkit.engines.sim.connector import InProcessTransport
    from labkit.engines.sim.engine import SimEngine
    from labkit.hardware import LINKS

    wl = workload or ChatWorkload()
    clock = SimClock()
    transport = InProcessTransport(LINKS[link], LINKS["same-gpu"])
    engines: list[Any] = []
    for role, n in (("prefill", num_prefill), ("decode", num_decode)):
        for i in range(n):
            engines.append(SimEngine(
                model, gpu, connector="nixl", transport=transport, engine_id=f"{role}-{i}",
                clock=clock, seed=len(engines), block_size=block_size,
                num_gpu_blocks=num_gpu_blocks, enable_kv_cache_events=role == "prefill",
                side_channel_port=5600 + len(engines)))
    prefill, decode = engines[:num_prefill], engines[num_prefill:]
    index = {e.engine_id: i for i, e in enumerate(engines)}
    kw = {} if queue_penalty_tokens is None else {"queue_penalty_tokens": queue_penalty_tokens}
    router = Router([e.engine_id for e in prefill], [e.engine_id for e in decode], policy,
                    block_size=block_size, **kw)
    convs = wl.conversations(engines[0].model.vocab_size)

    heap: list[tuple[float, int, int, Any]] = []
    seq = itertools.count()
    wake_at: list[float | None] = [None] * len(engines)
    arrive, submit_decode, wake, feed = 0, 1, 2, 3

    def push(t: float, kind: int, data: Any) -> None:
        heapq.heappush(heap, (t, next(seq), kind, data))

    def wake_engine(i: int, t: float) -> None:
        t = max(t, engines[i].busy_until)
        if wake_at[i] is not None and wake_at[i] <= t:  # type: ignore[operator]
            return
        wake_at[i] = t
        push(t, wake, i)

    transport.on_notify = lambda engine_id, at: wake_engine(index[engine_id], at)
    records: dict[str, TurnRecord] = {}
    for c, t0 in enumerate(wl.starts()):
        push(t0, arrive, (c, 0))

    def decided(rec: TurnRecord, d: Decision) -> None:
        if d.phase == "prefill":
            rec.prefill_engine, rec.prefill_reason = d.engine, d.reason
        else:
            rec.decode_engine, rec.decode_reason = d.engine, d.reason

    while heap:
        t, _, kind, data = heapq.heappop(heap)
        clock.advance_to(t)
        if kind == arrive:
            c, k = data
            prompt, _ = convs[c][k]
            rec = records[f"c{c}t{k}"] = TurnRecord(f"c{c}t{k}", c, k, len(prompt), t)
            d = router.route_prefill(prompt, [_load(e) for e in prefill])
            decided(rec, d)
            rec.predicted_hit_tokens = router.index.match(prompt, [d.engine])[d.engine]
            i = index[d.engine]
            engines[i].add_request(rec.req_id, prompt, 1, kv_transfer_params=dict(NIXL_PREFILL_PARAMS),
                                   arrival_time=t)
            wake_engine(i, t)
        elif kind == submit_decode:
            rec, params, hashes = data
            prompt, n_out = convs[rec.conversation][rec.turn]
            d = router.route_decode(len(prompt) + n_out, [_load(e) for e in decode])
            decided(rec, d)
            i = index[d.engine]
            engines[i].add_request(rec.req_id, prompt, n_out, kv_transfer_params=params,
                                   arrival_time=t, block_hashes=hashes)
            wake_engine(i, t)
        elif kind == feed:
            name, events = data
            router.index.apply(name, events)
        else:
            i = data
            if wake_at[i] != t:
                continue  # superseded by an earlier wake
            wake_at[i] = None
            engine = engines[i]
            res = engine.step(now=t)
            if i < num_prefill:
                events = engine.take_kv_events()
                if events:  # published when the step ends
                    push(res.end, feed, (engine.engine_id, events))
            for request, params in res.finished:
                rec = records[request.request_id]
                if i < num_prefill:
                    rec.hit_tokens = request.num_local_cached_tokens
                    push(request.finished_time, submit_decode, (rec, params, request.block_hashes))
                else:
                    rec.first_token, rec.finish = request.first_token_time, request.finished_time
                    if rec.turn + 1 < wl.num_turns:
                        push(rec.finish + wl.think_s, arrive, (rec.conversation, rec.turn + 1))
            if res.num_scheduled_tokens or res.emitted:
                wake_engine(i, res.end)
            elif engine.has_unfinished():
                nxt = engine.next_event_time()
                if nxt is not None:
                    wake_engine(i, max(nxt, t))

    recs = sorted(records.values(), key=lambda r: (r.conversation, r.turn))
    ttfts = np.array([r.ttft for r in recs if r.ttft is not None], dtype=float)
    names = [e.engine_id for e in prefill]
    return PolicyResult(
        policy,
        {e.engine_id: e.prefix_cache_stats[0] for e in prefill},
        {e.engine_id: e.prefix_cache_stats[1] for e in prefill},
        {n: sum(r.prefill_engine == n for r in recs) for n in names},
        float(np.percentile(ttfts, 50)) if ttfts.size else float("nan"),
        float(np.percentile(ttfts, 99)) if ttfts.size else float("nan"),
        recs,
    )


def compare(workload: ChatWorkload | None = None, policies: tuple[Policy, ...] = POLICIES,
            **kwargs: Any) -> list[PolicyResult]:
    """One `simulate` per policy on the same workload."""
    return [simulate(p, workload, **kwargs) for p in policies]


def table(results: list[PolicyResult]) -> str:
    """Policy, prefix-hit tokens per prefill engine, total, hit rate, requests, TTFT p50."""
    names = list(results[0].hit_tokens)
    head = ["policy", *[f"hit {n}" for n in names], "total hit", "hit rate", "requests",
            "TTFT p50"]
    rows = [head]
    for r in results:
        rows.append([r.policy, *[f"{r.hit_tokens[n]:,}" for n in names],
                     f"{r.total_hit_tokens:,}", f"{r.hit_rate:.1%}",
                     "/".join(str(r.requests[n]) for n in names), f"{r.ttft_p50_s * 1e3:.1f} ms"])
    widths = [max(len(row[j]) for row in rows) for j in range(len(head))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.bench.routing", description=__doc__.split("\n")[0])
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--model", default="lab-1b")
    p.add_argument("--gpu-type", default="h100")
    p.add_argument("--conversations", type=int, default=ChatWorkload.num_conversations)
    p.add_argument("--turns", type=int, default=ChatWorkload.num_turns)
    p.add_argument("--system-len", type=int, default=ChatWorkload.system_len)
    p.add_argument("--rate", type=float, default=ChatWorkload.rate, help="conversations per second")
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="each engine's pool (evicts when small)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    wl = ChatWorkload(a.conversations, a.turns, a.system_len, rate=a.rate, seed=a.seed)
    results = compare(wl, num_prefill=a.prefill, num_decode=a.decode, model=a.model,
                      gpu=a.gpu_type, num_gpu_blocks=a.num_gpu_blocks)
    print(f"simulated: {a.prefill} prefill + {a.decode} decode ({a.model} on {a.gpu_type}, NIXL); "
          f"{wl.num_conversations} conversations x {wl.num_turns} turns, system prompt "
          f"{wl.system_len} tokens, {wl.rate:g} conversations/s, think {wl.think_s:g} s")
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"workload": asdict(wl), "results": [r.to_dict() for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
