"""labkit's KV-event schema against what vLLM 0.26 really sent and against vLLM's source."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import msgspec
import pytest
import zmq
from labfixtures import FIXTURES

from labkit.telemetry import kv_events as kve
from labkit.telemetry.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventPublisher,
    decode_frames,
    encode_batch,
    encode_frames,
)

KV_DIR = FIXTURES / "kv-events"
VLLM_SRC = Path("/tmp/vllmsrc/vllm/distributed/kv_events.py")
VLLM_COPY = Path(__file__).parent / "data" / "vllm_kv_events_0_26.py"
LABKIT_SRC = Path(kve.__file__)
SCHEMA_CLASSES = [
    "EventBatch",
    "KVCacheEvent",
    "BlockStored",
    "BlockRemoved",
    "AllBlocksCleared",
    "KVEventBatch",
]

needs_fixtures = pytest.mark.skipif(not KV_DIR.exists(), reason="vLLM 0.26 fixtures absent")


def load_messages(name: str) -> list[list[bytes]]:
    """One multipart message per line, frames hex-encoded (fixtures README)."""
    lines = (KV_DIR / name).read_text().splitlines()
    return [[bytes.fromhex(f) for f in json.loads(line)] for line in lines if line.strip()]


# --- schema identity with vLLM's source ------------------------------------------------


def class_shapes(path: Path) -> dict[str, dict]:
    """For each schema class: bases, struct keywords, and annotated fields in order."""
    tree = ast.parse(path.read_text())
    shapes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in SCHEMA_CLASSES:
            fields = [
                (
                    stmt.target.id,
                    ast.unparse(stmt.annotation),
                    None if stmt.value is None else ast.unparse(stmt.value),
                )
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            ]
            shapes[node.name] = {
                "bases": [ast.unparse(b) for b in node.bases],
                "keywords": {k.arg: ast.unparse(k.value) for k in node.keywords},
                "fields": fields,
            }
    return shapes


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(VLLM_SRC, id="tmp-vllmsrc"),
        pytest.param(VLLM_COPY, id="tests-data-copy"),
    ],
)
def test_schema_source_matches_vllm(source: Path) -> None:
    if not source.exists():
        pytest.skip(f"{source} absent")
    theirs = class_shapes(source)
    ours = class_shapes(LABKIT_SRC)
    assert set(theirs) == set(SCHEMA_CLASSES)
    for name in SCHEMA_CLASSES:
        assert ours[name] == theirs[name], name


def test_runtime_structs_match_vllm_copy() -> None:
    """The imported structs (not just the source text) have vLLM's fields, order and tags."""
    theirs = class_shapes(VLLM_COPY if VLLM_COPY.exists() else VLLM_SRC)
    for name in SCHEMA_CLASSES:
        cls = getattr(kve, name)
        expected = [f for f, _, _ in theirs[name]["fields"]]
        # A subclass inherits its parent's fields first (KVEventBatch re-declares `events`).
        for base in theirs[name]["bases"]:
            if base in theirs:
                parent = [f for f, _, _ in theirs[base]["fields"]]
                expected = parent + [f for f in expected if f not in parent]
        assert [f.name for f in msgspec.structs.fields(cls)] == expected, name
    for cls in (BlockStored, BlockRemoved, AllBlocksCleared):
        assert cls.__struct_config__.tag == cls.__name__
        assert cls.__struct_config__.tag_field == "type"
        assert cls.__struct_config__.omit_defaults
    assert KVEventBatch.__struct_config__.array_like


# --- the real captures -------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("name", ["port5557.jsonl", "port5558.jsonl"])
def test_every_fixture_frame_decodes_and_reencodes_byte_for_byte(name: str) -> None:
    messages = load_messages(name)
    assert messages
    seqs = []
    for frames in messages:
        topic, seq, batch = decode_frames(frames)
        seqs.append(seq)
        assert topic == frames[0].decode()
        assert batch.data_parallel_rank == 0
        assert batch.ts > 1.7e9  # a wall-clock time.time()
        assert batch.events
        assert encode_batch(batch) == frames[2]
        assert encode_frames(topic, seq, batch) == frames
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seqs[0] == 0
    assert seqs == list(range(len(seqs)))  # nothing lost during the capture


@needs_fixtures
def test_prefill_engine_block_stored_content() -> None:
    """nixl-prefill (topic "kv"): one 1,088-token prompt -> 68 full blocks of 16 tokens."""
    ((topic, seq, batch),) = [decode_frames(f) for f in load_messages("port5557.jsonl")]
    assert (topic, seq) == ("kv", 0)
    (ev,) = batch.events
    assert isinstance(ev, BlockStored)
    assert ev.block_size == 16 and ev.medium == kve.MEDIUM_GPU
    assert len(ev.block_hashes) * ev.block_size == len(ev.token_ids)
    assert ev.parent_block_hash is None  # the prompt's first block
    assert all(isinstance(h, int) and 0 <= h < 2**64 for h in ev.block_hashes)
    assert len(set(ev.block_hashes)) == len(ev.block_hashes)
    assert ev.kv_cache_spec_kind == "full_attention" and ev.group_idx == 0


