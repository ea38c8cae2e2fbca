"""Replay recorded scheduler traces through the simulator and compare step for step.

    python -m labkit.bench.conformance TRACE.lkrec [TRACE ...] [--json OUT]

A trace is a labkit recording (.lkrec) with observer events (labkit/pd/observer.py, or the
simulator's own). For each engine in it: the engine's settings (EngineSettings, else the
recording header's lab config and the PoolSnapshot's pool size), its requests (RequestAdded:
prompt token ids, max_tokens, the step they entered the scheduler; else inferred from the
steps) and its StepScheduled events. The simulator replays the requests with the same
settings, each added before the step it entered the real scheduler, and the table says, over
the steps that scheduled tokens or preempted (in order):

- steps equal: same scheduled tokens, new block ids and preemptions;
- scheduled tokens: same {request: tokens};
- block ids: of the real allocations (request, step), the share the simulator gave the same ids;
- free counts: same free blocks after scheduling (recordings with StepScheduled.num_free);
- preempt/resume steps: same (step, request) preemptions and resumptions;
- prefix hits: same num_computed_tokens for newly scheduled requests;

and the first differing step, both sides. External KV (a PD decode engine) is replayed from
what the trace shows: a load that landed (KVTransfer recv) before the request's first step
after its blocks were allocated steps earlier is asynchronous (WAITING_FOR_REMOTE_KVS), its
local prefix hits being the tokens the read did not bring; any other load is synchronous. A
NIXL prefill's held blocks are freed before the first step after the recorded send ended, in
the order the sends were recorded (docs/conformance.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from labkit.engines.sim.connector import ObserverConnector
from labkit.engines.sim.engine import SimEngine
from labkit.telemetry import observer_schema as obs


@dataclass
class Step:
    """One scheduler step as both sides report it."""

    index: int
    num_scheduled_tokens: dict[str, int]
    new_block_ids: dict[str, list[int]]
    num_computed_tokens: dict[str, int]
    preempted: list[str]
    num_free: int | None = None


@dataclass
class EngineTrace:
    name: str
    kind: str
    settings: dict[str, Any]
    steps: list[Step]
    requests: dict[str, dict[str, Any]]  # req_id -> prompt_token_ids, max_tokens, at, external
    sends_done: dict[int, list[str]] = field(default_factory=dict)  # step index -> req ids
    aborts: dict[int, list[str]] = field(default_factory=dict)  # step index -> req ids aborted before it
    # steps scheduled before the previous step's output was processed (a request arrived while
    # that step ran, so the engine did not wait for it)
    overlapped: set[int] = field(default_factory=set)


def _published(ev: obs.StepScheduled) -> bool:
    return bool(ev.num_scheduled_tokens) or bool(ev.preempted)


def load_traces(path: str) -> list[EngineTrace]:
    """One EngineTrace per scheduler (not per worker rank) in the recording."""
    from labkit.telemetry.recording import read_recording

    rec = read_recording(path)
    per: dict[str, dict[str, Any]] = {}
    for _, delta in rec.frames:
        for batch in delta.observer:
            if "/rank" in batch.engine_id:
                continue
            e = per.setdefault(batch.engine_id, {"kind": batch.kind, "role": batch.role, "events": []})
            e["events"].extend(batch.events)
    lab = rec.header.get("lab") or {}
    cfg = (lab.get("config") or {}) if isinstance(lab, dict) else {}
    plan_engines = {p.get("name"): p for p in ((lab.get("plan") or {}).get("engines") or [])} if cfg else {}
    traces = []
    for name, e in per.items():
        events = e["events"]
        steps_ev = sorted((ev for ev in events if isinstance(ev, obs.StepScheduled)), key=lambda x: x.step)
        published = [ev for ev in steps_ev if _published(ev)]
        if not published:
            continue
        settings = _settings(events, _engine_cfg(cfg, name, e["role"]),
                             plan_engines.get(name) or plan_engines.get(e["role"]) or {}, cfg)
        steps = [Step(i, dict(ev.num_scheduled_tokens), {k: list(v) for k, v in ev.new_block_ids.items()},
                      dict(ev.num_computed_tokens), sorted(ev.preempted), ev.num_free)
                 for i, ev in enumerate(published)]
        requests = _requests(events, published)
        sends = _sends_done(events, published)
        aborts, overlapped = _aborts_and_overlaps(events, published, requests)
        traces.append(EngineTrace(name, e["kind"], settings, steps, requests, sends, aborts, overlapped))
    return traces


def _engine_cfg(cfg: dict[str, Any], name: str, role: str) -> dict[str, Any]:
    """The header's config of one engine: by role or name ("prefill", "decode"), the
    prefill side's for a single colocated engine (role "both", named "colocated"). The
    header's other fields are not engine configs (`colocated` is a boolean, `connector`
    a string), so only dicts count."""
    for key in (role, name):
        if isinstance(cfg.get(key), dict):
            return cfg[key]
    if role == "both" or cfg.get("colocated") is True:
        return cfg["prefill"] if isinstance(cfg.get("prefill"), dict) else {}
    return {}


def _settings(events: list[Any], cfg: dict[str, Any], plan: dict[str, Any], lab_cfg: dict[str, Any]) -> dict[str, Any]:
    es = next((ev for ev in events if isinstance(ev, obs.EngineSettings)), None)
    if es is not None:
        s = {f: getattr(es, f) for f in es.__struct_fields__ if f != "ts"}
        s["source"] = "EngineSettings"
        s.setdefault("connector", "observer")
        return s
    snap = next((ev for ev in events if isinstance(ev, obs.PoolSnapshot)), None)
    budget = next((ev.token_budget for ev in events if isinstance(ev, obs.StepScheduled)), 8192)
    return {
        "num_gpu_blocks": snap.num_blocks if snap is not None else 100_000,
        "block_size": int(cfg.get("block_size") or 16),
        "max_num_batched_tokens": int(cfg.get("max_num_batched_tokens") or budget),
        "max_num_seqs": int(cfg.get("max_num_seqs") or 256),
        "max_model_len": int(plan.get("max_model_len") or cfg.get("max_model_len") or 8192),
        "async_scheduling": True,  # vLLM 0.26's default; older recordings do not say
        "enable_chunked_prefill": bool(cfg.get("enable_chunked_prefill", True)),
        "enable_prefix_caching": bool(cfg.get("enable_prefix_caching", True)),
        "long_prefill_token_threshold": 0,
        "connector": "observer",  # every recorded engine ran the observer (kv_both)
        "source": "recording header" + (" + PoolSnapshot" if snap is not None else ""),
    }


def _requests(events: list[Any], published: list[obs.StepScheduled]) -> dict[str, dict[str, Any]]:
    """Per request: prompt, max_tokens, the published-step index it enters before, and where
    its first computed tokens came from: `local_hits` (prefix cache) and `external` (the
    connector), loaded synchronously or asynchronously (`load_async`)."""
    index_of_step = {ev.step: i for i, ev in enumerate(published)}
    added = {ev.req_id: ev for ev in events if isinstance(ev, obs.RequestAdded)}
    allocated: dict[str, int] = {}
    alloc_at: dict[str, int] = {}
    for ev in events:
        if isinstance(ev, obs.RequestAllocated) and ev.req_id not in allocated:
            allocated[ev.req_id] = ev.num_external_tokens
            alloc_at[ev.req_id] = next((j for j, st in enumerate(published) if st.ts >= ev.ts), len(published))
    recv = {ev.req_id: ev for ev in events if isinstance(ev, obs.KVTransfer) and ev.direction == "recv"}
    first: dict[str, int] = {}
    computed0: dict[str, int] = {}
    prefill: dict[str, int] = {}
    decode: dict[str, int] = {}
    tables: dict[str, list[int]] = {}
    for i, ev in enumerate(published):
        for rid, ids in ev.new_block_ids.items():
            tables.setdefault(rid, []).extend(ids)
        for rid, n in ev.num_scheduled_tokens.items():
            if rid not in first:
                first[rid] = i
                computed0[rid] = ev.num_computed_tokens.get(rid, 0)
            if n > 1 or i == first[rid] or decode.get(rid, 0) == 0 and rid not in prefill:
                prefill[rid] = prefill.get(rid, 0) + n
            else:
                decode[rid] = decode.get(rid, 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for rid in first:
        a = added.get(rid)
        prompt_len = len(a.prompt_token_ids) if a is not None else computed0[rid] + prefill.get(rid, 0)
        waited = alloc_at.get(rid, first[rid]) < first[rid]  # allocated steps before it ran
        ext, local, is_async = _kv_sources(allocated.get(rid, 0), recv.get(rid), waited, computed0[rid],
                                           prompt_len, published[first[rid]].ts)
        # replayed as an asynchronous load only when it spans published steps (else synchronous:
        # the same step, blocks and computed tokens)
        is_async = is_async and waited
        r = {"at": alloc_at[rid] if is_async else first[rid], "load_async": is_async, "first": first[rid],
             "external": ext, "local_hits": local}
        if a is not None:
            at = min((index_of_step[s] for s in index_of_step if s >= a.step), default=first[rid])
            out[rid] = {**r, "prompt_token_ids": list(a.prompt_token_ids), "max_tokens": a.max_tokens,
                        "at": min(at, r["at"]), "inferred": False}
        else:
            out[rid] = {**r, "prompt_len": prompt_len, "max_tokens": decode.get(rid, 0) + 1, "inferred": True,
                        "block_ids": tables.get(rid, [])}
    _synthesize_prompts(out)
    return out


def _kv_sources(allocated: int, recv: obs.KVTransfer | None, waited: bool, computed: int,
                prompt_len: int, first_ts: float) -> tuple[int, int, bool]:
    """(external tokens, local prefix hits, loaded asynchronously) of a request's first step.

    A synchronous load (ExampleConnector) lands in the step that schedules the request:
    computed = local hits + external. An asynchronous one (NIXL: WAITING_FOR_REMOTE_KVS)
    ended in a KVTransfer recv before that step (or, if the recv is missing, the blocks were
    allocated steps earlier: `waited`). NIXL reads the rest of the prompt after the hits
    (nixl/pull_scheduler.py `get_num_new_matched_tokens`), and vLLM 0.26 computes hits +
    loaded, one short on a full prompt (scheduler.py `_update_waiting_for_remote_kv`), so the
    hits are what the read did not bring: held - loaded. The recv's num_tokens is what was
    read; RequestAllocated's count is the fallback."""
    landed = recv is not None and recv.end <= first_ts and recv.num_tokens > 0
    loaded = recv.num_tokens if landed and recv is not None else allocated
    if loaded > 0 and (landed or waited):
        held = prompt_len if computed == prompt_len - 1 else computed
        ext = min(loaded, held)
        return ext, held - ext, True
    ext = min(allocated, computed)
    return ext, computed - ext, False


