"""A made-up PD pair for exercising the views without any engine: benchmarks, screenshots,
tests. NOT the simulator (labkit/engines/sim models vLLM faithfully); this only produces
plausible, self-consistent telemetry, and labels itself "sim" so every view says SIMULATED.

Each poll runs `steps_per_poll` scheduler steps on both engines:
- prefill: running chunks first, then new arrivals, one token budget per step (chunked
  prefill); some prompts share a prefix with an earlier request (ref-counted blocks);
  a finished prefill sends its KV (KVTransfer + per-layer LayerTiming) and frees its blocks;
- decode: loads the KV (RequestAllocated with num_external_tokens), one token per step per
  request, a new block every `block_size` tokens, finishes after its output length.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from labkit.telemetry.observer_schema import (
    KVTransfer,
    LayerTiming,
    ObserverBatch,
    PoolSnapshot,
    RequestAllocated,
    RequestFinished,
    StepScheduled,
)
from labkit.telemetry.source import EngineMemory, GpuSample, TelemetryDelta
from labkit.vocab import GiB  # noqa: F401

KV_BYTES_PER_TOKEN = 65536  # lab-1b shape in bf16 (16 layers x 2 x 8 heads x 128 x 2 B)
NUM_LAYERS = 16
LINK_BYTES_PER_S = 20e9


class _Pool:
    """Ref-counted blocks with vLLM's four display states; allocation from a FIFO free queue."""

    def __init__(self, num_blocks: int) -> None:
        self.refs = np.zeros(num_blocks, np.int32)
        self.state = np.zeros(num_blocks, np.uint8)
        self.free_queue: deque[int] = deque(range(1, num_blocks))  # block 0: the null block
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def take(self, req: str, n: int) -> list[int]:
        blocks = [self.free_queue.popleft() for _ in range(n)]
        self.tables.setdefault(req, []).extend(blocks)
        self.refs[blocks] = 1
        self.state[blocks] = 2
        return blocks

    def share(self, req: str, blocks: list[int]) -> None:
        self.tables.setdefault(req, []).extend(blocks)
        self.refs[blocks] += 1
        self.state[blocks] = 3

    def free(self, req: str, cached: bool = True) -> list[int]:
        blocks = self.tables.pop(req, [])
        for b in reversed(blocks):  # vLLM frees the tail first (block_pool.free_blocks)
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.state[b] = 1 if cached else 0
                self.free_queue.append(b)
            elif self.refs[b] == 1:
                self.state[b] = 2
        return blocks


