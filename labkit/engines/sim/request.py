"""One request inside the simulated engine: vLLM's `Request` and `RequestStatus`, trimmed.

Mirrors vllm/v1/request.py: a request knows its tokens, how many of them have KV computed
(`num_computed_tokens`), its chained block hashes (computed on creation and whenever a block
fills, like vLLM's `get_request_block_hasher`), and its status. Simulator-only fields record
the times the lab reports (queue, first token, token times).
"""
from __future__ import annotations

import enum
import hashlib
import pickle
from collections.abc import Callable
from typing import Any

# vllm/v1/core/kv_cache_utils.py NONE_HASH: the parent "hash" of the first block of every
# chain. vLLM draws it from PYTHONHASHSEED (or random); the simulator fixes it so runs repeat.
NONE_HASH: int = 0x5EED_0000_0000_0001
_MASK64 = (1 << 64) - 1


def hash_block_tokens_fast(parent_block_hash: int | None, block_token_ids: tuple[int, ...]) -> int:
    """Chained block hash (vllm/v1/core/kv_cache_utils.py hash_block_tokens), fast variant.

    CPython's tuple-of-ints hash is deterministic across processes (ints are not salted),
    ~10x faster than vLLM's default pickle+sha256. Values differ from vLLM's; the chaining
    (parent hash + this block's tokens) is the same. Returned as an unsigned 64-bit int, the
    form vLLM's KV events carry (`maybe_convert_block_hash`).
    """
    if parent_block_hash is None:
        parent_block_hash = NONE_HASH
    return hash((parent_block_hash, block_token_ids)) & _MASK64


def hash_block_tokens_sha256(
    parent_block_hash: int | None, block_token_ids: tuple[int, ...]
) -> int:
    """vLLM's default algorithm (pickle + sha256, vllm/utils/hashing.py), folded to 64 bits."""
    if parent_block_hash is None:
        parent_block_hash = NONE_HASH
    digest = hashlib.sha256(
        pickle.dumps((parent_block_hash, block_token_ids, None), protocol=pickle.HIGHEST_PROTOCOL)
    ).digest()
    return int.from_bytes(digest[-8:], "big")


HASH_FUNCTIONS: dict[str, Callable[[int | None, tuple[int, ...]], int]] = {
    "builtin": hash_block_tokens_fast,
    "sha256": hash_block_tokens_sha256,
}


class RequestStatus(enum.IntEnum):
    """vllm/v1/request.py RequestStatus: anything after PREEMPTED is finished."""

    WAITING = enum.auto()
    WAITING_FOR_REMOTE_KVS = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_IGNORED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status > RequestStatus.PREEMPTED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_IGNORED: "length",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """A request's token and KV state (vllm/v1/request.py), plus the simulator's timings."""

    __slots__ = (
        "request_id", "prompt_token_ids", "num_prompt_tokens", "all_token_ids",
        "num_tokens", "max_tokens", "ignore_eos", "eos_token_id", "arrival_time",
        "status", "num_computed_tokens", "num_preemptions", "block_hashes",
        "kv_transfer_params", "is_prefill_chunk", "num_output_tokens",
        "num_output_placeholders", "last_sched_seq",
        "_hash_fn", "_hash_block_size", "_next_hash_at",
        # simulator timings / stats
        "scheduled_time", "first_token_time", "last_token_time", "finished_time",
        "num_local_cached_tokens", "num_external_tokens", "prefill_stats_taken",
        "kv_recv_start", "kv_recv_end",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        max_tokens: int,
        *,
        block_size: int,
        hash_fn: Callable[[int | None, tuple[int, ...]], int] = hash_block_tokens_fast,
        ignore_eos: bool = True,
        eos_token_id: int | None = None,
        arrival_time: float = 0.0,
        kv_transfer_params: dict[str, Any] | None = None,
        block_hashes: list[int] | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.num_prompt_tokens = len(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.num_tokens = self.num_prompt_tokens
        self.num_output_tokens = 0
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        self.eos_token_id = eos_token_id
        self.arrival_time = arrival_time
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.kv_transfer_params = dict(kv_transfer_params) if kv_transfer_params else None
        self.is_prefill_chunk = True
        # AsyncScheduler: tokens sampled by steps still in flight (not yet in all_token_ids).
        self.num_output_placeholders = 0
        # Scheduler.defer_block_free: the sched_step_seq of the last step that scheduled it.
        self.last_sched_seq = 0
        self._hash_fn = hash_fn
        self._hash_block_size = block_size
        # Precomputed prompt hashes (same block size and algorithm, e.g. from the prefill
        # engine of a SimCluster) save hashing the prompt twice.
        self.block_hashes: list[int] = list(block_hashes) if block_hashes else []
        self._next_hash_at = block_size
        self.update_block_hashes()
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        self.num_local_cached_tokens = 0
        self.num_external_tokens = 0
        self.prefill_stats_taken = False
        self.kv_recv_start: float | None = None
        self.kv_recv_end: float | None = None

    def update_block_hashes(self) -> None:
        """Hash every newly full block (vllm/v1/core/kv_cache_utils.py request_block_hasher)."""
        bs = self._hash_block_size
        hashes = self.block_hashes
        tokens = self.all_token_ids
        start = len(hashes) * bs
        parent = hashes[-1] if hashes else None
        fn = self._hash_fn
        end = self.num_tokens
        if fn is hash_block_tokens_fast:  # inlined: prompts hash thousands of blocks
            if parent is None:
                parent = NONE_HASH
            if end - start >= 2 * bs:
                tokens = tuple(tokens)  # slicing a tuple makes the block tuple directly
            while start + bs <= end:
                parent = hash((parent, tuple(tokens[start:start + bs]))) & _MASK64
                hashes.append(parent)
                start += bs
        else:
            while start + bs <= end:
                parent = fn(parent, tuple(tokens[start:start + bs]))
                hashes.append(parent)
                start += bs
        self._next_hash_at = start + bs

    def append_output_token_id(self, token_id: int) -> None:
        """vllm/v1/request.py append_output_token_ids: new token, new block hash when a block fills."""
        self.all_token_ids.append(token_id)
        self.num_tokens += 1
        self.num_output_tokens += 1
        if self.num_tokens >= self._next_hash_at:
            self.update_block_hashes()

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    def is_finished(self) -> bool:
        return self.status > RequestStatus.PREEMPTED

    def get_finished_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )
