"""The simulated block pool and KV-cache manager follow vLLM's rules
(vllm/v1/core/block_pool.py, kv_cache_utils.py, kv_cache_manager.py)."""
from __future__ import annotations

import time

import pytest

from labkit.engines.sim.block_pool import AllBlocksCleared, BlockPool, BlockRemoved, BlockStored
from labkit.engines.sim.kv_cache_manager import KVCacheManager
from labkit.engines.sim.request import Request, hash_block_tokens_sha256

BS = 16


def make_request(rid: str, tokens: list[int], max_tokens: int = 8, **kw) -> Request:
    return Request(rid, tokens, max_tokens, block_size=BS, **kw)


def run_prefill(kv: KVCacheManager, req: Request) -> list[int]:
    """Admit a waiting request the way the scheduler does; return its block ids."""
    blocks, hits = kv.get_computed_blocks(req)
    new = kv.allocate_slots(req, req.num_tokens - hits, hits, blocks)
    assert new is not None
    req.num_computed_tokens = req.num_tokens
    return kv.get_block_ids(req.request_id)[0]


def test_null_block_is_never_handed_out():
    pool = BlockPool(6)
    assert pool.null_block.block_id == 0 and pool.null_block.is_null
    got = pool.get_new_blocks(5)
    assert [b.block_id for b in got] == [1, 2, 3, 4, 5]
    assert all(b.ref_cnt == 1 for b in got)
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    assert pool.get_usage() == 1.0


def test_usage_excludes_null_block():
    pool = BlockPool(11)
    pool.get_new_blocks(5)
    assert pool.get_usage() == pytest.approx(0.5)  # 5 of the 10 real blocks


def test_chained_hashes():
    a = make_request("a", list(range(64)))
    b = make_request("b", list(range(64)))
    assert len(a.block_hashes) == 4 and a.block_hashes == b.block_hashes
    changed = list(range(64))
    changed[20] = 9999  # inside block 1
    c = make_request("c", changed)
    assert c.block_hashes[0] == a.block_hashes[0]
    assert all(x != y for x, y in zip(c.block_hashes[1:], a.block_hashes[1:], strict=False))
    # Same tokens in block 2 but a different parent: still a different hash.
    assert c.block_hashes[2] != a.block_hashes[2]
    # Only full blocks are hashed; a new one appears when a generated token fills a block.
    d = make_request("d", list(range(31)))
    assert len(d.block_hashes) == 1
    d.append_output_token_id(7)
    assert len(d.block_hashes) == 2
    # vLLM's sha256 algorithm chains the same way.
    s1 = make_request("s1", list(range(48)), hash_fn=hash_block_tokens_sha256)
    s2 = make_request("s2", list(range(48)), hash_fn=hash_block_tokens_sha256)
    assert s1.block_hashes == s2.block_hashes and len(set(s1.block_hashes)) == 3


def test_prefix_hit_never_includes_last_token():
    kv = KVCacheManager(32, BS, 4096)
    first = make_request("a", list(range(64)))
    run_prefill(kv, first)
    kv.free(first)
    same = make_request("b", list(range(64)))  # 4 full blocks, all cached
    blocks, hits = kv.get_computed_blocks(same)
    assert hits == 48 and len(blocks.blocks) == 3  # block 4 holds the last token: recomputed
    longer = make_request("c", list(range(65)))
    _, hits = kv.get_computed_blocks(longer)
    assert hits == 64
    assert kv.prefix_cache_stats.queries == 64 + 65 + 64
    assert kv.prefix_cache_stats.hits == 48 + 64


def test_touch_and_ref_counts_on_shared_prefix():
    kv = KVCacheManager(32, BS, 4096)
    a = make_request("a", list(range(40)))
    ids_a = run_prefill(kv, a)
    b = make_request("b", list(range(32)) + [777] * 8)
    ids_b = run_prefill(kv, b)
    assert ids_b[:2] == ids_a[:2] and ids_b[2] != ids_a[2]
    pool = kv.block_pool
    assert [pool.blocks[i].ref_cnt for i in ids_a] == [2, 2, 1]
    states = pool.block_states()
    assert states[ids_a[0]] == 3 and states[ids_a[2]] == 2 and states[ids_b[2]] == 2
    kv.free(a)
    assert [pool.blocks[i].ref_cnt for i in ids_a] == [1, 1, 0]
    states = pool.block_states()
    assert states[ids_a[0]] == 2 and states[ids_a[2]] == 0  # block 3 of a: partial, no hash
    kv.free(b)
    states = pool.block_states()
    assert states[ids_a[0]] == 1 and states[ids_a[1]] == 1  # free but cached
    assert pool.get_num_free_blocks() == 31


