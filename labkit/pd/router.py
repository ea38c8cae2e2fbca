"""Which engine serves a request's prefill and which its decode, and why.

xPyD serving puts several prefill and decode engines behind one router. The router picks an
engine per phase with a policy a learner can switch while requests flow:

    round-robin    each engine in turn, blind to load and cache
    least-loaded   fewest requests (running + waiting), then lowest KV usage: what each
                   engine's /metrics says (vllm:num_requests_running|waiting,
                   vllm:kv_cache_usage_perc)
    kv-aware       prefill: the engine whose KV events say it holds the longest prefix of
                   the prompt (a queued request costs `queue_penalty_tokens` of that prefix,
                   so one hot engine does not take everything); decode: room for the
                   request's blocks, then fewest requests, then most free blocks

Every choice is a `Decision`: the engine, a short reason and the numbers the policy compared,
so the proxy's timeline can record why each phase went where it went.

Prefix matching (`PrefixIndex`) follows vLLM's prefix cache (vllm/v1/core/kv_cache_utils.py):
a prompt is cut into full blocks of `block_size` tokens, block i's hash chains block i-1's
hash with block i's token ids, and a cache hit is the longest run of leading blocks the engine
holds, at most (num_tokens - 1) // block_size blocks (vLLM always computes the last token).
The hash is the simulator's (labkit/engines/sim/request.py `hash_block_tokens_fast`), so a
simulated engine's block hashes ARE the index's keys. Real vLLM hashes with sha256 and a
per-process random seed (NONE_HASH), so the index never compares an engine's hashes with its
own: each `BlockStored` carries the blocks' token ids and the parent's hash, and the index
rehashes them into its own keys, remembering engine hash -> key for the children and for
`BlockRemoved`.

    engine events ──BlockStored(hashes, parent, token_ids)──> PrefixIndex  (per engine)
    prompt tokens ──block keys──> longest run held, per engine ──> Router.route_prefill
    /metrics (or SimEngine) ──EngineLoad──> Router.route_prefill / route_decode
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from labkit.engines.sim.request import hash_block_tokens_fast

Policy = Literal["round-robin", "least-loaded", "kv-aware"]
Phase = Literal["prefill", "decode"]
POLICIES: tuple[Policy, ...] = ("round-robin", "least-loaded", "kv-aware")
DEFAULT_QUEUE_PENALTY_TOKENS = 512


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One engine's load as vLLM's /metrics reports it (zeros: nothing known)."""

    engine: str
    num_running: int = 0  # vllm:num_requests_running
    num_waiting: int = 0  # vllm:num_requests_waiting
    kv_cache_usage: float = 0.0  # vllm:kv_cache_usage_perc: a fraction 0..1, despite the name
    num_gpu_blocks: int | None = None  # vllm:cache_config_info{num_gpu_blocks=...}

    @property
    def num_queued(self) -> int:
        return self.num_running + self.num_waiting

    @property
    def num_free_blocks(self) -> int | None:
        if self.num_gpu_blocks is None:
            return None
        return int(round(self.num_gpu_blocks * (1.0 - self.kv_cache_usage)))

    @classmethod
    def from_metrics(cls, engine: str, snapshot: Any) -> EngineLoad:
        """From a labkit.telemetry.metrics.MetricsSnapshot of the engine's /metrics."""
        info = snapshot.info("vllm:cache_config_info") or {}
        blocks = info.get("num_gpu_blocks")
        return cls(
            engine,
            int(snapshot.sum("vllm:num_requests_running")),
            int(snapshot.sum("vllm:num_requests_waiting")),
            float(snapshot.get("vllm:kv_cache_usage_perc") or 0.0),
            int(blocks) if blocks and blocks.isdigit() else None,
        )


