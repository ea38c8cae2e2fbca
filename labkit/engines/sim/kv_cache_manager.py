"""KVCacheManager for one full-attention KV group: vLLM's allocation rules, one file.

Copied from vllm/v1/core/kv_cache_manager.py (get_computed_blocks, allocate_slots, free) and
vllm/v1/core/single_type_kv_cache_manager.py (FullAttentionManager: get_num_blocks_to_allocate,
add_local_computed_blocks, allocate_external_computed_blocks, allocate_new_blocks,
cache_blocks, find_longest_cache_hit). Block layout of one request (allocate_slots):

    | < comp > | < new_comp > | < ext_comp >  | < new >  | < lookahead > |
                                              |   < to be computed >     |
                              |            < to be allocated >           |
    | prefix-cached: by vLLM  | by connector  |

Invariant: a request's block table is append-only while it runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from labkit.engines.sim.block_pool import BlockPool, KVCacheBlock
from labkit.engines.sim.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class KVCacheBlocks:
    """vllm/v1/core/kv_cache_manager.py KVCacheBlocks for one KV group: the scheduler<->manager interface."""

    blocks: list[KVCacheBlock]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return ([b.block_id for b in self.blocks],)

    def get_unhashed_block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks if b.block_hash is None and not b.is_null]


@dataclass(slots=True)
class PrefixCacheStats:
    """vllm/v1/metrics/stats.py PrefixCacheStats: queried and hit tokens (cumulative here)."""

    requests: int = 0
    queries: int = 0
    hits: int = 0
    preempted_requests: int = 0
    preempted_queries: int = 0
    preempted_hits: int = 0

    def record(self, num_tokens: int, num_hits: int, preempted: bool) -> None:
        if preempted:
            self.preempted_requests += 1
            self.preempted_queries += num_tokens
            self.preempted_hits += num_hits
        else:
            self.requests += 1
            self.queries += num_tokens
            self.hits += num_hits


class KVCacheManager:
    """Hands KV blocks to requests; None from allocate_slots means "not now" (preempt or wait).

    Args:
        num_gpu_blocks: pool size including the null block.
        block_size: tokens per block.
        max_model_len: cap on slots per request.
        enable_caching: automatic prefix caching.
        enable_kv_cache_events: queue KV events in the pool.
    """

    def __init__(self, num_gpu_blocks: int, block_size: int, max_model_len: int,
                 enable_caching: bool = True, enable_kv_cache_events: bool = False) -> None:
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_gpu_blocks, enable_caching, enable_kv_cache_events)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Only RUNNING (or async-loading) requests are tracked here.
        self.num_cached_block: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()
        self.empty_kv_cache_blocks = KVCacheBlocks([])

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()

    # -- prefix cache lookup ----------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[KVCacheBlocks, int]:
        """Longest run of cached full blocks from the start, never covering the last token.

        kv_cache_manager.py: "When all tokens hit the cache, we must recompute the last token
        to obtain logits", so the hit is capped at num_tokens - 1 (block-aligned down).
        """
        if not self.enable_caching:
            return self.empty_kv_cache_blocks, 0
        max_cache_hit_length = request.num_tokens - 1
        pool = self.block_pool
        cache = pool.cached_block_hash_to_block
        computed: list[KVCacheBlock] = []
        # single_type_kv_cache_manager.py FullAttentionManager.find_longest_cache_hit:
        # a miss ends the run (chained hashes: every later block misses too).
        for block_hash in request.block_hashes[: max_cache_hit_length // self.block_size]:
            blocks = cache.get(block_hash)
            if blocks is None:
                break
            computed.append(blocks if isinstance(blocks, KVCacheBlock) else next(iter(blocks.values())))
        num_hits = len(computed) * self.block_size
        self.prefix_cache_stats.record(request.num_tokens, num_hits, request.num_preemptions > 0)
        return (KVCacheBlocks(computed) if computed else self.empty_kv_cache_blocks), num_hits

    # -- allocation -------------------------------------------------------------------
    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: list[KVCacheBlock]) -> int:
        """single_type_kv_cache_manager.py: new blocks needed, plus hit blocks that are
        eviction candidates (touching takes them out of the free queue)."""
        num_required_blocks = cdiv(num_tokens, self.block_size)
        req_blocks = self.req_to_blocks.get(request_id)
        num_req_blocks = len(req_blocks) if req_blocks is not None else 0
        if request_id in self.num_cached_block:
            # A running request won't have new prefix-cache hits.
            return max(num_required_blocks - num_req_blocks, 0)
        num_new_blocks = max(num_required_blocks - (len(new_computed_blocks) + num_req_blocks), 0)
        num_evictable = sum(1 for b in new_computed_blocks if b.ref_cnt == 0 and not b.is_null)
        return num_new_blocks + num_evictable

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_computed_tokens: int = 0,
        new_computed_blocks: KVCacheBlocks | None = None,
        num_lookahead_tokens: int = 0,
        num_external_computed_tokens: int = 0,
        delay_cache_blocks: bool = False,
        full_sequence_must_fit: bool = False,
        reserved_blocks: int = 0,
    ) -> KVCacheBlocks | None:
        """Add slots for `num_new_tokens` (kv_cache_manager.py allocate_slots).

        Returns the newly allocated blocks, or None if the pool cannot hold them now.
        `delay_cache_blocks`: P/D async load, the loaded blocks are cached once they arrive.
        `full_sequence_must_fit`: admission gate (scheduler_reserve_full_isl, on by default
        in vLLM 0.26): a new request is admitted only if its whole prompt fits.
        """
        if num_new_tokens == 0 and num_external_computed_tokens == 0:
            raise ValueError("num_new_tokens must be greater than 0 when there are no external computed tokens")
        request_id = request.request_id
        bs = self.block_size
        pool = self.block_pool
        req_blocks = self.req_to_blocks.get(request_id)
        computed_list = new_computed_blocks.blocks if new_computed_blocks is not None else []

        # Fast path: a running request that needs no new block and has nothing new to cache
        # (most decode steps). Same result as the general path below.
        if req_blocks is not None and not computed_list and num_external_computed_tokens == 0 \
                and not full_sequence_must_fit and request_id in self.num_cached_block:
            total = request.num_computed_tokens + num_new_tokens
            need = total + num_lookahead_tokens
            if need > self.max_model_len:
                need = self.max_model_len
            if -(-need // bs) <= len(req_blocks):
                if not delay_cache_blocks and self.enable_caching:
                    n_full = (total if total < request.num_tokens else request.num_tokens) // bs
                    if n_full > self.num_cached_block[request_id]:
                        self.cache_blocks(request, n_full * bs)
                return self.empty_kv_cache_blocks

        num_local_computed_tokens = request.num_computed_tokens + num_new_computed_tokens
        total_computed_tokens = min(num_local_computed_tokens + num_external_computed_tokens,
                                    self.max_model_len)
        free = pool.free_block_queue.num_free_blocks
        if full_sequence_must_fit:
            full_num_tokens = min(request.num_tokens, self.max_model_len)
            if self.get_num_blocks_to_allocate(request_id, full_num_tokens, computed_list) > free:
                return None
        num_tokens_need_slot = min(total_computed_tokens + num_new_tokens + num_lookahead_tokens,
                                   self.max_model_len)
        num_blocks_to_allocate = self.get_num_blocks_to_allocate(
            request_id, num_tokens_need_slot, computed_list)
        if num_blocks_to_allocate > free - reserved_blocks:
            return None

        if (computed_list or num_external_computed_tokens > 0) and request_id not in self.num_cached_block:
            # add_local_computed_blocks: touch the hits (paired with adding them).
            if self.enable_caching:
                pool.touch(computed_list)
            req_blocks = self.req_to_blocks.setdefault(request_id, [])
            assert not req_blocks
            req_blocks.extend(computed_list)
            self.num_cached_block[request_id] = len(req_blocks)
            # allocate_external_computed_blocks: blocks the connector will fill.
            if num_external_computed_tokens > 0:
                req_blocks.extend(pool.get_new_blocks(cdiv(total_computed_tokens, bs) - len(req_blocks)))

        # allocate_new_blocks
        if req_blocks is None:
            req_blocks = self.req_to_blocks.setdefault(request_id, [])
        num_new_blocks = cdiv(num_tokens_need_slot, bs) - len(req_blocks)
        new_blocks = pool.get_new_blocks(num_new_blocks) if num_new_blocks > 0 else []
        req_blocks.extend(new_blocks)

        if self.enable_caching and not delay_cache_blocks:
            # Only finalized tokens are cached: capped at request.num_tokens.
            self.cache_blocks(request, min(total_computed_tokens + num_new_tokens, request.num_tokens))
        return KVCacheBlocks(new_blocks) if new_blocks else self.empty_kv_cache_blocks

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Hash and cache the request's full blocks up to `num_tokens` (single_type cache_blocks)."""
        if not self.enable_caching:
            return
        request_id = request.request_id
        num_cached_blocks = self.num_cached_block.get(request_id, 0)
        num_full_blocks = num_tokens // self.block_size
        if num_cached_blocks >= num_full_blocks:
            return
        self.block_pool.cache_full_blocks(request, self.req_to_blocks[request_id],
                                          num_cached_blocks, num_full_blocks, self.block_size)
        self.num_cached_block[request_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Free in reverse order so the tail of the chain is evicted first."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_block.pop(request.request_id, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    def pop_blocks_for_free(self, request: Request) -> list[KVCacheBlock]:
        """Forget the request's blocks without returning them to the pool (kv_cache_manager.py
        pop_blocks_for_free); the caller frees them later, in reverse order. Allocation order."""
        self.num_cached_block.pop(request.request_id, None)
        return self.req_to_blocks.pop(request.request_id, None) or []

    # -- views --------------------------------------------------------------------------
    def get_blocks(self, request_id: str) -> KVCacheBlocks:
        return KVCacheBlocks(list(self.req_to_blocks.get(request_id, ())))

    def get_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        return ([b.block_id for b in self.req_to_blocks.get(request_id, ())],)

    def get_block_ids_for_computed_tokens(self, request_id: str, num_computed_tokens: int) -> tuple[list[int], ...]:
        """Blocks covering the computed tokens (what connectors are handed at finish)."""
        ids = self.get_block_ids(request_id)[0]
        return (ids[: cdiv(num_computed_tokens, self.block_size)],)

    def remaining_blocks(self, request: Request) -> int:
        """Blocks `request` still needs for its whole sequence (scheduler _request_remaining_blocks)."""
        return self.get_num_blocks_to_allocate(
            request.request_id, min(request.num_tokens, self.max_model_len), [])

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    def take_events(self) -> list:
        return self.block_pool.take_events()
