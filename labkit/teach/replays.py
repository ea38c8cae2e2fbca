"""What a real engine did: the shipped recordings of real vLLM runs, read as the notebooks'
tables and views, so a learner checks the simulator's lesson against a real GPU run anywhere.

    real = labkit.replay("real-h200x2-nixl-chunk256", speed=None)
    prefill_chunks(real)                  # per prompt: the chunks the prefill engine scheduled
    request_trace(real, 1081).steps()     # live.Trace's step table, for one recorded prompt
    gpu_memory(real)                      # per GPU: weights, KV, the rest, free; blocks per engine
    view(real, "memory")                  # one dashboard view with the whole recording folded in

Everything reads `replay.recording.frames` (or a fresh Replay of them): the caller's replay
keeps its place. Tables carry kind "replay" and the recording's title ("REPLAY of a real
vLLM run on NVIDIA H200 ×4, recorded ..."), never "REAL vLLM" alone: nothing runs here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from labkit.teach.exercises import Verdict, _close, _verdict, simulated_chunk_steps
from labkit.teach.live import Trace
from labkit.teach.result import Result
from labkit.telemetry.observer_schema import PoolSnapshot
from labkit.telemetry.replay import Replay
from labkit.telemetry.replay import replay as open_replay
from labkit.vocab import GiB  # noqa: F401

ReplayLike = Replay | str | Path


def _open(rp: ReplayLike) -> Replay:
    """A Replay, or the path / shipped name of one."""
    return rp if isinstance(rp, Replay) else open_replay(rp, speed=None)


def _title(rp: Replay) -> str:
    return str(rp.describe()["title"])


def _batches(rp: Replay) -> Iterator[Any]:
    """Every ObserverBatch of the recording, in recorded order."""
    for _, delta in rp.recording.frames:
        yield from delta.observer


def _timeline(rp: Replay) -> list[dict[str, Any]]:
    return [ev for _, delta in rp.recording.frames for ev in delta.timeline]


def _engines(rp: Replay) -> dict[str, dict[str, Any]]:
    """name -> the recorded engine description (role, gpus, num_blocks, block_size), with
    num_blocks as the engine itself reported it (its pool snapshots) where the recording has
    them: the header's figure is the planner's (e.g. 253,995 where vLLM made 255,300)."""
    engines = {e["name"]: dict(e) for e in rp.header.get("source", {}).get("engines", [])}
    pages = {e["name"]: e.get("page_bytes")
             for e in rp.header.get("lab", {}).get("plan", {}).get("engines", [])}
    for name, n in _pool_sizes(rp).items():
        if name in engines:
            engines[name]["planned_blocks"] = engines[name].get("num_blocks")
            engines[name]["num_blocks"] = n
            if pages.get(name):  # one block on one GPU, all its layers: exact arithmetic
                engines[name]["kv_pool_bytes"] = n * int(pages[name])
    return engines


def _pool_sizes(rp: Replay) -> dict[str, int]:
    """engine -> its KV pool's size (blocks) from the observer's PoolSnapshot events."""
    out: dict[str, int] = {}
    for _, delta in rp.recording.frames:
        for batch in delta.observer:
            for ev in batch.events:
                if isinstance(ev, PoolSnapshot):
                    out[batch.engine_id] = int(ev.num_blocks)
    return out


def _prompt_tokens(rp: Replay) -> dict[str, int]:
    """The proxy's id for each request on the engines ("cmpl-pd-<hex>") -> its prompt tokens."""
    out: dict[str, int] = {}
    for ev in _timeline(rp):
        if "prompt_tokens" in ev:
            for key in ("prefill_id", "decode_id"):
                if ev.get(key):
                    out[str(ev[key])] = int(ev["prompt_tokens"])
    return out


def _belongs(engine_req: str, proxy_id: str) -> bool:
    """An engine's id for a proxy request is the proxy's id + "-<prompt index>"
    (vllm/entrypoints/openai/completion/serving.py) + "-<8 random chars>"
    (vllm/v1/engine/input_processor.py): match on that prefix."""
    return engine_req == proxy_id or engine_req.startswith(proxy_id + "-")


def _lookup(engine_req: str, prompts: dict[str, int]) -> int | None:
    """The prompt tokens of an engine's request id, from the proxy's timeline."""
    return next((n for p, n in prompts.items() if _belongs(engine_req, p)), None)


@dataclass
class PrefillRecord:
    """How one prompt was prefilled on one engine."""

    engine: str
    req_id: str
    prompt_tokens: int
    cached_tokens: int  # computed before its first step: prefix-cache hits (or KV received)
    chunks: list[int]  # prompt tokens scheduled per step, in order
    steps: list[int]  # the engine's step numbers


def prefill_records(replay: ReplayLike, role: str = "prefill") -> list[PrefillRecord]:
    """Per prompt on each engine of `role`: the chunk each step scheduled until the prompt
    was computed. The observer reports num_computed_tokens on a request's first step only
    (labkit/pd/observer.py; and on a resume, sent as a new request under Model Runner V2),
    so later steps add up what was scheduled (no request is preempted in the shipped
    recordings; a preempted one's recompute is not counted again)."""
    rp = _open(replay)
    engines = {n for n, e in _engines(rp).items() if e.get("role") == role}
    prompts = _prompt_tokens(rp)
    records: dict[tuple[str, str], PrefillRecord] = {}
    for b in _batches(rp):
        if b.engine_id not in engines:
            continue
        for e in b.events:
            if type(e).__name__ != "StepScheduled":
                continue
            for rid, n in e.num_scheduled_tokens.items():
                rec = records.get((b.engine_id, rid))
                if rec is None:
                    prompt = _lookup(rid, prompts)
                    cached = int(e.num_computed_tokens.get(rid, 0))
                    rec = PrefillRecord(b.engine_id, rid, prompt or 0, cached, [], [])
                    records[(b.engine_id, rid)] = rec
                done = rec.cached_tokens + sum(rec.chunks)
                if rec.prompt_tokens and done >= rec.prompt_tokens:
                    continue  # a decode token of a colocated engine
                rec.chunks.append(min(n, rec.prompt_tokens - done) if rec.prompt_tokens else n)
                rec.steps.append(e.step)
    for rec in records.values():
        rec.prompt_tokens = rec.prompt_tokens or rec.cached_tokens + sum(rec.chunks)
    return list(records.values())


def _chunk_text(chunks: list[int]) -> str:
    """[256, 256, 256, 57] -> '256 ×3, 57'."""
    out: list[str] = []
    i = 0
    while i < len(chunks):
        j = i
        while j < len(chunks) and chunks[j] == chunks[i]:
            j += 1
        out.append(f"{chunks[i]} ×{j - i}" if j - i > 1 else str(chunks[i]))
        i = j
    return ", ".join(out)


def token_budgets(replay: ReplayLike, role: str = "prefill") -> set[int]:
    """The token budgets (max_num_batched_tokens) the engines of `role` stepped with."""
    rp = _open(replay)
    engines = {n for n, e in _engines(rp).items() if e.get("role") == role}
    return {
        e.token_budget
        for b in _batches(rp)
        if b.engine_id in engines
        for e in b.events
        if type(e).__name__ == "StepScheduled"
    }


def prefill_chunks(replay: ReplayLike, role: str = "prefill") -> Result:
    """One row per prompt: its tokens, prefix-cache hits, and the chunk of each step."""
    rp = _open(replay)
    rows = [
        {
            "engine": r.engine,
            "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens,
            "prefill_steps": len(r.chunks),
            "chunks": _chunk_text(r.chunks),
            "largest_chunk": max(r.chunks, default=0),
        }
        for r in prefill_records(rp, role)
    ]
    budgets = ", ".join(str(b) for b in sorted(token_budgets(rp, role)))
    return Result(
        f"prefill chunks per prompt: {_title(rp)}",
        "replay",
        rows,
        note=f"token budget per step (max_num_batched_tokens): {budgets}; "
        "cached_tokens: prefix-cache hits, not computed again",
    )


def prefill_steps(replay: ReplayLike, prompt_tokens: int, role: str = "prefill") -> list[int]:
    """The chunks of the first recorded prompt of `prompt_tokens` tokens."""
    for r in prefill_records(replay, role):
        if r.prompt_tokens == prompt_tokens:
            return list(r.chunks)
    raise ValueError(f"no {prompt_tokens}-token prompt on a {role} engine in this recording")