@dataclass(frozen=True)
class Decision:
    """Which engine serves one phase of one request, and why."""

    phase: Phase
    engine: str
    policy: Policy
    reason: str
    numbers: dict[str, dict[str, float]] = field(default_factory=dict)  # per engine

    def to_event(self) -> dict[str, Any]:
        """JSON-able fields for a timeline event."""
        return {"phase": self.phase, "engine": self.engine, "policy": self.policy,
                "reason": self.reason, "numbers": self.numbers}


# ---------------------------------------------------------------- prefix index
HashFn = Callable[[Any, tuple[int, ...]], Any]


class _EngineBlocks:
    """One engine's cached blocks: engine hash -> index key, and how often each key is held
    (vLLM may cache one hash in several blocks and stores/removes each of them)."""

    __slots__ = ("key_of", "held")

    def __init__(self) -> None:
        self.key_of: dict[Any, Any] = {}
        self.held: dict[Any, int] = {}


class PrefixIndex:
    """Which prompt prefixes each engine holds in its GPU prefix cache, fed by KV events.

    Args:
        block_size: tokens per block; must be the engines' block size.
        hash_fn: chained block hash (parent key or None, block token ids) -> key.

    Blocks with LoRA or multimodal extra keys, and blocks on other media than the GPU (CPU
    offload), are not indexed: a plain prompt cannot hit them on the GPU.
    """

    def __init__(self, block_size: int = 16, hash_fn: HashFn = hash_block_tokens_fast) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.hash_fn = hash_fn
        self._engines: dict[str, _EngineBlocks] = {}
        self.num_orphans = 0  # stored blocks whose parent the index never saw

    @property
    def engines(self) -> list[str]:
        return list(self._engines)

    def add_engine(self, engine: str) -> None:
        self._engines.setdefault(engine, _EngineBlocks())

    def num_blocks(self, engine: str) -> int:
        """Cached blocks the engine holds (distinct hashes)."""
        e = self._engines.get(engine)
        return len(e.held) if e is not None else 0

    def clear(self, engine: str) -> None:
        self._engines[engine] = _EngineBlocks()

    def apply_batch(self, engine: str, batch: Any) -> None:
        """A decoded KVEventBatch (labkit.telemetry.kv_events) from `engine`."""
        self.apply(engine, batch.events)

    def apply(self, engine: str, events: Iterable[Any]) -> None:
        """BlockStored / BlockRemoved / AllBlocksCleared from `engine`, in order (vLLM's
        msgspec structs or the simulator's dataclasses: they share field names)."""
        blocks = self._engines.setdefault(engine, _EngineBlocks())
        for ev in events:
            kind = type(ev).__name__
            if kind == "BlockStored":
                self._stored(blocks, ev)
            elif kind == "BlockRemoved":
                if getattr(ev, "medium", None) not in (None, "GPU"):
                    continue
                for h in ev.block_hashes:
                    key = blocks.key_of.get(h)
                    if key is None:
                        continue
                    n = blocks.held[key] - 1
                    if n > 0:
                        blocks.held[key] = n
                    else:
                        del blocks.held[key], blocks.key_of[h]
            elif kind == "AllBlocksCleared":
                blocks.key_of.clear()
                blocks.held.clear()

    def _stored(self, blocks: _EngineBlocks, ev: Any) -> None:
        if getattr(ev, "medium", None) not in (None, "GPU"):
            return
        if getattr(ev, "lora_id", None) is not None or any(getattr(ev, "extra_keys", None) or []):
            return
        bs = ev.block_size
        if bs != self.block_size:
            raise ValueError(f"engine block_size {bs} != the index's {self.block_size}")
        parent = None
        if ev.parent_block_hash is not None:
            parent = blocks.key_of.get(ev.parent_block_hash)
            if parent is None:
                self.num_orphans += len(ev.block_hashes)
                return
        tokens = ev.token_ids
        for i, h in enumerate(ev.block_hashes):
            block = tuple(tokens[i * bs:(i + 1) * bs])
            if len(block) < bs:
                break
            key = blocks.key_of.get(h)
            if key is None:
                key = blocks.key_of[h] = self.hash_fn(parent, block)
            blocks.held[key] = blocks.held.get(key, 0) + 1
            parent = key

    def block_keys(self, token_ids: Sequence[int]) -> list[Any]:
        """The chained keys of the prompt's full blocks (vLLM's request block hashes)."""
        bs, fn = self.block_size, self.hash_fn
        keys: list[Any] = []
        parent = None
        for start in range(0, len(token_ids) - bs + 1, bs):
            parent = fn(parent, tuple(token_ids[start:start + bs]))
            keys.append(parent)
        return keys

    def match(self, token_ids: Sequence[int], engines: Iterable[str] | None = None
              ) -> dict[str, int]:
        """Prompt tokens each engine would find in its prefix cache now (vLLM's
        get_computed_blocks: leading blocks, at most (len - 1) // block_size of them)."""
        keys = self.block_keys(token_ids)[: max(len(token_ids) - 1, 0) // self.block_size]
        out: dict[str, int] = {}
        for name in self._engines if engines is None else engines:
            held = self._engines[name].held if name in self._engines else {}
            n = 0
            for k in keys:
                if k not in held:
                    break
                n += 1
            out[name] = n * self.block_size
        return out


# ---------------------------------------------------------------- the router
def _loads(names: Sequence[str], loads: Mapping[str, EngineLoad] | Iterable[EngineLoad] | None
           ) -> dict[str, EngineLoad]:
    if loads is None:
        given: dict[str, EngineLoad] = {}
    elif isinstance(loads, Mapping):
        given = dict(loads)
    else:
        given = {x.engine: x for x in loads}
    return {n: given.get(n) or EngineLoad(n) for n in names}


def _tokens(n: float) -> str:
    return f"{int(n):,}"


class Router:
    """Picks the prefill and the decode engine of each request under a switchable policy.

    Args:
        prefill, decode: engine names (the names the KV events and loads use).
        policy: one of POLICIES; assign `router.policy` to switch live.
        block_size: the engines' block size (the prefix index cuts prompts with it).
        index: a PrefixIndex to share; a new one otherwise (feed it with `index.apply`).
        queue_penalty_tokens: kv-aware prefill: cached tokens one queued request outweighs.
    """

    def __init__(self, prefill: Sequence[str], decode: Sequence[str] = (),
                 policy: Policy = "round-robin", *, block_size: int = 16,
                 index: PrefixIndex | None = None,
                 queue_penalty_tokens: int = DEFAULT_QUEUE_PENALTY_TOKENS) -> None:
        if not prefill:
            raise ValueError("a router needs at least one prefill engine")
        self.prefill = list(prefill)
        self.decode = list(decode)
        self.index = index or PrefixIndex(block_size)
        for name in self.prefill:
            self.index.add_engine(name)
        self.queue_penalty_tokens = queue_penalty_tokens
        self.policy = policy
        self._turn = {"prefill": itertools.count(), "decode": itertools.count()}

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, value: Policy) -> None:
        if value not in POLICIES:
            raise ValueError(f"unknown routing policy {value!r}; one of {list(POLICIES)}")
        self._policy = value

    def _rotation(self, phase: Phase, names: list[str]) -> list[str]:
        """The engines starting with the one whose turn it is (round-robin and tie-breaks)."""
        k = next(self._turn[phase]) % len(names)
        return names[k:] + names[:k]

    def route_prefill(self, token_ids: Sequence[int],
                      loads: Mapping[str, EngineLoad] | Iterable[EngineLoad] | None = None
                      ) -> Decision:
        """The prefill engine for a prompt (its token ids)."""
        names = self.prefill
        order = self._rotation("prefill", names)
        load = _loads(names, loads)
        if self._policy == "round-robin":
            return Decision("prefill", order[0], "round-robin",
                            f"{order[0]}'s turn ({len(names)} prefill engines in rotation)",
                            {n: {"turn": float(order.index(n))} for n in names})
        if self._policy == "least-loaded":
            return self._least_loaded("prefill", order, load)
        hits = self.index.match(token_ids, names)
        pen = self.queue_penalty_tokens
        score = {n: hits[n] - pen * load[n].num_queued for n in names}
        best = max(order, key=lambda n: (score[n], -load[n].num_queued))  # max keeps the first
        numbers = {n: {"hit_tokens": float(hits[n]), "queued": float(load[n].num_queued),
                       "score": float(score[n])} for n in names}
        others = ", ".join(f"{n}: {_tokens(hits[n])}" for n in names if n != best)
        longest = max(hits.values())
        if longest == 0:
            reason = (f"no engine holds a prefix of this prompt; {best} has the fewest "
                      f"requests ({load[best].num_queued})")
        elif hits[best] == longest:
            reason = (f"longest cached prefix: {_tokens(hits[best])} of {_tokens(len(token_ids))} "
                      f"prompt tokens on {best}" + (f" ({others})" if others else ""))
        else:
            top = max(names, key=lambda n: hits[n])
            reason = (f"{top} holds {_tokens(hits[top])} cached tokens but has "
                      f"{load[top].num_queued} requests; {best} ({_tokens(hits[best])} cached, "
                      f"{load[best].num_queued} requests) scores higher at "
                      f"{pen} tokens per queued request")
        return Decision("prefill", best, "kv-aware", reason, numbers)

    def route_decode(self, num_tokens: int,
                     loads: Mapping[str, EngineLoad] | Iterable[EngineLoad] | None = None
                     ) -> Decision:
        """The decode engine for a request that will hold `num_tokens` (prompt + max_tokens)."""
        names = self.decode
        if not names:
            raise ValueError("this router has no decode engines")
        order = self._rotation("decode", names)
        load = _loads(names, loads)
        if self._policy == "round-robin":
            return Decision("decode", order[0], "round-robin",
                            f"{order[0]}'s turn ({len(names)} decode engines in rotation)",
                            {n: {"turn": float(order.index(n))} for n in names})
        if self._policy == "least-loaded":
            return self._least_loaded("decode", order, load)
        need = -(-num_tokens // self.index.block_size)
        free = {n: load[n].num_free_blocks for n in names}
        room = [n for n in order if free[n] is None or free[n] >= need]  # type: ignore[operator]
        numbers = {n: {"queued": float(load[n].num_queued),
                       "free_blocks": float(free[n]) if free[n] is not None else -1.0,
                       "need_blocks": float(need)} for n in names}
        if room:
            best = min(room, key=lambda n: (load[n].num_queued, -(free[n] or 0)))
            reason = (f"{best}: room for {need} blocks, {load[best].num_queued} requests"
                      + (f", {_tokens(free[best])} free blocks" if free[best] is not None else ""))
        else:
            best = max(order, key=lambda n: free[n] or 0)
            reason = (f"no decode engine has {need} free blocks now; {best} has the most "
                      f"({_tokens(free[best] or 0)}), the request waits there")
        return Decision("decode", best, "kv-aware", reason, numbers)

    def _least_loaded(self, phase: Phase, order: list[str], load: dict[str, EngineLoad]
                      ) -> Decision:
        best = min(order, key=lambda n: (load[n].num_queued, load[n].kv_cache_usage))
        b = load[best]
        others = ", ".join(f"{n}: {load[n].num_running}+{load[n].num_waiting}"
                           for n in order if n != best)
        reason = (f"fewest requests: {best} has {b.num_running} running + {b.num_waiting} "
                  f"waiting, KV {b.kv_cache_usage:.0%}" + (f" ({others})" if others else ""))
        numbers = {n: {"running": float(load[n].num_running), "waiting": float(load[n].num_waiting),
                       "kv_cache_usage": float(load[n].kv_cache_usage)} for n in order}
        return Decision(phase, best, "least-loaded", reason, numbers)
