"""The simulated KV-cache block pool: vLLM's BlockPool, free-block queue and prefix-cache map.

Rules copied from vllm/v1/core/block_pool.py and vllm/v1/core/kv_cache_utils.py:

- Every block is a `KVCacheBlock(block_id, ref_cnt, block_hash)`. Block 0 is the null block:
  popped from the free queue at start-up and never handed out (allocation starts at 1).
- Free blocks sit in a doubly linked list in eviction order: allocation pops from the head.
  A freed request's blocks are passed in REVERSE order (the tail of the chain first), hashed
  ones are appended at the tail and unhashed ones prepended at the head (they can never hit):

      head -> [unhashed ... ] [older cached blocks ...] [req tail ... req head] <- tail
              evicted first                                       evicted last

- A full block gets a chained hash (parent hash + its token ids) and enters the prefix-cache
  map (BlockStored event). Reusing it `touch()`es it (ref_cnt + 1, out of the free queue).
  Handing a cached free block out evicts it: the hash leaves the map (BlockRemoved event).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from labkit.engines.sim.request import Request
from labkit.vocab import (  # one byte per block for the views
    BLOCK_CACHED,
    BLOCK_FREE,
    BLOCK_IN_USE,
    BLOCK_SHARED,
)

MEDIUM_GPU = "GPU"



@dataclass(slots=True)
class BlockStored:
    """vllm/distributed/kv_events.py BlockStored (the server converts it to the msgspec struct)."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None


@dataclass(slots=True)
class BlockRemoved:
    """vllm/distributed/kv_events.py BlockRemoved."""

    block_hashes: list[int]
    medium: str | None = MEDIUM_GPU