class SyntheticSource:
    """A `TelemetrySource` that makes up a busy PD pair (prefill-0, decode-0) on one GPU."""

    def __init__(self, num_blocks: int = 100_000, steps_per_poll: int = 8, block_size: int = 16,
                 token_budget: int = 2048, arrival_p: float = 0.5, seed: int = 0,
                 kind: str = "sim") -> None:  # fmt: skip
        self.rng = np.random.default_rng(seed)
        self.num_blocks, self.block_size, self.budget = num_blocks, block_size, token_budget
        self.steps_per_poll, self.arrival_p, self.kind = steps_per_poll, arrival_p, kind
        self.pre, self.dec = _Pool(num_blocks), _Pool(num_blocks)
        self.waiting: deque[tuple[str, int, int]] = deque()  # (req, prompt, output)
        self.prefilling: dict[str, list[int]] = {}  # req -> [prompt, done, output]
        self.decoding: dict[str, list[int]] = {}  # req -> [tokens, output left]
        self.step = self.next_req = 0
        self.clock = 1_000.0
        self._memory_sent = False

    def describe(self) -> dict[str, Any]:
        engines = [{"name": n, "role": r, "kind": self.kind, "gpus": [0],
                    "num_blocks": self.num_blocks, "block_size": self.block_size}
                   for n, r in (("prefill-0", "prefill"), ("decode-0", "decode"))]  # fmt: skip
        gpus = [{"index": 0, "name": "Synthetic GPU", "total_bytes": 80 * GiB}]
        return {"kind": self.kind, "engines": engines, "gpus": gpus, "link": "pcie"}

    # -- one step per engine --------------------------------------------------------------------
    def _prefill_step(self, ev: list[Any], dec_ev: list[Any], tl: list[dict[str, Any]]) -> None:
        rng, bs, t = self.rng, self.block_size, self.clock
        if rng.random() < self.arrival_p:
            req = f"req-{self.next_req}"
            self.next_req += 1
            self.waiting.append((req, int(rng.integers(100, 6000)), int(rng.integers(50, 400))))
            tl.append({"req_id": req, "ts": t, "event": "arrival"})
        sched: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        computed: dict[str, int] = {}
        left = self.budget
        done_reqs: list[tuple[str, int, int]] = []
        while self.waiting and len(self.prefilling) < 4:  # admit when the blocks are there
            req, prompt, out = self.waiting[0]
            if -(-prompt // bs) > self.pre.num_free:
                break
            self.waiting.popleft()
            donor = next(iter(self.prefilling), None)
            if donor and rng.random() < 0.3:  # a shared system prompt: the donor's first blocks
                shared = self.pre.tables[donor][:4]
                self.pre.share(req, shared)
                ev.append(RequestAllocated(t, req, list(shared), 0))
            self.prefilling[req] = [prompt, 0, out]
            tl.append({"req_id": req, "ts": t, "event": "prefill_start"})
        for req, st in list(self.prefilling.items()):
            prompt, done, out = st
            chunk = min(prompt - done, left)
            if chunk <= 0:
                break
            have = len(self.pre.tables.get(req, []))
            need = -(-(done + chunk) // bs) - have
            blocks = self.pre.take(req, max(need, 0)) if need > 0 else []
            sched[req], computed[req], left = chunk, done, left - chunk
            if blocks:
                new_blocks[req] = blocks
            st[1] = done + chunk
            if st[1] >= prompt:
                done_reqs.append((req, prompt, out))
        self.step += 1
        # Scheduler output first (build_connector_meta), then request_finished after the step.
        ev.append(StepScheduled(self.step, t, self.budget, sched, new_blocks, computed, [], []))
        for req, prompt, out in done_reqs:
            self._hand_over(req, prompt, out, ev, dec_ev, tl)

    def _hand_over(self, req: str, prompt: int, out: int, ev: list[Any], dec_ev: list[Any],
                   tl: list[dict[str, Any]]) -> None:  # fmt: skip
        t = self.clock
        nbytes = prompt * KV_BYTES_PER_TOKEN
        dt = nbytes / LINK_BYTES_PER_S
        del self.prefilling[req]
        ev.append(RequestFinished(t, req, list(self.pre.tables.get(req, [])), False))
        self.pre.free(req)
        ev.append(KVTransfer(t, req, "send", prompt, nbytes, t, t + dt, "ExampleConnector"))
        per = dt / NUM_LAYERS
        ev.extend(LayerTiming(t, "save", f"model.layers.{i}.self_attn.attn", t + i * per,
                              t + (i + 0.9) * per, nbytes // NUM_LAYERS, [req])
                  for i in range(NUM_LAYERS))  # fmt: skip
        tl += [{"req_id": req, "ts": t, "event": "prefill_end"},
               {"req_id": req, "ts": t, "event": "kv_transfer_start"},
               {"req_id": req, "ts": t + dt, "event": "kv_transfer_end"}]  # fmt: skip
        n = min(-(-(prompt + 1) // self.block_size), self.dec.num_free)
        dec_ev.append(RequestAllocated(t + dt, req, self.dec.take(req, n), prompt))
        dec_ev.append(KVTransfer(t + dt, req, "recv", prompt, nbytes, t, t + dt, "ExampleConnector"))
        dec_ev.extend(LayerTiming(t + dt, "load", f"model.layers.{i}.self_attn.attn", t + i * per,
                                  t + (i + 1) * per, nbytes // NUM_LAYERS, [req])
                      for i in range(NUM_LAYERS))  # fmt: skip
        self.decoding[req] = [prompt, out, prompt]  # tokens, output left, prompt

    def _decode_step(self, ev: list[Any], tl: list[dict[str, Any]]) -> None:
        t, bs = self.clock, self.block_size
        sched: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        computed: dict[str, int] = {}
        finished: list[str] = []
        preempted: list[str] = []
        for req, st in list(self.decoding.items())[:256]:  # max_num_seqs
            tokens, left, prompt = st
            if req not in self.decoding:
                continue  # preempted below in this step
            if tokens + 1 > len(self.dec.tables.get(req, [])) * bs:
                while self.dec.num_free == 0 and len(self.decoding) > 1:
                    victim = next(reversed(self.decoding))  # vLLM preempts the newest
                    del self.decoding[victim]
                    self.dec.free(victim, cached=False)
                    preempted.append(victim)
                    tl.append({"req_id": victim, "ts": t, "event": "error"})
                if self.dec.num_free == 0 or req not in self.decoding:
                    continue
                new_blocks[req] = self.dec.take(req, 1)
            sched[req], computed[req] = 1, tokens
            tl.append({"req_id": req, "ts": t, "event": "first_token" if tokens == prompt else "token"})
            st[0], st[1] = tokens + 1, left - 1
            if st[1] <= 0:
                finished.append(req)
        sched = {r: n for r, n in sched.items() if r not in preempted}
        new_blocks = {r: b for r, b in new_blocks.items() if r not in preempted}
        ev.append(StepScheduled(self.step, t, self.budget, sched, new_blocks, computed, preempted, []))
        for req in finished:
            del self.decoding[req]
            ev.append(RequestFinished(t, req, list(self.dec.tables.get(req, [])), False))
            self.dec.free(req)
            tl.append({"req_id": req, "ts": t, "event": "finish"})

    def poll(self) -> TelemetryDelta:
        pre_ev: list[Any] = []
        dec_ev: list[Any] = []
        tl: list[dict[str, Any]] = []
        for _ in range(self.steps_per_poll):
            self.clock += 0.02
            self._prefill_step(pre_ev, dec_ev, tl)
            self._decode_step(dec_ev, tl)
        for ev, pool in ((pre_ev, self.pre), (dec_ev, self.dec)):
            ev.append(PoolSnapshot(self.clock, len(pool.state), pool.num_free, pool.state.tobytes()))
        batches = [ObserverBatch("prefill-0", "prefill", self.kind, self.clock, pre_ev),
                   ObserverBatch("decode-0", "decode", self.kind, self.clock, dec_ev)]  # fmt: skip
        # vLLM reserves its KV pool at start-up: NVML sees it whole; activations wobble.
        kv = min(self.num_blocks * self.block_size * KV_BYTES_PER_TOKEN, 30 * GiB)
        used = {n: 2 * GiB + kv + int(GiB * (0.8 + 0.2 * self.rng.random()))
                for n in ("prefill-0", "decode-0")}  # fmt: skip
        sample = GpuSample(self.clock, 0, sum(used.values()) + GiB // 2, 80 * GiB, used,
                           "Synthetic GPU", self.kind)  # fmt: skip
        memory = [] if self._memory_sent else [
            EngineMemory("prefill-0", 0, 2 * GiB, kv, "prefill", self.kind),
            EngineMemory("decode-0", 0, 2 * GiB, kv, "decode", self.kind),
        ]  # fmt: skip
        self._memory_sent = True
        return TelemetryDelta(batches, tl, [], [sample], memory)