def _synthesize_prompts(reqs: dict[str, dict[str, Any]], block_size: int = 16) -> None:
    """Inferred requests get unique tokens, except a local prefix hit, which copies the prefix
    of the earlier request whose block table starts with the hit blocks (the blocks say which
    request it shared with; the tokens are not recorded)."""
    seen: list[tuple[list[int], list[int]]] = []  # (tokens, block ids)
    base = 1
    for rid in sorted(reqs, key=lambda r: reqs[r]["at"]):
        r = reqs[rid]
        if not r["inferred"]:
            seen.append((r["prompt_token_ids"], []))
            continue
        n, hits, ids = r["prompt_len"], r["local_hits"], r["block_ids"]
        tokens = list(range(base, base + n))
        base += n
        if hits:
            k = hits // block_size
            src = next((t for t, b in reversed(seen) if len(t) > hits and b[:k] == ids[:k]), None)
            if src is None:
                src = next((t for t, _ in reversed(seen) if len(t) > hits), None)
            if src is not None:
                tokens[:hits] = src[:hits]
        r["prompt_token_ids"] = tokens
        seen.append((tokens, ids))


def _sends_done(events: list[Any], published: list[obs.StepScheduled]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for ev in events:
        if isinstance(ev, obs.KVTransfer) and ev.direction == "send":
            i = next((j for j, st in enumerate(published) if st.ts >= ev.end), None)
            if i is not None:
                out.setdefault(i, []).append(ev.req_id)
    return out


def _aborts_and_overlaps(events: list[Any], published: list[obs.StepScheduled],
                         requests: dict[str, dict[str, Any]]) -> tuple[dict[int, list[str]], set[int]]:
    """Aborts and overlapped steps, from when each RequestFinished was emitted.

    A request the trace knows (RequestAdded) that finished before it computed its prompt and
    max_tokens - 1 outputs was aborted (Scheduler.finish_requests, FINISHED_ABORTED): it is
    aborted in the replay before the first step scheduled after its RequestFinished. A
    request that finished normally in step i-1 but whose RequestFinished came after step i
    was scheduled says step i was scheduled before step i-1's output was processed (with
    async scheduling the engine core schedules the next step first when there is work; a
    request that arrived during step i-1 is that work)."""
    finished = {ev.req_id: ev.ts for ev in events if isinstance(ev, obs.RequestFinished)}
    total: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, st in enumerate(published):
        for rid, n in st.num_scheduled_tokens.items():
            total[rid] = total.get(rid, 0) + n
            last[rid] = i
    aborts: dict[int, list[str]] = {}
    overlapped: set[int] = set()
    for rid, ts in finished.items():
        r = requests.get(rid)
        if r is None or r.get("inferred"):
            continue
        j = next((k for k, st in enumerate(published) if st.ts > ts), None)
        done = r["local_hits"] + r["external"] + total.get(rid, 0)
        if done < len(r["prompt_token_ids"]) + max(1, r["max_tokens"]) - 1:
            if j is not None:
                aborts.setdefault(j, []).append(rid)
        elif j is not None and rid in last and j > last[rid] + 1:
            overlapped.add(last[rid] + 1)
    return aborts, overlapped


class ReplayConnector(ObserverConnector):
    """The observer, plus the external tokens the trace shows, loaded synchronously."""

    name = "replay"

    def __init__(self, *args: Any, external: dict[str, int], load_async: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.external = external
        self.load_async = load_async
        self.held: set[str] = set()

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        rid = request.request_id
        ext = self.external.get(rid, 0) - num_computed_tokens
        if rid in self.load_async and ext > 0:
            return min(ext, request.num_tokens - num_computed_tokens), True
        return (max(0, min(ext, request.num_tokens - 1 - num_computed_tokens)), False)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if request.request_id in self.held and block_ids:
            return True, None  # a NIXL prefill keeps its blocks until decode read them
        return False, None


def replay(trace: EngineTrace, model: str = "lab-1b", gpu: str = "h100") -> list[Step]:
    """The simulator's steps for the trace's requests and settings."""
    s = trace.settings
    # where the connector's tokens end (local hits + external), as get_num_new_matched_tokens sees it
    external = {rid: r["local_hits"] + r["external"] for rid, r in trace.requests.items() if r["external"]}
    load_async = {rid for rid, r in trace.requests.items() if r.get("load_async")}
    conn = ReplayConnector("replay", s["block_size"], 1, None,  # type: ignore[arg-type]
                           external=external, load_async=load_async)
    loads_done: dict[int, set[str]] = {}
    for rid in load_async:
        loads_done.setdefault(trace.requests[rid]["first"], set()).add(rid)
    conn.held = {rid for sends in trace.sends_done.values() for rid in sends}
    eng = SimEngine(model, gpu, block_size=s["block_size"], max_num_batched_tokens=s["max_num_batched_tokens"],
                    max_num_seqs=s["max_num_seqs"], max_model_len=s["max_model_len"],
                    num_gpu_blocks=s["num_gpu_blocks"], enable_prefix_caching=s["enable_prefix_caching"],
                    enable_chunked_prefill=s["enable_chunked_prefill"],
                    long_prefill_token_threshold=s.get("long_prefill_token_threshold", 0),
                    async_scheduling=s["async_scheduling"], connector=conn)
    by_at: dict[int, list[str]] = {}
    for rid, r in trace.requests.items():
        by_at.setdefault(r["at"], []).append(rid)
    out: list[Step] = []
    added: set[str] = set()

    def add(rid: str, admit_after: float | None = None) -> None:
        r = trace.requests[rid]
        eng.add_request(rid, r["prompt_token_ids"], max(1, r["max_tokens"]), admit_after=admit_after)
        added.add(rid)

    for i in range(len(trace.steps)):
        for rid in by_at.get(i, ()):
            if rid not in added:
                add(rid)
        eng.admit_pending()
        for rid in trace.aborts.get(i, ()):
            eng.abort(rid)
        if i + 1 in trace.overlapped:  # step i+1's requests arrive while step i runs
            for rid in by_at.get(i + 1, ()):
                add(rid, admit_after=float("inf"))  # admitted at step i+1 (admit_pending)
        if loads_done.get(i):  # the read landed before this step was scheduled
            eng.scheduler.update_from_kv_xfer_finished(set(), loads_done[i])
        if trace.sends_done.get(i):  # in the recorded order: vLLM frees in finished_sending's
            # iteration order, the order the observer emitted the sends in
            eng.scheduler.update_from_kv_xfer_finished(trace.sends_done[i], set())  # type: ignore[arg-type]
        so = None
        for _ in range(8):  # empty steps (nothing schedulable yet) do not count
            so = eng.step().scheduler_output
            if so.total_num_scheduled_tokens or so.preempted_req_ids:
                break
        assert so is not None
        new_ids = {r.req_id: list(r.block_ids[0]) for r in so.scheduled_new_reqs}
        cached = so.scheduled_cached_reqs
        for rid, nb in zip(cached.req_ids, cached.new_block_ids, strict=False):
            if nb is not None and nb[0]:
                new_ids[rid] = list(nb[0])
        out.append(Step(i, dict(so.num_scheduled_tokens), new_ids,
                        {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs},
                        sorted(so.preempted_req_ids), so.num_free_blocks))
    return out


def _preempt_resume(steps: list[Step]) -> set[tuple[int, str, str]]:
    out, preempted = set(), set()
    for st in steps:
        for rid in st.num_scheduled_tokens:
            if rid in preempted:
                out.add((st.index, rid, "resume"))
                preempted.discard(rid)
        for rid in st.preempted:
            out.add((st.index, rid, "preempt"))
            preempted.add(rid)
    return out


def compare(real: list[Step], sim: list[Step]) -> dict[str, Any]:
    """Shares of equal steps, tokens, block ids, free counts, preemptions and prefix hits."""
    n = len(real)
    steps_eq = tokens_eq = free_eq = free_n = 0
    blocks_eq = blocks_n = hits_eq = hits_n = 0
    first_diff = None
    for r, s in zip(real, sim, strict=False):
        t_eq = r.num_scheduled_tokens == s.num_scheduled_tokens
        b_eq = r.new_block_ids == s.new_block_ids
        tokens_eq += t_eq
        for rid, ids in r.new_block_ids.items():
            blocks_n += 1
            blocks_eq += s.new_block_ids.get(rid) == ids
        for rid, c in r.num_computed_tokens.items():
            hits_n += 1
            hits_eq += s.num_computed_tokens.get(rid) == c
        if r.num_free is not None:
            free_n += 1
            free_eq += r.num_free == s.num_free
        same = t_eq and b_eq and r.preempted == s.preempted and (r.num_free is None or r.num_free == s.num_free)
        steps_eq += same
        if not same and first_diff is None:
            first_diff = {"step": r.index, "real": r.__dict__, "sim": s.__dict__}
    pr_real, pr_sim = _preempt_resume(real), _preempt_resume(sim)
    pr_all = pr_real | pr_sim

    def pct(a: int, b: int) -> float | None:
        return 100.0 * a / b if b else None

    return {
        "steps": n, "steps_equal": pct(steps_eq, n), "scheduled_tokens_equal": pct(tokens_eq, n),
        "block_ids_equal": pct(blocks_eq, blocks_n), "free_counts_equal": pct(free_eq, free_n),
        "preempt_resume_equal": pct(len(pr_real & pr_sim), len(pr_all)) if pr_all else 100.0,
        "num_preempt_resume": len(pr_real), "prefix_hits_equal": pct(hits_eq, hits_n),
        "first_diff": first_diff,
    }


def check(path: str) -> list[tuple[EngineTrace, dict[str, Any]]]:
    return [(t, compare(t.steps, replay(t))) for t in load_traces(path)]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} %"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.bench.conformance", description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    rows = []
    cols = ("steps_equal", "scheduled_tokens_equal", "block_ids_equal", "free_counts_equal",
            "preempt_resume_equal", "prefix_hits_equal")
    for path in args.traces:
        for trace, res in check(path):
            print(f"\n{path} :: {trace.name} ({trace.kind}; settings from {trace.settings.get('source')}; "
                  f"{trace.settings['num_gpu_blocks']} blocks, chunk {trace.settings['max_num_batched_tokens']}, "
                  f"async {trace.settings['async_scheduling']})")
            print(f"  {'steps':<24}{res['steps']}")
            for c in cols:
                print(f"  {c.replace('_', ' '):<24}{_fmt(res[c])}")
            print(f"  {'preemptions+resumes':<24}{res['num_preempt_resume']}")
            d = res["first_diff"]
            if d:
                print(f"  first difference at step {d['step']}:\n    real {d['real']}\n    sim  {d['sim']}")
            rows.append({"trace": path, "engine": trace.name, **{k: v for k, v in res.items()}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