@dataclass(slots=True)
class AllBlocksCleared:
    """vllm/distributed/kv_events.py AllBlocksCleared."""


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVCacheBlock:
    """vllm/v1/core/kv_cache_utils.py KVCacheBlock: id, reference count, hash, free-list links."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free_block", "next_free_block", "is_null")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.prev_free_block: KVCacheBlock | None = None
        self.next_free_block: KVCacheBlock | None = None
        self.is_null = False

    def __repr__(self) -> str:
        return f"KVCacheBlock(block_id={self.block_id}, ref_cnt={self.ref_cnt}, block_hash={self.block_hash})"


class FreeKVCacheBlockQueue:
    """vllm/v1/core/kv_cache_utils.py FreeKVCacheBlockQueue: O(1) removal from the middle.

    Ordered by block id at start; afterwards LRU at the head. Fake head/tail sentinels are
    never popped, so every real block in the queue has both neighbours.
    """

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self.num_free_blocks = len(blocks)
        for i in range(1, len(blocks)):
            blocks[i].prev_free_block = blocks[i - 1]
            blocks[i - 1].next_free_block = blocks[i]
        self.fake_free_list_head = KVCacheBlock(-1)
        self.fake_free_list_tail = KVCacheBlock(-1)
        if blocks:
            self.fake_free_list_head.next_free_block = blocks[0]
            blocks[0].prev_free_block = self.fake_free_list_head
            self.fake_free_list_tail.prev_free_block = blocks[-1]
            blocks[-1].next_free_block = self.fake_free_list_tail
        else:
            self.fake_free_list_head.next_free_block = self.fake_free_list_tail
            self.fake_free_list_tail.prev_free_block = self.fake_free_list_head

    def popleft(self) -> KVCacheBlock:
        first = self.fake_free_list_head.next_free_block
        if first is self.fake_free_list_tail or first is None:
            raise ValueError("No free blocks available")
        self.fake_free_list_head.next_free_block = first.next_free_block
        first.next_free_block.prev_free_block = self.fake_free_list_head  # type: ignore[union-attr]
        first.prev_free_block = first.next_free_block = None
        self.num_free_blocks -= 1
        return first

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        if n == 0:
            return []
        assert self.num_free_blocks >= n
        self.num_free_blocks -= n
        curr = self.fake_free_list_head.next_free_block
        ret = []
        for _ in range(n):
            ret.append(curr)
            last = curr
            curr = curr.next_free_block  # type: ignore[union-attr]
            last.prev_free_block = last.next_free_block = None  # type: ignore[union-attr]
        self.fake_free_list_head.next_free_block = curr
        curr.prev_free_block = self.fake_free_list_head  # type: ignore[union-attr]
        return ret  # type: ignore[return-value]

    def remove(self, block: KVCacheBlock) -> None:
        if block.prev_free_block is None or block.next_free_block is None:
            raise RuntimeError(f"remove() called on an invalid block: {block}")
        block.prev_free_block.next_free_block = block.next_free_block
        block.next_free_block.prev_free_block = block.prev_free_block
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append_n(self, blocks: list[KVCacheBlock]) -> None:
        if not blocks:
            return
        last = self.fake_free_list_tail.prev_free_block
        for block in blocks:
            block.prev_free_block = last
            last.next_free_block = block  # type: ignore[union-attr]
            last = block
        last.next_free_block = self.fake_free_list_tail
        self.fake_free_list_tail.prev_free_block = last
        self.num_free_blocks += len(blocks)

    def prepend_n(self, blocks: list[KVCacheBlock]) -> None:
        if not blocks:
            return
        first = self.fake_free_list_head.next_free_block
        prev = self.fake_free_list_head
        for block in blocks:
            block.prev_free_block = prev
            prev.next_free_block = block
            prev = block
        prev.next_free_block = first
        first.prev_free_block = prev  # type: ignore[union-attr]
        self.num_free_blocks += len(blocks)

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """Free blocks in eviction order (head first); for tests and views."""
        ret = []
        curr = self.fake_free_list_head.next_free_block
        while curr is not None and curr is not self.fake_free_list_tail:
            ret.append(curr)
            curr = curr.next_free_block
        return ret


class BlockPool:
    """vllm/v1/core/block_pool.py BlockPool: allocate, free, cache and evict KV blocks.

    Args:
        num_gpu_blocks: blocks in the pool, the null block included.
        enable_caching: prefix caching (vLLM's default: on).
        enable_kv_cache_events: queue BlockStored / BlockRemoved / AllBlocksCleared.
    """

    def __init__(self, num_gpu_blocks: int, enable_caching: bool = True,
                 enable_kv_cache_events: bool = False) -> None:
        assert num_gpu_blocks > 1, "need the null block and at least one more"
        self.num_gpu_blocks = num_gpu_blocks
        self.enable_caching = enable_caching
        self.enable_kv_cache_events = enable_kv_cache_events
        self.blocks = [KVCacheBlock(i) for i in range(num_gpu_blocks)]
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks)
        # {block_hash: KVCacheBlock | {block_id: KVCacheBlock}} (BlockHashToBlockMap): blocks
        # are not de-duplicated so block tables stay append-only.
        self.cached_block_hash_to_block: dict[int, KVCacheBlock | dict[int, KVCacheBlock]] = {}
        self.null_block = self.free_block_queue.popleft()
        self.null_block.is_null = True
        self.kv_event_queue: list[KVCacheEvent] = []
        # Kept incrementally so a snapshot of 100k blocks is one bytes() copy.
        self._states = bytearray(num_gpu_blocks)

    # -- prefix-cache map -------------------------------------------------------------
    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        """Any block cached under `block_hash` (the first if duplicated), or None."""
        blocks = self.cached_block_hash_to_block.get(block_hash)
        if blocks is None or isinstance(blocks, KVCacheBlock):
            return blocks
        return next(iter(blocks.values()))

    def _insert(self, block_hash: int, block: KVCacheBlock) -> None:
        cache = self.cached_block_hash_to_block
        blocks = cache.get(block_hash)
        if blocks is None:
            cache[block_hash] = block
        elif isinstance(blocks, KVCacheBlock):
            cache[block_hash] = {blocks.block_id: blocks, block.block_id: block}
        else:
            blocks[block.block_id] = block

    def _pop(self, block_hash: int, block_id: int) -> KVCacheBlock | None:
        cache = self.cached_block_hash_to_block
        blocks = cache.pop(block_hash, None)
        if blocks is None:
            return None
        if isinstance(blocks, KVCacheBlock):
            if blocks.block_id == block_id:
                return blocks
            cache[block_hash] = blocks
            return None
        block = blocks.pop(block_id, None)
        if blocks:
            cache[block_hash] = blocks
        return block

    def cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock],
                          num_cached_blocks: int, num_full_blocks: int, block_size: int) -> None:
        """Give blocks[num_cached_blocks:num_full_blocks] their hashes (block_pool.py cache_full_blocks)."""
        if num_cached_blocks >= num_full_blocks:
            return
        block_hashes = request.block_hashes
        events = self.enable_kv_cache_events
        new_hashes: list[int] = []
        cache = self.cached_block_hash_to_block
        for i in range(num_cached_blocks, num_full_blocks):
            blk = blocks[i]
            if blk.is_null or blk.block_hash is not None:
                continue
            h = block_hashes[i]
            blk.block_hash = h
            if h in cache:
                self._insert(h, blk)
            else:
                cache[h] = blk
            if events:
                new_hashes.append(h)
        if events and new_hashes:
            parent = block_hashes[num_cached_blocks - 1] if num_cached_blocks > 0 else None
            self.kv_event_queue.append(BlockStored(
                block_hashes=new_hashes,
                parent_block_hash=parent,
                token_ids=request.all_token_ids[num_cached_blocks * block_size:num_full_blocks * block_size],
                block_size=block_size,
            ))

    # -- allocate / touch / free --------------------------------------------------------
    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop `num_blocks` from the head of the free queue, evicting cached ones (ref_cnt -> 1).

        FreeKVCacheBlockQueue.popleft_n and the eviction loop, fused (hot path).
        """
        queue = self.free_block_queue
        if num_blocks > queue.num_free_blocks:
            raise ValueError(f"Cannot get {num_blocks} free blocks from the pool")
        if num_blocks == 0:
            return []
        queue.num_free_blocks -= num_blocks
        states = self._states
        curr = queue.fake_free_list_head.next_free_block
        ret = []
        for _ in range(num_blocks):
            block = curr
            curr = block.next_free_block
            block.prev_free_block = block.next_free_block = None
            if block.block_hash is not None:
                self._maybe_evict_cached_block(block)
            block.ref_cnt = 1
            states[block.block_id] = BLOCK_IN_USE
            ret.append(block)
        queue.fake_free_list_head.next_free_block = curr
        curr.prev_free_block = queue.fake_free_list_head
        return ret

    def _maybe_evict_cached_block(self, block: KVCacheBlock) -> bool:
        """Drop a block's hash from the prefix cache (block_pool.py _maybe_evict_cached_block)."""
        h = block.block_hash
        if h is None:
            return False
        block.block_hash = None
        if self._pop(h, block.block_id) is None:
            return False
        if self.enable_kv_cache_events:
            self.kv_event_queue.append(BlockRemoved(block_hashes=[h]))
        return True

    def touch(self, blocks: Sequence[KVCacheBlock]) -> None:
        """A prefix-cache hit: ref_cnt + 1, and out of the free queue if it was free."""
        states = self._states
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1
            states[block.block_id] = BLOCK_IN_USE if block.ref_cnt == 1 else BLOCK_SHARED

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """ref_cnt - 1; blocks reaching 0 go back: unhashed to the head, hashed to the tail.

        `ordered_blocks` is in eviction priority (callers pass a request's blocks reversed).
        """
        with_hash: list[KVCacheBlock] = []
        without_hash: list[KVCacheBlock] = []
        states = self._states
        for block in ordered_blocks:
            block.ref_cnt -= 1
            rc = block.ref_cnt
            if rc == 0:
                if block.is_null:
                    continue
                if block.block_hash is None:
                    without_hash.append(block)
                    states[block.block_id] = BLOCK_FREE
                else:
                    with_hash.append(block)
                    states[block.block_id] = BLOCK_CACHED
            else:
                states[block.block_id] = BLOCK_IN_USE if rc == 1 else BLOCK_SHARED
        self.free_block_queue.prepend_n(without_hash)
        self.free_block_queue.append_n(with_hash)

    def evict_blocks(self, block_ids: set[int]) -> None:
        """Drop cached hashes of the given blocks (block_pool.py evict_blocks)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if self._maybe_evict_cached_block(block) and block.ref_cnt == 0:
                self._states[block_id] = BLOCK_FREE

    def reset_prefix_cache(self) -> bool:
        """Forget every hash; only when nothing but the null block is in use."""
        if self.num_gpu_blocks - self.get_num_free_blocks() != 1:
            return False
        self.cached_block_hash_to_block = {}
        for block in self.blocks:
            block.block_hash = None
        self._states = bytearray(self.num_gpu_blocks)
        if self.enable_kv_cache_events:
            self.kv_event_queue.append(AllBlocksCleared())
        return True

    # -- observability ------------------------------------------------------------------
    def get_num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    def get_usage(self) -> float:
        """vLLM's kv_cache_usage: 1 - free / (total - null block)."""
        total = self.num_gpu_blocks - 1
        return 1.0 - self.free_block_queue.num_free_blocks / total if total else 0.0

    def block_states(self) -> bytes:
        """One byte per physical block: 0 free, 1 free but cached, 2 ref 1, 3 ref >= 2.

        The null block (0) has ref_cnt 0 and no hash, so it reads 0, as an observer reading
        vLLM's pool would see it.
        """
        return bytes(self._states)

    def take_events(self) -> list[KVCacheEvent]:
        """Atomically take all queued KV-cache events."""
        events, self.kv_event_queue = self.kv_event_queue, []
        return events