@needs_fixtures
def test_offload_engine_stores_evicts_and_offloads() -> None:
    """offload-small (80 GPU blocks, CPU offload): GPU stores, evictions, CPU copies."""
    live_gpu: set[int] = set()
    ever_gpu: set[int] = set()
    cpu: list[int] = []
    num_removed = 0
    for frames in load_messages("port5558.jsonl"):
        topic, _, batch = decode_frames(frames)
        assert topic == ""
        for ev in batch.events:
            if isinstance(ev, BlockStored) and ev.medium == kve.MEDIUM_GPU:
                assert ev.block_size == 16
                assert len(ev.block_hashes) == len(ev.token_ids) // ev.block_size
                assert ev.parent_block_hash is None or ev.parent_block_hash in live_gpu
                live_gpu.update(ev.block_hashes)
                ever_gpu.update(ev.block_hashes)
            elif isinstance(ev, BlockStored):
                assert ev.medium == kve.MEDIUM_CPU
                assert ev.token_ids == [] and ev.block_size == 0  # offload events carry no tokens
                cpu.extend(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                assert ev.medium == kve.MEDIUM_GPU
                assert set(ev.block_hashes) <= live_gpu  # only cached blocks are evicted
                live_gpu.difference_update(ev.block_hashes)
                num_removed += len(ev.block_hashes)
            else:
                assert isinstance(ev, AllBlocksCleared)
    assert num_removed > 0
    assert len(live_gpu) <= 80 - 1  # --num-gpu-blocks-override 80, block 0 is the null block
    assert set(cpu) <= ever_gpu  # the CPU tier holds copies of GPU blocks
    # The same engine's /metrics counted the CPU blocks it asked for.
    metrics = (FIXTURES / "metrics" / "offload-small.txt").read_text()
    line = next(
        ln
        for ln in metrics.splitlines()
        if ln.startswith("vllm:kv_offload_cpu_allocation_size_sum")
    )
    assert len(cpu) == float(line.rsplit(" ", 1)[1])


def test_decode_frames_rejects_malformed() -> None:
    with pytest.raises(ValueError):
        decode_frames([b"kv", b"\x00" * 8])
    with pytest.raises(ValueError):
        decode_frames([b"kv", b"\x00" * 4, b""])
    with pytest.raises(msgspec.DecodeError):
        decode_frames([b"kv", b"\x00" * 8, b"\x93\x01"])


# --- the publisher on a real socket ------------------------------------------------------


def make_batch(i: int) -> KVEventBatch:
    return KVEventBatch(
        ts=time.time(),
        events=[
            BlockStored(
                block_hashes=[i, i + 1],
                parent_block_hash=None,
                token_ids=list(range(32)),
                block_size=16,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            ),
            BlockRemoved(block_hashes=[i], medium="GPU"),
        ],
    )


def test_publisher_sends_vllm_frames_with_monotonic_seq() -> None:
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    with KVEventPublisher("tcp://127.0.0.1:*", topic="kv") as pub:
        sub.connect(pub.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        got: list[tuple[str, int, KVEventBatch]] = []
        deadline = time.monotonic() + 10
        i = 0
        while len(got) < 5 and time.monotonic() < deadline:  # PUB drops until SUB has joined
            pub.publish(make_batch(i))
            i += 1
            if sub.poll(20):
                while sub.poll(0):
                    got.append(decode_frames(sub.recv_multipart()))
    sub.close()
    assert len(got) >= 5
    seqs = [s for _, s, _ in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    topic, seq, batch = got[0]
    assert topic == "kv"
    assert batch.data_parallel_rank == 0  # stamped by the publisher, as vLLM does
    assert batch.events[0].block_hashes == [seq, seq + 1]  # batch i went out as seq i


def test_publisher_replay_returns_buffered_messages() -> None:
    ctx = zmq.Context.instance()
    with KVEventPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") as pub:
        for i in range(6):
            pub.publish(make_batch(i))
        assert pub.flush()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(pub.replay_endpoint)
        dealer.send_multipart([b"", (3).to_bytes(8, "big")])
        replies = []
        while True:
            assert dealer.poll(5000), "no replay answer"
            _, topic, seq_bytes, payload = dealer.recv_multipart()
            if seq_bytes == END_SEQ:
                break
            replies.append(decode_frames([topic, seq_bytes, payload]))
        dealer.close()
    assert [s for _, s, _ in replies] == [3, 4, 5]
    assert [b.events[1].block_hashes for _, _, b in replies] == [[3], [4], [5]]


def test_publisher_refuses_after_close() -> None:
    pub = KVEventPublisher("tcp://127.0.0.1:*")
    pub.close()
    assert not pub._thread.is_alive()
    with pytest.raises(RuntimeError):
        pub.publish(make_batch(0))