def test_eviction_is_lru_and_tail_first():
    # 4 usable blocks.
    kv = KVCacheManager(5, BS, 4096, enable_kv_cache_events=True)
    pool = kv.block_pool
    a = make_request("a", list(range(63)))  # blocks 1-4, 3 full (cached) + 1 partial
    ids = run_prefill(kv, a)
    assert ids == [1, 2, 3, 4]
    hashes = list(a.block_hashes)
    kv.free(a)
    # Freed in reverse: the unhashed partial block goes to the head, hashed ones to the
    # tail with the chain's tail first.
    assert [b.block_id for b in pool.free_block_queue.get_all_free_blocks()] == [4, 3, 2, 1]
    kv.take_events()
    b = make_request("b", [5000 + i for i in range(20)])  # needs 2 blocks
    ids_b = run_prefill(kv, b)
    assert ids_b == [4, 3]  # the unhashed block, then a's LAST cached block
    removed = [e for e in kv.take_events() if isinstance(e, BlockRemoved)]
    assert [e.block_hashes for e in removed] == [[hashes[2]]]
    # a's first two blocks are still a prefix hit.
    again = make_request("a2", list(range(63)))
    _, hits = kv.get_computed_blocks(again)
    assert hits == 32


def test_lru_order_across_requests():
    kv = KVCacheManager(9, BS, 4096)
    pool = kv.block_pool
    old = make_request("old", list(range(32)) + [1])
    new = make_request("new", [900 + i for i in range(32)] + [1])
    run_prefill(kv, old)
    run_prefill(kv, new)
    kv.free(old)  # freed first: least recently used
    kv.free(new)
    order = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
    # old held 1,2 (full) + 3 (partial), new 4,5 + 6; 7,8 were never used.
    assert order == [6, 3, 7, 8, 2, 1, 5, 4]  # unhashed first, then LRU, each chain tail-first


def test_allocate_slots_returns_none_when_full_and_whole_prompt_gate():
    kv = KVCacheManager(5, BS, 4096)  # 4 usable blocks = 64 token slots
    big = make_request("big", list(range(100)))
    blocks, hits = kv.get_computed_blocks(big)
    # A 32-token chunk fits, but the whole-prompt admission gate (vLLM 0.26 default) says no.
    assert kv.allocate_slots(big, 32, hits, blocks, full_sequence_must_fit=True) is None
    assert kv.allocate_slots(big, 32, hits, blocks) is not None
    assert kv.block_pool.get_num_free_blocks() == 2
    big.num_computed_tokens = 32
    assert kv.allocate_slots(big, 64) is None  # 96 slots > 64 that exist
    assert kv.block_pool.get_num_free_blocks() == 2  # a failed allocation takes nothing
    with pytest.raises(ValueError):
        kv.allocate_slots(big, 0)


def test_kv_events_and_reset():
    kv = KVCacheManager(16, BS, 4096, enable_kv_cache_events=True)
    req = make_request("a", list(range(50)))
    run_prefill(kv, req)
    events = kv.take_events()
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert len(stored) == 1
    ev = stored[0]
    assert ev.block_hashes == req.block_hashes and ev.parent_block_hash is None
    assert ev.token_ids == list(range(48)) and ev.block_size == BS and ev.medium == "GPU"
    # Decode fills block 4: one more BlockStored chained to block 3.
    for t in range(14):
        req.append_output_token_id(t)
        assert kv.allocate_slots(req, 1) is not None
        req.num_computed_tokens += 1
    more = [e for e in kv.take_events() if isinstance(e, BlockStored)]
    assert len(more) == 1 and more[0].parent_block_hash == req.block_hashes[2]
    assert not kv.reset_prefix_cache()  # blocks still in use
    kv.free(req)
    assert kv.reset_prefix_cache()
    assert isinstance(kv.take_events()[-1], AllBlocksCleared)
    assert set(kv.block_pool.block_states()) == {0}


def test_block_states_fast_for_100k_blocks():
    pool = BlockPool(100_000)
    blocks = pool.get_new_blocks(60_000)
    pool.touch(blocks[:1000])
    pool.free_blocks(reversed(blocks[30_000:]))
    t0 = time.perf_counter()
    for _ in range(10):
        states = pool.block_states()
    per_call = (time.perf_counter() - t0) / 10
    assert len(states) == 100_000
    assert states[1] == 3 and states[2000] == 2 and states[50_000] == 0
    assert per_call < 0.005