def _request_ids(e: Any) -> list[str]:
    name = type(e).__name__
    if name == "StepScheduled":
        return list(e.num_scheduled_tokens)
    if name == "LayerTiming":
        return list(e.req_ids)
    rid = getattr(e, "req_id", None)
    return [rid] if rid else []


# ---- one request, as live.Trace shows it --------------------------------------------------
@dataclass
class ReplayTrace(Trace):
    """A live.Trace cut out of a recording: the same tables, labelled as a replay."""

    origin: str = ""

    def _relabel(self, r: Result) -> Result:
        return Result(f"{r.title} ({self.origin})", "replay", r.rows, r.note, r.extra)

    def steps(self) -> Result:
        return self._relabel(super().steps())

    def transfers(self) -> Result:
        return self._relabel(super().transfers())

    def allocations(self) -> Result:
        return self._relabel(super().allocations())

    def timeline(self) -> Result:
        return self._relabel(super().timeline())


def request_trace(
    replay: ReplayLike, prompt_tokens: int, *, engine: str | None = None
) -> ReplayTrace:
    """The first recorded request of `prompt_tokens` tokens, as `live.send` would have traced
    it: its steps (whole steps: other requests' tokens in them count too), allocations,
    transfers and proxy timeline. `engine`: keep one engine's events only ("prefill")."""
    rp = _open(replay)
    prompts = _prompt_tokens(rp)
    proxy_id = next((p for p, n in prompts.items() if n == prompt_tokens), None)
    if proxy_id is None:
        raise ValueError(f"no {prompt_tokens}-token request in this recording")
    events = [ev for ev in _timeline(rp) if proxy_id in (ev.get("prefill_id"), ev.get("decode_id"))]
    proxy_req = events[0]["req_id"] if events else None
    cached = {r.req_id: r.cached_tokens for r in prefill_records(rp, "prefill")}
    cached |= {r.req_id: r.cached_tokens for r in prefill_records(rp, "decode")}
    done: dict[str, int] = {}
    observer = []
    for b in _batches(rp):
        if engine is not None and b.engine_id != engine:
            continue
        kept = []
        for e in b.events:
            rid = next((r for r in _request_ids(e) if _belongs(r, proxy_id)), None)
            if rid is None:
                continue
            if type(e).__name__ == "StepScheduled":
                # computed before this step = cached + scheduled so far (see prefill_records)
                before = done.setdefault(rid, cached.get(rid, 0))
                e = msgspec.structs.replace(
                    e, num_computed_tokens={**e.num_computed_tokens, rid: before}
                )
                done[rid] = before + e.num_scheduled_tokens[rid]
            kept.append(e)
        if kept:
            observer.append(msgspec.structs.replace(b, events=kept))
    events = [ev for ev in _timeline(rp) if ev.get("req_id") == proxy_req]
    return ReplayTrace(
        "replay", prompt_tokens, {}, observer, events, rp.describe(), origin=_title(rp)
    )


# ---- memory per GPU --------------------------------------------------------------------------
def _memory_state(rp: Replay) -> Any:
    """The dashboard's MemoryState with every sample of the recording folded in."""
    from labkit.viz.state import MemoryState

    st = MemoryState()
    for _, delta in rp.recording.frames:
        for m in delta.engine_memory:
            st.apply_engine_memory(m)
        for s in delta.gpu_samples:
            st.apply_sample(s)
    return st


def gpu_memory(replay: ReplayLike) -> Result:
    """One row per (GPU, engine on it), at the last NVML sample: weights and KV (the engine's
    log), the rest of its process (NVML), free; the engine's KV blocks and its rank there."""
    rp = _open(replay)
    st = _memory_state(rp)
    engines = _engines(rp)
    rows = []
    for gpu in sorted(st.latest):
        s = st.latest[gpu]
        parts: dict[str, dict[str, int]] = defaultdict(dict)
        for eng, cat, b in st.breakdown(gpu):
            parts[eng][cat] = b
        for eng, cats in sorted(parts.items()):
            if not eng:
                continue
            e = engines.get(eng, {})
            gpus = list(e.get("gpus", []))
            rows.append(
                {
                    "gpu": gpu,
                    "physical": s.physical if s.physical is not None else gpu,
                    "engine": eng,
                    "rank": gpus.index(gpu) if gpu in gpus else "-",
                    "weights_GiB": cats.get("weights", 0) / GiB,
                    # the engine's pool (its blocks x page bytes) where the recording has
                    # its pool snapshots; else the recorded figure
                    "kv_GiB": e.get("kv_pool_bytes", cats.get("KV cache", 0)) / GiB,
                    "engine_other_GiB": cats.get("engine other", 0) / GiB,
                    "gpu_free_GiB": parts[""].get("free", 0) / GiB,
                    "engine_blocks": int(e.get("num_blocks", 0)),
                    "planned_blocks": int(e.get("planned_blocks") or e.get("num_blocks", 0)),
                    "block_size": int(e.get("block_size", 16)),
                }
            )
    return Result(
        f"memory per GPU: {_title(rp)}",
        "replay",
        rows,
        note="KV: the engine's own pool (its blocks x page bytes); weights: as recorded; "
        "engine_other: the rest of its process "
        "(NVML): activations, CUDA context; engine_blocks: the whole engine's KV blocks as vLLM "
        "made them (planned_blocks: labkit's plan)",
    )


