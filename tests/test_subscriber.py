"""Publishers -> subscribers over real ZMQ sockets on 127.0.0.1; observer schema round trip."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import msgspec
import pytest
import zmq
from labfixtures import FIXTURES

from labkit.telemetry.kv_events import (
    BlockStored,
    KVEventBatch,
    KVEventPublisher,
    decode_frames,
)
from labkit.telemetry.observer_schema import (
    BLOCK_CACHED,
    BLOCK_FREE,
    BLOCK_IN_USE,
    BLOCK_SHARED,
    OBS_TOPIC,
    KVTransfer,
    LayerTiming,
    ObserverBatch,
    ObserverPublisher,
    PoolSnapshot,
    RequestAllocated,
    RequestFinished,
    StepScheduled,
    decode_observer_batch,
    decode_observer_frames,
    encode_observer_batch,
)
from labkit.telemetry.subscriber import KVEventMessage, KVEventSubscriber, ObserverSubscriber

KV_FIXTURE = FIXTURES / "kv-events" / "port5558.jsonl"


def labkit_threads() -> list[threading.Thread]:
    names = {"kv-event-subscriber", "observer-subscriber", "kv-event-publisher"}
    return [t for t in threading.enumerate() if t.name in names and t.is_alive()]


def until(cond: Callable[[], bool], send: Callable[[], object], timeout: float = 10.0) -> None:
    """Send until `cond` holds: PUB drops messages until the SUB's subscription arrives."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        send()
        time.sleep(0.01)


def stored(i: int) -> KVEventBatch:
    ev = BlockStored([i], None, list(range(16)), 16, None, "GPU", None)
    return KVEventBatch(ts=time.time(), events=[ev])


def all_observer_events() -> list:
    now = time.time()
    return [
        StepScheduled(
            step=7,
            ts=now,
            token_budget=2048,
            num_scheduled_tokens={"r1": 512, "r2": 1},
            new_block_ids={"r1": [1, 2, 3]},
            num_computed_tokens={"r1": 0, "r2": 40},
            preempted=[],
            finished=["r0"],
        ),
        RequestAllocated(ts=now, req_id="r1", block_ids=[1, 2, 3], num_external_tokens=32),
        RequestFinished(ts=now, req_id="r1", block_ids=[1, 2, 3], delay_free=True),
        PoolSnapshot(
            ts=now,
            num_blocks=5,
            num_free=2,
            block_state=bytes([BLOCK_FREE, BLOCK_CACHED, BLOCK_IN_USE, BLOCK_SHARED, BLOCK_FREE]),
        ),
        LayerTiming(
            ts=now,
            op="save",
            layer="model.layers.0.self_attn.attn",
            start=now - 0.01,
            end=now,
            num_bytes=65536 * 512,
            req_ids=["r1"],
        ),
        KVTransfer(
            ts=now,
            req_id="r1",
            direction="send",
            num_tokens=512,
            num_bytes=65536 * 512,
            start=now - 0.02,
            end=now,
            connector="ExampleConnector",
        ),
    ]


# --- observer schema ---------------------------------------------------------------------


def test_observer_batch_round_trip_keeps_every_event_kind() -> None:
    batch = ObserverBatch("prefill-0", "prefill", "sim", time.time(), all_observer_events())
    payload = encode_observer_batch(batch)
    back = decode_observer_batch(payload)
    assert back == batch
    assert [type(e).__name__ for e in back.events] == [
        "StepScheduled",
        "RequestAllocated",
        "RequestFinished",
        "PoolSnapshot",
        "LayerTiming",
        "KVTransfer",
    ]
    # Tagged like vLLM's KV events: {"type": "<class name>", ...}
    raw = msgspec.msgpack.decode(payload)
    assert raw["events"][0]["type"] == "StepScheduled"
    assert isinstance(raw["events"][3]["block_state"], bytes)


def test_observer_decode_rejects_bad_input() -> None:
    bad = msgspec.msgpack.encode(
        {
            "engine_id": "e",
            "role": "r",
            "kind": "sim",
            "ts": 0.0,
            "events": [{"type": "LayerTiming", "op": "copy"}],
        }
    )
    with pytest.raises(msgspec.ValidationError):
        decode_observer_batch(bad)
    with pytest.raises(ValueError):
        decode_observer_frames([b"other-topic", b""])


def test_observer_publisher_to_subscriber() -> None:
    with ObserverPublisher(
        "tcp://127.0.0.1:*", engine_id="decode-0", role="decode", kind="sim"
    ) as pub:
        with ObserverSubscriber(pub.endpoint) as sub:
            events = all_observer_events()
            until(lambda: sub.num_received > 0, lambda: pub.publish(events))
            got = sub.get(timeout=2)
    assert (got.engine_id, got.role, got.kind) == ("decode-0", "decode", "sim")
    assert got.events == events
    assert pub.num_sent >= 1 and pub.num_errors == 0


