"""Physical KV-cache blocks of each engine, folded from observer events (numpy, O(events)).

Two sources paint the same picture:
- `PoolSnapshot` (<= 4 Hz) is the ground truth of each block's state; it overwrites.
- `RequestAllocated` / `StepScheduled.new_block_ids` / `RequestFinished` say WHICH request
  holds a block (snapshots carry no owners) and move the picture between snapshots.

Per block we keep: state (0 free, 1 cached, 2 in use, 3 shared), ref count, owner request
code and the block's position in its owner's block table (so hover can say how many tokens
it holds). Holders of shared blocks (ref >= 2) live in a sparse dict: shared blocks are few.
"""
from __future__ import annotations

import numpy as np

from labkit.telemetry.observer_schema import (
    KVTransfer,
    PoolSnapshot,
    RequestAllocated,
    RequestFinished,
    StepScheduled,
)
from labkit.vocab import BLOCK_CACHED as CACHED
from labkit.vocab import BLOCK_FREE as FREE
from labkit.vocab import BLOCK_IN_USE as IN_USE
from labkit.vocab import BLOCK_SHARED as SHARED

NULL_BLOCK = 0  # vLLM's null block (vllm/v1/core/block_pool.py): never handed to a request


class EngineBlocks:
    """The block pool of one engine as the views see it."""

    def __init__(self, name: str, role: str, kind: str, num_blocks: int, block_size: int) -> None:
        self.name, self.role, self.kind = name, role, kind
        self.block_size = block_size
        self.num_blocks = 0
        self.state = np.zeros(0, np.uint8)
        self.refs = np.zeros(0, np.uint16)
        self.owner = np.zeros(0, np.int32)  # request code, -1: none / unknown
        self.pos = np.zeros(0, np.int32)  # index of the block in its owner's block table
        self.req_names: list[str] = []
        self.req_codes: dict[str, int] = {}
        self.req_tokens = np.zeros(64, np.int64)  # by code: tokens the request holds
        self.req_blocks: dict[str, list[int]] = {}  # live requests -> their blocks, in order
        self.holders: dict[int, list[str]] = {}  # shared blocks only
        self.sending: set[str] = set()  # finished with delay_free: blocks wait for a KV send
        self.version = 0  # bumped on every change; views redraw only when it moved
        self.resize(num_blocks)

    # -- bookkeeping -------------------------------------------------------------------------
    def resize(self, num_blocks: int) -> None:
        if num_blocks <= self.num_blocks:
            return
        grow = num_blocks - self.num_blocks
        self.state = np.concatenate([self.state, np.zeros(grow, np.uint8)])
        self.refs = np.concatenate([self.refs, np.zeros(grow, np.uint16)])
        self.owner = np.concatenate([self.owner, np.full(grow, -1, np.int32)])
        self.pos = np.concatenate([self.pos, np.full(grow, -1, np.int32)])
        self.num_blocks = num_blocks
        self.version += 1

    def code(self, req_id: str) -> int:
        c = self.req_codes.get(req_id)
        if c is None:
            c = self.req_codes[req_id] = len(self.req_names)
            self.req_names.append(req_id)
            if c >= len(self.req_tokens):
                self.req_tokens = np.concatenate([self.req_tokens, np.zeros_like(self.req_tokens)])
        return c

    def counts(self) -> np.ndarray:
        """Blocks per state [free, cached, in use, shared], the null block left out."""
        return np.bincount(self.state[1:], minlength=4)[:4]

    def tokens_per_block(self) -> np.ndarray:
        """Tokens held by each block (0 where no owner is known)."""
        has = self.owner >= 0
        tok = np.zeros(self.num_blocks, np.int64)
        held = self.req_tokens[self.owner[has]] - self.pos[has].astype(np.int64) * self.block_size
        tok[has] = np.clip(held, 0, self.block_size)
        return tok

    # -- events ------------------------------------------------------------------------------
    def allocate(self, req_id: str, block_ids: list[int]) -> None:
        """Blocks appended to a request's block table (new ones only: hooks overlap)."""
        table = self.req_blocks.setdefault(req_id, [])
        known = set(table)
        new = [b for b in dict.fromkeys(block_ids) if b != NULL_BLOCK and b not in known]
        if not new:
            return
        self.resize(max(new) + 1)
        code = self.code(req_id)
        arr = np.asarray(new, np.int64)
        first_pos = len(table)
        table.extend(new)
        self.refs[arr] += 1
        idx = np.flatnonzero(self.owner[arr] < 0)
        self.owner[arr[idx]] = code
        self.pos[arr[idx]] = first_pos + idx
        shared = arr[self.refs[arr] >= 2]
        self.state[arr] = IN_USE
        self.state[shared] = SHARED
        for b in shared.tolist():  # a prefix-cache hit: the block now has several holders
            holders = self.holders.setdefault(b, [])
            if not holders and self.owner[b] >= 0:
                holders.append(self.req_names[self.owner[b]])
            if req_id not in holders:
                holders.append(req_id)
        self.version += 1

    def free(self, req_id: str) -> None:
        """A request lets go of its blocks (finished or preempted)."""
        self.sending.discard(req_id)
        table = self.req_blocks.pop(req_id, None)
        if not table:
            return
        arr = np.asarray(table, np.int64)
        arr = arr[arr < self.num_blocks]
        self.refs[arr] = np.maximum(self.refs[arr].astype(np.int32) - 1, 0).astype(np.uint16)
        code = self.req_codes.get(req_id, -1)
        # vLLM keeps full blocks' hashes (evictable cache); the partial tail block is just free.
        num_full = int(self.req_tokens[code]) // self.block_size if code >= 0 else 0
        gone = self.refs[arr] == 0
        full = np.arange(len(arr)) < num_full
        self.state[arr[gone & full]] = CACHED
        self.state[arr[gone & ~full]] = FREE
        self.owner[arr[gone]] = -1
        self.pos[arr[gone]] = -1
        for b in arr[~gone].tolist():  # still held by another request: hand ownership on
            holders = self.holders.get(b, [])
            if req_id in holders:
                holders.remove(req_id)
            if len(holders) <= 1:
                self.holders.pop(b, None)
                self.state[b] = IN_USE
            if holders and self.owner[b] == code:
                nxt = holders[0]
                table_nxt = self.req_blocks.get(nxt, [])
                self.owner[b] = self.code(nxt)
                self.pos[b] = table_nxt.index(b) if b in table_nxt else -1
        self.version += 1

    def snapshot(self, snap: PoolSnapshot) -> None:
        """Ground truth: overwrite states; blocks found free lose their owners."""
        n = snap.num_blocks
        self.resize(n)
        state = np.frombuffer(snap.block_state, np.uint8, count=min(n, len(snap.block_state)))
        self.state[: len(state)] = state
        idle = np.flatnonzero(state <= CACHED)
        self.owner[idle] = -1
        self.pos[idle] = -1
        self.refs[idle] = 0
        busy = state >= IN_USE
        self.refs[: len(state)][busy] = np.maximum(self.refs[: len(state)][busy], state[busy] - 1)
        if self.holders:
            for b in [b for b in self.holders if b < len(state) and state[b] != SHARED]:
                del self.holders[b]
        self.version += 1

    def step(self, ev: StepScheduled) -> None:
        for req_id, blocks in ev.new_block_ids.items():
            if blocks:
                self.allocate(req_id, blocks)
        for req_id, n in ev.num_scheduled_tokens.items():
            c = self.code(req_id)
            self.req_tokens[c] = ev.num_computed_tokens.get(req_id, 0) + n
        for req_id in [*ev.preempted, *ev.finished]:
            if req_id not in self.sending:
                self.free(req_id)

    def finished(self, ev: RequestFinished) -> None:
        if ev.block_ids:
            self.allocate(ev.req_id, ev.block_ids)  # no-op for blocks already known
        if ev.delay_free:
            self.sending.add(ev.req_id)  # held until the KV is sent (a snapshot or KVTransfer)
            self.version += 1
        else:
            self.free(ev.req_id)


