"""vLLM's KV-cache event schema and its ZMQ wire format: the one module in labkit that holds it.

The structs below are a field-for-field copy of vLLM 0.26's `vllm/distributed/kv_events.py`
(EventBatch, KVCacheEvent, BlockStored, BlockRemoved, AllBlocksCleared, KVEventBatch): same
class names (the msgpack tag is the class name), same field order, same struct options, so
what labkit encodes is byte-identical to what vLLM sends and vice versa.
`tests/test_kv_events.py` checks this against vLLM's source with `ast`.

Wire (vLLM's `ZmqEventPublisher`): a PUB socket sends multipart
`[topic, seq as 8-byte big-endian, msgpack(KVEventBatch)]`, `seq` counting 0, 1, 2, ...
An optional ROUTER "replay" socket answers `[client, b"", start_seq]` with every buffered
message from `start_seq` on, then `[client, b"", b"", END_SEQ, b""]`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from itertools import count
from typing import Any

import msgspec
import zmq

logger = logging.getLogger(__name__)

# vllm/v1/core/kv_cache_utils.py: sha256 bytes, or a 64-bit int with
# VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES (the default in 0.26: hashes arrive as ints).
ExternalBlockHash = bytes | int


class EventBatch(
    msgspec.Struct,
    array_like=True,  # type: ignore[call-arg]
    omit_defaults=True,  # type: ignore[call-arg]
    gc=False,  # type: ignore[call-arg]
):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(
    msgspec.Struct,
    omit_defaults=True,  # type: ignore[call-arg]
    gc=False,  # type: ignore[call-arg]
    tag=True,
):
    """Base class for all KV cache-related events"""


MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_FS = "FS"
MEDIUM_OBJ = "OBJ"


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int

    lora_id: int | None

    medium: str | None
    lora_name: str | None

    extra_keys: list[tuple[Any, ...] | None] | None = None

    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


KVCacheEventT = BlockStored | BlockRemoved | AllBlocksCleared

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""Replay end-of-stream marker (vLLM's `ZmqEventPublisher.END_SEQ`)."""

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(type=KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    """msgpack payload of one batch, exactly as vLLM's publisher encodes it."""
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one msgpack payload into a `KVEventBatch`."""
    return _decoder.decode(payload)


def encode_frames(topic: str, seq: int, batch: KVEventBatch) -> list[bytes]:
    """The three ZMQ frames `[topic, seq (8-byte big-endian), payload]`."""
    return [topic.encode("utf-8"), seq.to_bytes(8, "big"), encode_batch(batch)]


def decode_frames(frames: list[bytes]) -> tuple[str, int, KVEventBatch]:
    """Decode one multipart message into `(topic, seq, batch)`.

    Raises:
        ValueError: not three frames, or a sequence frame that is not 8 bytes.
        msgspec.DecodeError: the payload is not a `KVEventBatch`.
    """
    if len(frames) != 3:
        raise ValueError(f"expected 3 frames [topic, seq, payload], got {len(frames)}")
    topic, seq_bytes, payload = frames
    if len(seq_bytes) != 8:
        raise ValueError(f"sequence frame must be 8 bytes, got {len(seq_bytes)}")
    return bytes(topic).decode("utf-8"), int.from_bytes(seq_bytes, "big"), decode_batch(payload)


def publisher_binds(endpoint: str) -> bool:
    """Whether vLLM's KV-event publisher BINDS `endpoint` (else it connects to it).

    vLLM 0.26, vllm/distributed/kv_events.py, `ZmqEventPublisher._socket_setup`: "bind if
    wildcard / * present, else connect" (also "::", ipc:// and inproc://). So an engine given
    `tcp://127.0.0.1:5557` CONNECTS its PUB there, and whoever reads it must bind that
    address; given `tcp://*:5557` it binds (every interface) and a reader connects.
    """
    return ("*" in endpoint or "::" in endpoint or endpoint.startswith("ipc://")
            or endpoint.startswith("inproc://"))


class KVEventPublisher:
    """A PUB publisher that behaves like vLLM's `ZmqEventPublisher` (the simulator uses it).

    `publish()` only enqueues; a daemon thread encodes, numbers and sends, and keeps the
    last `buffer_steps` messages for the optional replay ROUTER socket. The PUB socket binds
    or connects as vLLM's does (`publisher_binds`): wildcard, IPv6, ipc:// and inproc://
    endpoints are bound, a concrete TCP address is connected to (a lab reader binds it).

    Args:
        endpoint: PUB address, e.g. `tcp://127.0.0.1:*` (bound: a free port, the bound
            address is then in `.endpoint`) or `tcp://127.0.0.1:5557` (connected to).
        topic: first frame of every message (vLLM's default is "").
        replay_endpoint: optional ROUTER address to bind for replay requests.
        data_parallel_rank: stamped into batches that carry none (vLLM does the same).
        buffer_steps, hwm, max_queue_size: as in vLLM's `KVEventsConfig`.
    """

    def __init__(
        self,
        endpoint: str,
        topic: str = "",
        *,
        replay_endpoint: str | None = None,
        data_parallel_rank: int = 0,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        max_queue_size: int = 100_000,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self._topic_bytes = topic.encode("utf-8")
        self._dp_rank = data_parallel_rank
        self._queue: queue.Queue[KVEventBatch | None] = queue.Queue(maxsize=max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq_gen = count()
        self._ctx = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if publisher_binds(endpoint):
            self._pub.bind(endpoint)
            # The address really bound: `tcp://127.0.0.1:*` lets ZMQ pick a free port.
            self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._pub.connect(endpoint)
        self._replay: zmq.Socket | None = None
        if replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self.num_published = 0
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True, name="kv-event-publisher")
        self._thread.start()

    def publish(self, batch: KVEventBatch) -> None:
        """Queue one batch for sending (vLLM's `publish`: blocks only if the queue is full)."""
        if not self._running:
            raise RuntimeError("Publisher is closed")
        if batch.data_parallel_rank is None:
            batch.data_parallel_rank = self._dp_rank
        self._queue.put(batch)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued batch has been handed to ZMQ; True if it did in time."""
        done = threading.Event()

        def waiter() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 1.0) -> None:
        """Send what is queued (up to `timeout`), stop the thread, close the sockets."""
        if not self._running:
            return
        self._running = False
        self._queue.put(None)
        self._thread.join(timeout)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    shutdown = close  # vLLM's name

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            if self._replay is not None and self._replay.poll(0):
                try:
                    self._service_replay()
                except zmq.ZMQError:
                    logger.exception("KV-event replay failed")
            try:
                batch = self._queue.get(timeout=0.05)
            except queue.Empty:
                if not self._running:
                    return
                continue
            if batch is None:
                self._queue.task_done()
                return
            try:
                seq = next(self._seq_gen)
                payload = encode_batch(batch)
                self._pub.send_multipart((self._topic_bytes, seq.to_bytes(8, "big"), payload))
                self._buffer.append((seq, payload))
                self.num_published += 1
            except zmq.ZMQError:
                logger.exception("KV-event publish failed")
            finally:
                self._queue.task_done()

    def _service_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            logger.warning("invalid replay request: %d frames", len(frames))
            return
        client_id, _, start_bytes = frames
        start_seq = int.from_bytes(start_bytes, "big")
        for seq, payload in list(self._buffer):
            if seq >= start_seq:
                self._replay.send_multipart(
                    (client_id, b"", self._topic_bytes, seq.to_bytes(8, "big"), payload)
                )
        self._replay.send_multipart((client_id, b"", b"", END_SEQ, b""))
