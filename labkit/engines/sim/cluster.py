"""SimCluster: N prefill + M decode simulated engines in one process, one clock, one tiny router.

The router does what vLLM's toy PD proxy does: send the prompt to a prefill engine with
max_tokens=1 (NIXL: kv_transfer_params do_remote_decode), then send the same prompt to a
decode engine with the prefill response's kv_transfer_params and the client's max_tokens.
Engines are stepped as a discrete-event simulation: an engine steps again when its step
ends, sleeps when it has nothing to schedule, and is woken by an arrival, a finished KV
read (NIXL notif) or a pending load landing. With no decode engines the prefill engines
serve whole requests (colocated, no connector). Engines planned on the same GPU (`gpus`,
e.g. the PD pair with num_gpus=1) take turns on it for their GPU work
(labkit/engines/sim/shared_gpu.py); by default each engine has its GPUs to itself.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from labkit.engines.sim.clock import SimClock
from labkit.engines.sim.connector import InProcessTransport
from labkit.engines.sim.engine import SimEngine, StepResult
from labkit.engines.sim.shared_gpu import SharedGPU

NIXL_PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                       "remote_block_ids": None, "remote_host": None, "remote_port": None}


@dataclass(slots=True)
class RequestRecord:
    """One client request through the cluster (times in simulated seconds)."""

    req_id: str
    arrival: float
    prompt_len: int
    output_len: int
    prefill_engine: str = ""
    decode_engine: str = ""
    prefill_start: float | None = None
    prefill_end: float | None = None
    transfer_start: float | None = None
    transfer_end: float | None = None
    transfer_bytes: int = 0
    first_token: float | None = None
    finish: float | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def itl(self) -> float | None:
        """Mean inter-token latency of the decode phase."""
        if self.finish is None or self.first_token is None or self.num_output_tokens < 2:
            return None
        return (self.finish - self.first_token) / (self.num_output_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival


class WorkItem(NamedTuple):
    """One request of a workload. Requests with the same `prefix_id` share their first
    `prefix_len` tokens (default: the cluster's `shared_prefix_len`)."""

    arrival_s: float
    prompt_len: int
    output_len: int
    prefix_id: Any = None
    prefix_len: int | None = None


class SimCluster:
    """Prefill and decode SimEngines sharing a clock and a KV transport.

    Args:
        model, gpu: as SimEngine.
        num_prefill, num_decode: engines per role (num_decode=0: colocated engines).
        connector: "nixl" | "example".
        link: LINKS key between prefill and decode GPUs ("nvlink", "pcie", "rdma", "tcp").
        storage_link: LINKS key of ExampleConnector's storage path.
        shared_prefix_len: default length of a workload item's shared prefix.
        router_latency_s: API time of one engine call (client or proxy -> engine -> first
            byte back), paid once per engine a request visits: the request reaches the
            engine that much after its arrival (PD: prefill's, then decode's call).
        prefill_kwargs / decode_kwargs: per-role SimEngine arguments over `engine_kwargs`.
        clock: a SimClock (paced for live views); default fast.
        gpus: the GPU indices of each engine, prefill engines first (a Plan's
            `EnginePlan.gpus`); engines listed on a common GPU serialize their GPU work
            there. None: every engine on GPUs of its own.
    """

    def __init__(self, model: Any = "lab-1b", gpu: Any = "h100", *, num_prefill: int = 1,
                 num_decode: int = 1, connector: str = "nixl", link: str = "nvlink",
                 storage_link: str = "same-gpu", shared_prefix_len: int = 512,
                 router_latency_s: float = 0.0, prefill_kwargs: dict[str, Any] | None = None,
                 decode_kwargs: dict[str, Any] | None = None, clock: SimClock | None = None,
                 seed: int = 0, gpus: Sequence[Sequence[int]] | None = None,
                 **engine_kwargs: Any) -> None:
        from labkit.hardware import LINKS

        self.clock = clock or SimClock()
        self.connector = connector if num_decode > 0 else None
        self.transport = InProcessTransport(LINKS[link], LINKS[storage_link])
        self.transport.on_notify = self._on_notify
        self.shared_prefix_len = shared_prefix_len
        self.router_latency_s = router_latency_s
        self.seed = seed

        def build(role: str, i: int, extra: dict[str, Any] | None) -> SimEngine:
            kw = {**engine_kwargs, **(extra or {})}
            return SimEngine(model, gpu, connector=self.connector, transport=self.transport,
                             engine_id=f"{role}-{i}", clock=self.clock, seed=seed * 1000 + i
                             + (500 if role == "decode" else 0), side_channel_port=5600 + i, **kw)

        self.prefill_engines = [build("prefill", i, prefill_kwargs) for i in range(num_prefill)]
        self.decode_engines = [build("decode", i, decode_kwargs) for i in range(num_decode)]
        self.engines = self.prefill_engines + self.decode_engines
        self.shared_gpu = SharedGPU()
        if gpus is not None:
            self.shared_gpu.attach(self.engines, gpus)
        self._index = {e.engine_id: i for i, e in enumerate(self.engines)}
        # Decode can reuse the prompt hashes prefill computed when both hash alike.
        self._share_hashes = bool(self.decode_engines) and all(
            (e.block_size, e._hash_fn) == (self.engines[0].block_size, self.engines[0]._hash_fn)
            for e in self.engines)
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()
        self._wake_at: list[float | None] = [None] * len(self.engines)
        self._rr_prefill = itertools.cycle(range(num_prefill))
        self._rr_decode = itertools.cycle(range(num_decode)) if num_decode else None

    # -- event plumbing -----------------------------------------------------------------
    _ARRIVE, _SUBMIT_DECODE, _WAKE = 0, 1, 2

    def _push(self, t: float, kind: int, data: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, data))

    def _wake(self, idx: int, t: float) -> None:
        engine = self.engines[idx]
        if t < engine.busy_until:
            t = engine.busy_until
        pending = self._wake_at[idx]
        if pending is not None and pending <= t:
            return
        self._wake_at[idx] = t
        self._push(t, self._WAKE, idx)

    def _on_notify(self, engine_id: str, at: float) -> None:
        idx = self._index.get(engine_id)
        if idx is not None:
            self._wake(idx, at)

    # -- workload -------------------------------------------------------------------------
    def _prompts(self, workload: Sequence[WorkItem]) -> list[list[int]]:
        """Token ids per request: a unique first token, then a slice of one random pool (so no
        two prompts share a block hash unless they share a prefix id), shared prefixes on top."""
        vocab = self.engines[0].model.vocab_size
        rng = np.random.default_rng(self.seed)
        longest = max((int(item.prompt_len) for item in workload), default=1)
        pool = rng.integers(1, vocab, size=max(65536, 2 * longest)).tolist()
        offsets = rng.integers(0, len(pool) - longest, size=max(len(workload), 1)).tolist()
        prefixes: dict[Any, list[int]] = {}
        out = []
        for i, item in enumerate(workload):
            n = int(item.prompt_len)
            off = offsets[i]
            tokens = pool[off:off + n]
            tokens[0] = 1 + i % (vocab - 1)
            if item.prefix_id is not None:
                plen = self.shared_prefix_len if item.prefix_len is None else int(item.prefix_len)
                prefix = prefixes.get(item.prefix_id)
                if prefix is None:
                    prefix = prefixes[item.prefix_id] = rng.integers(1, vocab, size=plen).tolist()
                k = min(len(prefix), n - 1)
                tokens[:k] = prefix[:k]
            out.append(tokens)
        return out

    def run(self, workload: Iterable[WorkItem | Sequence[Any]], *, on_step: Callable[[SimEngine, StepResult], None] | None = None,
            until: float | None = None) -> list[RequestRecord]:
        """Serve `workload` to the end (or simulated time `until`); one record per request.

        Args:
            workload: `WorkItem`s, or plain tuples in its order
                (arrival_s, prompt_len, output_len[, prefix_id[, prefix_len]]).
            on_step: called after every engine step (live views).
        """
        items = sorted((WorkItem(*w) for w in workload), key=lambda w: float(w.arrival_s))
        prompts = self._prompts(items)
        records = [RequestRecord(str(i), float(w.arrival_s), int(w.prompt_len), int(w.output_len))
                   for i, w in enumerate(items)]
        for i, w in enumerate(items):
            self._push(float(w.arrival_s) + self.router_latency_s, self._ARRIVE, i)
        by_engine_req: dict[tuple[int, str], RequestRecord] = {}
        colocated = not self.decode_engines
        hashes = self._hashes = {}  # prompt hashes from prefill, reused by decode
        heap = self._heap
        while heap:
            t, _, kind, data = heapq.heappop(heap)
            if until is not None and t > until:
                heapq.heappush(heap, (t, 0, kind, data))
                break
            self.clock.advance_to(t)
            if kind == self._WAKE:
                idx = data
                if self._wake_at[idx] != t:
                    continue  # superseded by an earlier wake
                self._wake_at[idx] = None
                engine = self.engines[idx]
                res = engine.step(now=t)
                self._after_step(idx, engine, res, by_engine_req, prompts, colocated)
                if on_step is not None:
                    on_step(engine, res)
                if res.num_scheduled_tokens or res.emitted:
                    self._wake(idx, res.end)
                elif engine.has_unfinished() or engine.scheduler.requests:  # + NIXL leases
                    nxt = engine.next_event_time()
                    if nxt is not None:
                        self._wake(idx, max(nxt, t))
            elif kind == self._ARRIVE:
                i = data
                rec = records[i]
                p = next(self._rr_prefill)
                engine = self.engines[p]
                rec.prefill_engine = engine.engine_id
                if colocated:
                    engine.add_request(rec.req_id, prompts[i], rec.output_len, arrival_time=rec.arrival)
                else:
                    params = dict(NIXL_PREFILL_PARAMS) if self.connector == "nixl" else None
                    engine.add_request(rec.req_id, prompts[i], 1, kv_transfer_params=params,
                                       arrival_time=rec.arrival)
                by_engine_req[(p, rec.req_id)] = rec
                self._wake(p, t)
            else:  # _SUBMIT_DECODE
                i, params = data
                rec = records[i]
                d = len(self.prefill_engines) + next(self._rr_decode)  # type: ignore[arg-type]
                engine = self.engines[d]
                rec.decode_engine = engine.engine_id
                engine.add_request(rec.req_id, prompts[i], rec.output_len, kv_transfer_params=params,
                                   arrival_time=t, block_hashes=hashes.pop(i, None))
                by_engine_req[(d, rec.req_id)] = rec
                self._wake(d, t)
        return records

    def _after_step(self, idx: int, engine: SimEngine, res: StepResult,
                    by_engine_req: dict[tuple[int, str], RequestRecord], prompts: list[list[int]],
                    colocated: bool) -> None:
        is_prefill = idx < len(self.prefill_engines)
        for tr in engine.take_transfers():
            if tr.direction == "recv":
                rec = by_engine_req.get((idx, tr.req_id))
                if rec is not None:
                    rec.transfer_start, rec.transfer_end, rec.transfer_bytes = tr.start, tr.end, tr.num_bytes
        if not res.finished:
            return
        # A request's output leaves at its emission time (`finished_time`), which is the
        # step's end or, after a launch-bound step, the end of the next step's launch.
        if is_prefill and not colocated:
            for request, params in res.finished:
                rec = by_engine_req.get((idx, request.request_id))
                if rec is None:
                    continue
                if self._share_hashes:
                    self._hashes[int(rec.req_id)] = request.block_hashes
                out = request.finished_time
                rec.prefill_start = request.scheduled_time
                rec.prefill_end = out
                self._push(out + self.router_latency_s, self._SUBMIT_DECODE, (int(rec.req_id), params))
            return
        for request, _ in res.finished:
            rec = by_engine_req.get((idx, request.request_id))
            if rec is None:
                continue
            rec.first_token = request.first_token_time
            rec.finish = request.finished_time
            rec.num_output_tokens = request.num_output_tokens
            rec.num_cached_tokens = request.num_local_cached_tokens + request.num_external_tokens
            if colocated:
                rec.prefill_start = request.scheduled_time
                rec.prefill_end = request.first_token_time

    def summary(self, records: list[RequestRecord]) -> dict[str, float]:
        """Mean / p50 / p99 TTFT and ITL (seconds) and finished count."""
        done = [r for r in records if r.finish is not None]
        out: dict[str, float] = {"finished": float(len(done)), "requests": float(len(records))}
        for name, vals in (("ttft", [r.ttft for r in done]), ("itl", [r.itl for r in done if r.itl is not None])):
            arr = np.asarray([v for v in vals if v is not None], dtype=float)
            if arr.size:
                out[f"{name}_mean"] = float(arr.mean())
                out[f"{name}_p50"] = float(np.percentile(arr, 50))
                out[f"{name}_p99"] = float(np.percentile(arr, 99))
        if done:
            out["makespan"] = max(r.finish for r in done) - min(r.arrival for r in records)  # type: ignore[type-var]
        return out