class BlockMapState:
    """Reducer: observer batches -> `EngineBlocks` per engine."""

    def __init__(self, engines: dict[str, tuple[str, str, int, int]] | None = None) -> None:
        """engines: name -> (role, kind, num_blocks, block_size), from the source's describe()."""
        self.engines: dict[str, EngineBlocks] = {}
        for name, (role, kind, num_blocks, block_size) in (engines or {}).items():
            self.engines[name] = EngineBlocks(name, role, kind, num_blocks, block_size)

    def engine(self, name: str, role: str = "both", kind: str = "sim") -> EngineBlocks:
        eng = self.engines.get(name)
        if eng is None:
            eng = self.engines[name] = EngineBlocks(name, role, kind, 0, 16)
        return eng

    def apply(self, batch) -> None:
        """Fold one ObserverBatch."""
        if batch.engine_id not in self.engines and not any(
            isinstance(ev, (StepScheduled, RequestAllocated, RequestFinished, PoolSnapshot))
            for ev in batch.events
        ):
            return  # a TP/PP worker rank ("prefill/rank1") reports layers only: no pool of its own
        eng = self.engine(batch.engine_id, batch.role, batch.kind)
        eng.kind = batch.kind
        for ev in batch.events:
            if isinstance(ev, StepScheduled):
                eng.step(ev)
            elif isinstance(ev, RequestAllocated):
                eng.allocate(ev.req_id, ev.block_ids)
                c = eng.code(ev.req_id)
                eng.req_tokens[c] = max(int(eng.req_tokens[c]), ev.num_external_tokens)
            elif isinstance(ev, RequestFinished):
                eng.finished(ev)
            elif isinstance(ev, PoolSnapshot):
                eng.snapshot(ev)
            elif isinstance(ev, KVTransfer) and ev.direction == "send" and ev.req_id in eng.sending:
                eng.free(ev.req_id)