def kv_bytes_per_token(replay: ReplayLike, engine: str) -> int:
    """KV bytes ONE GPU of `engine` stores per token: the KV memory its log reported on one
    GPU / the engine's tokens (num_blocks x block_size). vLLM sizes num_blocks = KV memory //
    page bytes (vllm/v1/core/kv_cache_utils.py), so this rounds to the exact figure."""
    rp = _open(replay)
    e = _engines(rp)[engine]
    kv = e.get("kv_pool_bytes") or next(
        (m.kv_bytes for _, d in rp.recording.frames for m in d.engine_memory if m.engine == engine),
        None,
    )
    if kv is None:
        raise ValueError(f"no memory recorded for engine {engine!r}")
    return round(kv / (int(e["num_blocks"]) * int(e["block_size"])))


def view(replay: ReplayLike, name: str = "memory") -> Any:
    """One dashboard view ("memory", "schedule", "streaming", "blocks", "latency") with the
    whole recording folded in; its figure is titled as a replay."""
    from labkit.viz.dashboard import Dashboard

    rp = Replay(_open(replay).recording, speed=None)  # a fresh cursor: the caller's stays put
    dash = Dashboard(rp)
    for delta in rp:
        dash.fold(delta)
    v = dash.views[name]
    v.update()
    return v.figure


# ---- exercises -------------------------------------------------------------------------------
def check_prefill_steps(
    replay: ReplayLike, prompt_tokens: int, answer: Any, *, reveal: bool = False
) -> Verdict:
    """Prefill steps the recorded engine took for its `prompt_tokens`-token prompt."""
    rp = _open(replay)
    chunks = prefill_steps(rp, prompt_tokens)
    budget = max(token_budgets(rp))
    ok = _verdict(
        answer,
        len(chunks),
        _close(answer, len(chunks), 0),
        f"prefill steps of the {prompt_tokens}-token prompt in the replay",
        f"each step schedules at most {budget} tokens (the chunk); round up",
        reveal,
    )
    if ok or reveal:
        sim = simulated_chunk_steps(prompt_tokens, budget)
        print(f"   the real engine's chunks: {_chunk_text(chunks)}; "
              f"the simulator's scheduler, alone: {_chunk_text(sim)}")  # fmt: skip
    return ok


def check_kv_bytes_per_token(
    replay: ReplayLike, engine: str, answer: Any, *, reveal: bool = False
) -> Verdict:
    """KV bytes per token ONE GPU of the recorded `engine` stores (within 1 %)."""
    from labkit.models import get_model

    rp = _open(replay)
    expected = kv_bytes_per_token(rp, engine)
    ok = _verdict(
        answer,
        expected,
        _close(answer, expected, 0.01),
        f"KV bytes per token on one GPU of {engine}",
        "KV GiB on one of its GPUs x 2**30 / (the engine's blocks x block_size)",
        reveal,
    )
    if ok or reveal:
        plan = rp.header.get("lab", {}).get("plan", {})
        ep = next((e for e in plan.get("engines", []) if e.get("name") == engine), None)
        if ep is not None:
            tp = int(ep["config"]["tp"])
            whole = get_model(ep["config"]["model"]).kv_bytes_per_token(ep["kv_cache_dtype"])
            print(f"   the whole model needs {whole:,} B per token; TP={tp} keeps 1/{tp} "
                  f"of the KV heads on each GPU")  # fmt: skip
    return ok