def test_many_observer_publishers_connect_to_one_bound_subscriber() -> None:
    """Scheduler and worker processes each connect; the lab binds one SUB."""
    with ObserverSubscriber("tcp://127.0.0.1:*", bind=True) as sub:
        pubs = [ObserverPublisher(sub.endpoint, engine_id=f"e{i}", bind=False) for i in range(2)]
        seen: set[str] = set()

        def send() -> None:
            for p in pubs:
                p.publish([RequestAllocated(time.time(), "r", [1], 0)])
            seen.update(b.engine_id for b in sub.drain())

        until(lambda: seen == {"e0", "e1"}, send)
        for p in pubs:
            p.close()


def test_observer_publisher_never_blocks_and_counts_drops() -> None:
    """A subscriber that stops reading must cost the engine nothing but dropped batches."""
    ctx = zmq.Context.instance()
    with ObserverPublisher("tcp://127.0.0.1:*", sndhwm=4) as pub:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 4)
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(pub.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, OBS_TOPIC)
        until(lambda: sub.poll(0), lambda: pub.publish([]))
        big = [PoolSnapshot(0.0, 1 << 20, 0, bytes(1 << 20))]  # 1 MiB per batch
        t0 = time.perf_counter()
        results = [pub.publish(big) for _ in range(300)]
        elapsed = time.perf_counter() - t0
        sub.close()
    assert pub.num_dropped > 0 and results.count(False) == pub.num_dropped
    assert elapsed < 5.0  # 300 MiB offered: it must drop, not wait for the reader
    assert pub.publish(big) is False  # after close: dropped, no exception
    assert pub.num_errors == 0


# --- KV events ---------------------------------------------------------------------------


def test_kv_publisher_to_subscriber_queue_mode() -> None:
    before = set(labkit_threads())
    with KVEventPublisher("tcp://127.0.0.1:*", topic="kv") as pub:
        sub = KVEventSubscriber(pub.endpoint, topic="kv")
        i = iter(range(10**6))
        until(lambda: sub.num_received >= 20, lambda: pub.publish(stored(next(i))))
        msgs = sub.drain()
        sub.close()
    assert not sub.is_alive
    assert set(labkit_threads()) <= before  # publisher and subscriber threads are gone
    assert len(msgs) >= 20 and all(isinstance(m, KVEventMessage) for m in msgs)
    seqs = [m.seq for m in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert sub.num_missed == 0
    # Published batch i carries block hash i and goes out as sequence number i.
    assert all(m.batch.events[0].block_hashes == [m.seq] for m in msgs)
    assert all(m.topic == "kv" for m in msgs)


def test_kv_subscriber_callback_mode_and_topic_filter() -> None:
    got: list[KVEventMessage] = []
    with (
        KVEventPublisher("tcp://127.0.0.1:*", topic="other") as other,
        KVEventPublisher("tcp://127.0.0.1:*", topic="kv") as pub,
    ):
        sub = KVEventSubscriber(pub.endpoint, topic="kv", callback=got.append)
        sub2 = KVEventSubscriber(other.endpoint, topic="kv", callback=got.append)
        until(lambda: len(got) >= 3, lambda: (pub.publish(stored(1)), other.publish(stored(2))))
        sub.close()
        sub2.close()
    assert {m.batch.events[0].block_hashes[0] for m in got} == {1}
    assert sub.queue.empty() and sub2.num_received == 0


@pytest.mark.skipif(not KV_FIXTURE.exists(), reason="vLLM 0.26 fixtures absent")
def test_kv_subscriber_reads_real_vllm_frames_and_counts_gaps() -> None:
    """Replay vLLM's captured frames on a raw PUB socket, leaving out seq 5 and 6."""
    messages = [[bytes.fromhex(f) for f in json.loads(ln)] for ln in KV_FIXTURE.open()]
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    with KVEventSubscriber(pub.getsockopt_string(zmq.LAST_ENDPOINT)) as sub:
        until(lambda: sub.num_received > 0, lambda: pub.send_multipart(messages[0]))
        n0 = sub.num_received
        pub.send(b"not a kv message")  # one frame: counted, not raised
        sent = messages[1:5] + messages[7:]
        for frames in sent:
            pub.send_multipart(frames)
        until(lambda: sub.num_received >= n0 + len(sent), lambda: None)
        msgs = [m for m in sub.drain() if m.seq != 0]  # seq 0 was sent until it arrived
    pub.close()
    assert [m.seq for m in msgs] == [1, 2, 3, 4] + list(range(7, len(messages)))
    assert sub.num_missed == 2 and sub.num_errors == 1
    assert msgs[-1].batch == decode_frames(messages[-1])[2]


def test_subscriber_bind_error_surfaces_in_constructor() -> None:
    with pytest.raises(zmq.ZMQError):
        KVEventSubscriber("tcp://256.0.0.1:1", bind=True)
    assert all(t.name != "kv-event-subscriber" for t in labkit_threads())


def test_kv_subscriber_to_a_listening_publisher_always_says_connected() -> None:
    """The handshake with a publisher already bound completes at once: the monitor must exist
    before connect(), or `connected` is never set (seen: a lab's prefill engine, 10 s wait)."""
    pub = zmq.Context.instance().socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        for _ in range(20):
            sub = KVEventSubscriber(f"tcp://127.0.0.1:{port}")
            try:
                assert sub.connected.wait(2.0), "the handshake was never noted"
                assert sub.num_peers == 1
            finally:
                sub.close()
    finally:
        pub.close(linger=0)
