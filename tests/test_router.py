"""The xPyD router: the prefix index follows an engine's KV events the way vLLM's prefix cache
finds hits, each policy picks what it says and says why, and on a shared-prefix chat workload
through 2 simulated prefill engines the KV-aware policy finds more prefix-hit tokens than
round-robin."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from labfixtures import FIXTURES

from labkit.bench.routing import ChatWorkload, simulate, table
from labkit.engines.sim.block_pool import AllBlocksCleared, BlockRemoved, BlockStored
from labkit.engines.sim.request import Request
from labkit.pd.router import POLICIES, EngineLoad, PrefixIndex, Router
from labkit.telemetry.kv_events import decode_batch
from labkit.telemetry.metrics import MetricsSnapshot

BS = 16


def stored(tokens: list[int], hashes: list[int], parent: int | None = None) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS)


def tokens(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


# ------------------------------------------------------------------ prefix index
def test_index_keys_are_the_simulators_block_hashes():
    prompt = tokens(100)
    req = Request("r", prompt, 1, block_size=BS)
    assert PrefixIndex(BS).block_keys(prompt) == req.block_hashes
    assert len(req.block_hashes) == 6  # full blocks only


def test_index_rehashes_foreign_hashes_and_caps_at_len_minus_one():
    """Engine hashes are opaque (real vLLM: sha256 with a random seed): the index keys
    blocks by their token ids and parent, so any hash values work."""
    idx = PrefixIndex(BS)
    prompt = tokens(64)  # 4 full blocks
    idx.apply("p0", [stored(prompt[:32], [901, 902]), stored(prompt[32:], [903, 904], parent=902)])
    assert idx.num_blocks("p0") == 4
    assert idx.match(prompt + [7]) == {"p0": 64}
    # vLLM recomputes the last token: a prompt of exactly 4 blocks hits 3 of them
    assert idx.match(prompt) == {"p0": 48}
    # a prompt that diverges in block 2 hits blocks 0-1 only
    other = prompt[:40] + [5] * 30
    assert idx.match(other) == {"p0": 32}


def test_index_follows_removals_duplicates_and_clears():
    idx = PrefixIndex(BS)
    prompt = tokens(64)
    idx.apply("p0", [stored(prompt, [1, 2, 3, 4])])
    idx.apply("p0", [stored(prompt[:16], [1])])  # a second block with the same hash
    idx.apply("p0", [BlockRemoved(block_hashes=[1])])
    assert idx.match(prompt + [0])["p0"] == 64  # one copy of block 0 is still cached
    idx.apply("p0", [BlockRemoved(block_hashes=[3])])
    assert idx.match(prompt + [0])["p0"] == 32  # the run ends where block 2 was evicted
    idx.apply("p0", [BlockRemoved(block_hashes=[1])])
    assert idx.match(prompt + [0])["p0"] == 0
    idx.apply("p0", [stored(prompt, [1, 2, 3, 4]), AllBlocksCleared()])
    assert idx.match(prompt + [0])["p0"] == 0 and idx.num_blocks("p0") == 0


def test_index_skips_orphans_and_other_media():
    idx = PrefixIndex(BS)
    prompt = tokens(32)
    idx.apply("p0", [stored(prompt[16:], [2], parent=99)])  # parent never seen
    cpu = stored(prompt, [1, 2])
    cpu.medium = "CPU"
    idx.apply("p0", [cpu])
    assert idx.num_orphans == 1 and idx.num_blocks("p0") == 0
    with pytest.raises(ValueError, match="block_size"):
        idx.apply("p0", [BlockStored([1], None, tokens(32), 32)])


def test_index_on_real_vllm_kv_events():
    """vLLM 0.26's own frames (sha256 int hashes, GPU and CPU-offload media): the index
    holds exactly the GPU blocks stored minus those removed, and finds the last prompt."""
    idx = PrefixIndex(BS)
    held: Counter = Counter()
    last = None
    for line in (FIXTURES / "kv-events" / "port5558.jsonl").read_text().splitlines():
        batch = decode_batch(bytes.fromhex(json.loads(line)[2]))
        idx.apply_batch("p0", batch)
        for ev in batch.events:
            name = type(ev).__name__
            if name == "BlockStored" and ev.medium == "GPU":
                held.update(ev.block_hashes)
                last = list(ev.token_ids)
            elif name == "BlockRemoved" and ev.medium == "GPU":
                held.subtract(ev.block_hashes)
    assert idx.num_blocks("p0") == sum(1 for v in held.values() if v > 0) > 0
    assert idx.match(last + [1]) == {"p0": len(last)}
    one = (FIXTURES / "kv-events" / "port5557.jsonl").read_text().splitlines()[0]
    batch = decode_batch(bytes.fromhex(json.loads(one)[2]))
    idx.apply_batch("p1", batch)
    prompt = list(batch.events[0].token_ids)
    assert idx.match(prompt + [1]) == {"p0": 0, "p1": 1088}


# ------------------------------------------------------------------ policies
def test_load_from_real_vllm_metrics():
    snap = MetricsSnapshot.parse((FIXTURES / "metrics" / "nixl-prefill.txt").read_text())
    load = EngineLoad.from_metrics("p0", snap)
    assert load.num_gpu_blocks == 11823
    assert load.num_queued == 0 and load.num_free_blocks == round(11823 * (1 - load.kv_cache_usage))


def test_round_robin_and_least_loaded():
    r = Router(["p0", "p1"], ["d0", "d1"])
    picks = [r.route_prefill(tokens(40)).engine for _ in range(4)]
    assert picks == ["p0", "p1", "p0", "p1"]
    r.policy = "least-loaded"
    loads = [EngineLoad("p0", 3, 1, 0.1), EngineLoad("p1", 1, 0, 0.5)]
    d = r.route_prefill(tokens(40), loads)
    assert d.engine == "p1" and d.policy == "least-loaded"
    assert "1 running + 0 waiting" in d.reason and d.numbers["p0"]["running"] == 3
    # same queue: the lower KV usage wins
    dd = r.route_decode(100, [EngineLoad("d0", 2, 0, 0.7), EngineLoad("d1", 2, 0, 0.2)])
    assert dd.engine == "d1"
    with pytest.raises(ValueError, match="unknown routing policy"):
        r.policy = "random"  # type: ignore[assignment]


def test_kv_aware_prefers_the_longest_prefix_unless_its_queue_outweighs_it():
    r = Router(["p0", "p1"], ["d0"], "kv-aware", queue_penalty_tokens=256)
    system = tokens(512)
    r.index.apply("p1", [stored(system, list(range(1, 33)))])
    prompt = system + tokens(100, start=5000)
    d = r.route_prefill(prompt)
    assert d.engine == "p1" and d.numbers["p1"]["hit_tokens"] == 512
    assert "longest cached prefix: 512 of 612" in d.reason
    # p1 has 3 requests queued: 512 - 3 * 256 < 0 - 0 * 256
    d = r.route_prefill(prompt, [EngineLoad("p1", 2, 1), EngineLoad("p0")])
    assert d.engine == "p0" and "p1 holds 512 cached tokens but has 3 requests" in d.reason
    # nothing cached anywhere: the fewest requests
    d = r.route_prefill(tokens(100, start=9000), [EngineLoad("p0", 1), EngineLoad("p1")])
    assert d.engine == "p1" and d.reason.startswith("no engine holds a prefix")
    ev = d.to_event()
    assert json.loads(json.dumps(ev)) == ev and ev["phase"] == "prefill"


def test_kv_aware_decode_needs_room_then_fewest_requests():
    r = Router(["p0"], ["d0", "d1", "d2"], "kv-aware")
    loads = [EngineLoad("d0", 0, 0, 0.99, 1000),  # 10 free blocks: no room for 13
             EngineLoad("d1", 4, 0, 0.5, 1000), EngineLoad("d2", 2, 0, 0.9, 1000)]
    d = r.route_decode(200, loads)  # 13 blocks
    assert d.engine == "d2" and d.numbers["d0"]["free_blocks"] == 10
    full = [EngineLoad("d0", 0, 0, 1.0, 1000), EngineLoad("d1", 0, 0, 0.995, 1000),
            EngineLoad("d2", 0, 0, 0.999, 1000)]
    d = r.route_decode(200, full)
    assert d.engine == "d1" and "waits there" in d.reason


# ------------------------------------------------------------------ measured on the simulator
@pytest.fixture(scope="module")
def chat_results():
    wl = ChatWorkload()  # 16 conversations x 5 turns, one 512-token system prompt
    return {p: simulate(p, wl) for p in POLICIES}


def test_kv_aware_finds_more_prefix_hits_than_round_robin(chat_results):
    rr, kv = chat_results["round-robin"], chat_results["kv-aware"]
    # measured: round-robin 60,336 hit tokens (66.1 %), kv-aware 72,272 (79.2 %)
    assert kv.total_hit_tokens >= 1.1 * rr.total_hit_tokens
    assert kv.hit_rate - rr.hit_rate >= 0.08
    assert sum(kv.query_tokens.values()) == sum(rr.query_tokens.values())  # same prompts
    assert all(len(r.records) == 80 and all(x.finish is not None for x in r.records)
               for r in chat_results.values())
    assert rr.requests == {"prefill-0": 40, "prefill-1": 40}
    assert "kv-aware" in table(list(chat_results.values()))


def test_the_index_predicts_the_engines_hits(chat_results):
    """Events reach the index when the step that made them ends; with no eviction in
    between, what the router expects is what the engine's prefix cache finds."""
    kv = chat_results["kv-aware"]
    assert all(r.predicted_hit_tokens == r.hit_tokens for r in kv.records)
    assert sum(r.hit_tokens for r in kv.records) == kv.total_hit_tokens


def test_kv_aware_spreads_when_queues_build():
    wl = ChatWorkload(num_conversations=32, rate=64.0)
    kv = simulate("kv-aware", wl)
    rr = simulate("round-robin", wl)
    assert min(kv.requests.values()) >= 20  # the queue term moves requests to prefill-1
    assert kv.total_hit_tokens > rr.total_hit_tokens
