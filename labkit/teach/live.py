"""What a running Lab did with one request, as tables: the same calls show real vLLM on a
GPU machine and the simulator elsewhere (every table is labelled with the lab's kind).

    trace = send(lab, prompt_len=600, max_tokens=8)
    trace.steps()       # one row per engine step: tokens scheduled, blocks allocated
    trace.transfers()   # KV moved prefill -> decode: tokens, bytes, milliseconds
    trace.timeline()    # the proxy's timeline of the request
    trace.phases()      # the proxy's wait for decode, part by part (one story with the above)
    trace.block_map()   # the dashboard's block-map view, folded from the same events

The events come from labkit's observer (a KV connector inside vLLM, or the simulator's
scheduler hooks) and the PD proxy, through `lab.telemetry()`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from labkit.teach.result import Result


def token_prompt(num_tokens: int, seed: int = 0) -> list[int]:
    """A prompt of exactly `num_tokens` token ids (random, inside every preset's vocab)."""
    rng = random.Random(seed)
    return [rng.randrange(100, 30000) for _ in range(num_tokens)]


def _ids(ids: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (block maps stay readable)."""
    out, start = [], None
    for i, b in enumerate(ids):
        if start is None:
            start = b
        if i + 1 == len(ids) or ids[i + 1] != b + 1:
            out.append(f"{start}" if start == b else f"{start}-{b}")
            start = None
    return ", ".join(out)


@dataclass
class Trace:
    """Everything the lab's telemetry said while one request ran."""

    kind: str
    prompt_len: int
    response: dict[str, Any]
    observer: list[Any] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # the proxy's timeline
    describe: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def _events(self, name: str) -> list[tuple[Any, Any]]:
        return [(b, e) for b in self.observer for e in b.events if type(e).__name__ == name]

    def steps(self) -> Result:
        """One row per engine step that scheduled tokens."""
        rows = []
        t0 = min((e.ts for _, e in self._events("StepScheduled")), default=0.0)
        done: dict[tuple[str, str], int] = {}  # (engine, request) -> tokens computed so far
        for b, e in self._events("StepScheduled"):
            if not e.num_scheduled_tokens:
                continue
            before = computed_before(b.engine_id, e, done)
            new = [x for ids in e.new_block_ids.values() for x in ids]
            rows.append(
                {
                    "engine": b.engine_id,
                    "step": e.step,
                    "ms": (e.ts - t0) * 1e3,
                    "tokens_scheduled": sum(e.num_scheduled_tokens.values()),
                    "token_budget": e.token_budget,
                    "computed_before": sum(before.values()),
                    "new_blocks": len(new),
                    "new_block_ids": _ids(new),
                }
            )
        return Result(
            f"engine steps for one {self.prompt_len}-token prompt",
            self.kind,
            rows,
            note="tokens_scheduled per step <= token_budget (max_num_batched_tokens); "
            "computed_before: the request's tokens computed before the step (prefix-cache "
            "hits and received KV on its first step, then what earlier steps scheduled); "
            "block 0 is vLLM's null block",
        )

    def transfers(self) -> Result:
        """KV transfers (one per request and direction)."""
        rows = [
            {
                "engine": b.engine_id,
                "direction": e.direction,
                "connector": e.connector,
                "tokens": e.num_tokens,
                "bytes": e.num_bytes,
                "ms": (e.end - e.start) * 1e3,
            }
            for b, e in self._events("KVTransfer")
        ]
        return Result("KV transfers prefill -> decode", self.kind, rows)

    def allocations(self) -> Result:
        """Blocks each engine gave the request, how many tokens came from outside, and why
        (a PD decode engine allocates twice: once for the KV to receive, once to run)."""
        rows = []
        seen: dict[tuple[str, str], list[int]] = {}
        for b, e in self._events("RequestAllocated"):
            ids = list(e.block_ids)
            earlier = seen.get((b.engine_id, e.req_id))
            seen[(b.engine_id, e.req_id)] = ids
            if earlier is not None:
                why = ("KV received: scheduled to run, "
                       + ("on the same blocks" if earlier == ids else "blocks updated"))
            elif e.num_external_tokens:
                why = "reserved for the KV sent by prefill (WAITING_FOR_REMOTE_KVS)"
            else:
                why = "for the prompt"
            rows.append({"engine": b.engine_id, "blocks": len(ids), "block_ids": _ids(ids),
                         "external_tokens": e.num_external_tokens, "why": why})
        return Result(
            "blocks allocated per engine", self.kind, rows,
            note="vLLM's scheduler allocates for a request each time it takes it from the "
            "waiting queue: a decode engine first while the KV is on its way, then again "
            "once it has arrived (update_state_after_alloc runs twice)",
        )

    def timeline(self) -> Result:
        """The proxy's events for the request, in ms since its arrival."""
        t0 = min((ev["ts"] for ev in self.events), default=0.0)
        rows = [
            {
                "event": ev["event"],
                "ms": (ev["ts"] - t0) * 1e3,
                "detail": ", ".join(
                    f"{k}={ev[k]}"
                    for k in ("prompt_tokens", "wait_s", "completion_tokens")
                    if k in ev
                ),
            }
            for ev in self.events
        ]
        return Result("the request through the PD proxy", self.kind, rows)

    def phases(self) -> Result:
        """The proxy's wait for decode, split by the side that knows each part: decode taking
        the request (before its connector starts), the KV transfer (the connector's own
        start/end, as the streaming view draws it), decode's first step (after the KV landed);
        and prefill's send, which is not a part of the wait (NIXL: prefill holds its blocks
        from its finish until decode's read lands; ExampleConnector: saves inside prefill)."""
        from labkit.viz.state import TransferState

        st = TransferState()
        for b in self.observer:
            st.apply(b)
        for ev in self.events:
            st.apply_timeline(ev)
        r = next((r for r in st.rows() if r.joined and r.proxy_transfer_end is not None), None)
        title = "the proxy's wait for decode, part by part"
        if r is None or r.proxy_transfer_start is None or r.proxy_transfer_end is None:
            return Result(title, self.kind, [], note="no request went through the PD proxy")
        t_in, t_out = r.proxy_transfer_start, r.proxy_transfer_end
        rows = [{"part": "proxy: kv_transfer_start -> kv_transfer_end (decode's first byte)",
                 "ms": (t_out - t_in) * 1e3, "clock": "proxy"}]
        if r.recv_start is not None and r.recv_end is not None:
            rows += [
                {"part": "  decode takes the request, allocates blocks, starts the read",
                 "ms": (r.recv_start - t_in) * 1e3, "clock": "proxy -> decode's connector"},
                {"part": f"  KV transfer ({r.connector} on decode: recv)",
                 "ms": (r.recv_end - r.recv_start) * 1e3, "clock": "decode's connector"},
                {"part": "  decode's next step computes the first token, streams it back",
                 "ms": (t_out - r.recv_end) * 1e3, "clock": "decode's connector -> proxy"},
            ]
        if r.send_start is not None and r.send_end is not None:
            held = ("prefill holds its blocks from its finish until decode's read lands "
                    "(overlaps the wait)" if "nixl" in r.connector.lower()
                    else "prefill saves the KV inside its forward (before the wait)")
            rows.append({"part": f"prefill's send: {held}",
                         "ms": (r.send_end - r.send_start) * 1e3, "clock": "prefill's connector"})
        return Result(title, self.kind, rows,
                      note="every time is the host's wall clock; the indented parts add up to "
                      "the proxy's wait")

    def block_map(self) -> Any:
        """The dashboard's block-map view after the request (a plotly FigureWidget)."""
        from labkit.viz.blocks import BlockMapView
        from labkit.viz.blockstate import BlockMapState

        state = BlockMapState(
            {
                e["name"]: (
                    e.get("role", "both"),
                    e.get("kind", self.kind),
                    int(e.get("num_blocks", 0)),
                    int(e.get("block_size", 16)),
                )
                for e in self.describe.get("engines", [])
            }
        )
        for batch in self.observer:
            state.apply(batch)
        view = BlockMapView(state)
        view.update()
        return view.figure


def computed_before(engine: str, step: Any, done: dict[tuple[str, str], int]) -> dict[str, int]:
    """Tokens each request of a StepScheduled had computed before that step. The observer
    reports num_computed_tokens on a request's first step only (labkit/pd/observer.py: new
    requests, and resumed ones, which vLLM 0.26's Model Runner V2 gets as new with their
    prefix hits); later steps add what earlier ones scheduled. `done` carries the running
    totals from step to step (a preempted request's is dropped: its resume says it again)."""
    out = {}
    for rid, n in step.num_scheduled_tokens.items():
        key = (engine, rid)
        before = int(step.num_computed_tokens.get(rid, done.get(key, 0)))
        out[rid] = before
        done[key] = before + int(n)
    for rid in getattr(step, "preempted", ()) or ():
        done.pop((engine, rid), None)
    return out


def _done(batches: list[Any], engines: int) -> bool:
    """Every engine reported the request finished (and prefill its KV sent, with PD)."""
    finished = {
        b.engine_id for b in batches for e in b.events if type(e).__name__ == "RequestFinished"
    }
    sent = any(
        type(e).__name__ == "KVTransfer" and e.direction == "send"
        for b in batches
        for e in b.events
    )
    return len(finished) >= engines and (engines == 1 or sent)


def complete_streamed(lab: Any, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """One completion through the lab's proxy, streamed, folded into a completion body.

    Streamed, the proxy's first byte from decode is decode's first token, so its
    `kv_transfer_end` closes the wait after decode's first step (trace.phases()); a whole
    JSON answer would arrive after every decode step."""
    import json

    import httpx

    body = {"model": lab.plan.model.name, "prompt": prompt, "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    out: dict[str, Any] = {"choices": [{"index": 0, "text": "", "finish_reason": None}]}
    with httpx.stream("POST", f"{lab.url}/v1/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            data = line[len("data:"):].strip() if line.startswith("data:") else ""
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            for k in ("id", "object", "created", "model", "usage"):
                if chunk.get(k) is not None:
                    out[k] = chunk[k]
            for c in chunk.get("choices") or []:
                out["choices"][0]["text"] += c.get("text") or ""
                out["choices"][0]["finish_reason"] = c.get("finish_reason") or \
                    out["choices"][0]["finish_reason"]
    return out


def send(
    lab: Any, prompt_len: int = 600, max_tokens: int = 8, *, seed: int = 0, wait_s: float = 10.0
) -> Trace:
    """Send one completion of `prompt_len` tokens through `lab` and collect what its
    telemetry reports until every engine is done with it (or `wait_s` passes)."""
    tel = lab.telemetry()
    tel.wait_connected(10.0)  # ZMQ joins late; at once when the readers are already connected
    tel.poll()  # drop what came before
    t = time.monotonic()
    response = complete_streamed(lab, token_prompt(prompt_len, seed), max_tokens)
    trace = Trace(lab.kind, prompt_len, response, describe=tel.describe())
    deadline = time.monotonic() + wait_s
    while True:
        delta = tel.poll()
        trace.observer += delta.observer
        trace.events += delta.timeline
        proxied = lab.plan.connector is not None  # colocated: no proxy, no timeline
        finished = not proxied or any(ev["event"] == "finish" for ev in trace.events)
        if (
            finished and _done(trace.observer, len(lab.plan.engines))
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    trace.wall_s = time.monotonic() - t
    return trace
