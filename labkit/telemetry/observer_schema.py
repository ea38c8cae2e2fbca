"""labkit's observer events: what vLLM's KV-connector hooks (and the simulator) tell the lab.

KV events carry block hashes; the views also need PHYSICAL block ids, per-step schedules and
per-layer KV streaming times. The observer connector (`labkit/pd/observer.py`, inside vLLM)
and the simulated engine both emit these structs; the contract is docs/architecture.md,
section "Wire contracts", item 3.

Wire: ZMQ PUB, multipart `[b"labkit-obs", msgpack(ObserverBatch)]`. Each event is a msgspec
tagged struct (tag = class name under the key "type", like vLLM's KV events).

`ObserverPublisher` runs inside vLLM's scheduler and worker processes, so it never blocks and
never raises: sends are `NOBLOCK` on an XPUB socket with `XPUB_NODROP`, so that a full queue
shows up as `zmq.Again`, which is counted in `.num_dropped` instead of waiting.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import msgspec
import zmq

logger = logging.getLogger(__name__)

OBS_TOPIC = b"labkit-obs"

# PoolSnapshot.block_state values, one byte per physical block: labkit.vocab's BLOCK_*.
from labkit.vocab import BLOCK_CACHED, BLOCK_FREE, BLOCK_IN_USE, BLOCK_SHARED  # noqa: E402,F401


class StepScheduled(msgspec.Struct, tag=True):
    """One scheduler step (`build_connector_meta`). Block ids are physical ids of KV group 0;
    block 0 is vLLM's null block."""

    step: int
    ts: float
    token_budget: int
    num_scheduled_tokens: dict[str, int]
    new_block_ids: dict[str, list[int]]
    num_computed_tokens: dict[str, int]
    preempted: list[str]
    finished: list[str]
    # Added for conformance traces (absent in older recordings): free blocks in the pool when
    # the step was scheduled (after its allocations and preemptions).
    num_free: int | None = None


class RequestAdded(msgspec.Struct, tag=True):
    """A request entered the scheduler (`on_new_request`) before step `step` was scheduled.
    Conformance traces replay these; the prompt token ids carry the prefix sharing."""

    ts: float
    step: int
    req_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    ignore_eos: bool = True


class EngineSettings(msgspec.Struct, tag=True):
    """What the scheduler runs with (once, when the block pool is bound): enough to replay a
    trace through the simulator with the same settings."""

    ts: float
    num_gpu_blocks: int
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    async_scheduling: bool
    enable_chunked_prefill: bool
    enable_prefix_caching: bool
    long_prefill_token_threshold: int = 0
    kv_role: str = ""
    defer_block_free: bool | None = None
    connectors: list[str] = []


class RequestAllocated(msgspec.Struct, tag=True):
    """Blocks given to a request (`update_state_after_alloc`)."""

    ts: float
    req_id: str
    block_ids: list[int]
    num_external_tokens: int


class RequestFinished(msgspec.Struct, tag=True):
    """A request ends (`request_finished`); `delay_free`: blocks held for a KV transfer."""

    ts: float
    req_id: str
    block_ids: list[int]
    delay_free: bool


class PoolSnapshot(msgspec.Struct, tag=True):
    """The whole block pool, one byte per physical block (BLOCK_* values); <= 4 Hz."""

    ts: float
    num_blocks: int
    num_free: int
    block_state: bytes


class LayerTiming(msgspec.Struct, tag=True):
    """One layer's KV save or load on a worker (`save_kv_layer`, `wait_for_layer_load`)."""

    ts: float
    op: Literal["save", "load"]
    layer: str
    start: float
    end: float
    num_bytes: int
    req_ids: list[str]


class KVTransfer(msgspec.Struct, tag=True):
    """One completed per-request KV transfer between engines."""

    ts: float
    req_id: str
    direction: Literal["send", "recv"]
    num_tokens: int
    num_bytes: int
    start: float
    end: float
    connector: str


class HostTierSnapshot(msgspec.Struct, tag=True):
    """The CPU tier of vLLM's KV offload (--kv-offloading-size), one byte per CPU block
    (labkit.vocab HOST_* values: free, stored, storing, loading); <= 4 Hz, like PoolSnapshot.
    `num_stored`: readable blocks (a prefix hit can load them back). From real vLLM: the CPU
    manager's `BlockStatus.ref_cnt` per block (-1 storing, 0 stored, > 0 loading)."""

    ts: float
    num_blocks: int
    num_free: int
    num_stored: int
    block_state: bytes


class OffloadTransfer(msgspec.Struct, tag=True):
    """One finished GPU<->CPU copy job of the offload connector; `transfer_type` is vLLM's
    label: "GPU_to_CPU" (a store) | "CPU_to_GPU" (a load after a CPU-tier hit). `step` is
    the scheduler step it was built in (-1: unknown). `num_blocks`: CPU blocks of the job.

    What `start`/`end` measure depends on the source. Simulator: the modelled copy on the host
    link. Real vLLM (labkit.pd.observer `OffloadTap`): `start` = when the scheduler built the
    job (the copy of a load starts in that step's forward pass, a store's in the next step's),
    `end` = when the scheduler received the last worker's completion; an upper bound on the
    copy, quantized to engine steps. `num_bytes` there: GPU blocks copied x one GPU block's
    KV over all layers, of one rank."""

    ts: float
    req_id: str
    transfer_type: str
    num_blocks: int
    num_bytes: int
    start: float
    end: float
    gpu_block_ids: list[int] = []
    cpu_block_ids: list[int] = []
    step: int = -1


ObsEvent = (
    StepScheduled | RequestAllocated | RequestFinished | PoolSnapshot | LayerTiming | KVTransfer
    | RequestAdded | EngineSettings | HostTierSnapshot | OffloadTransfer
)


class ObserverBatch(msgspec.Struct):
    """Events from one engine process; `kind` is "vllm" | "sim" | "replay"."""

    engine_id: str
    role: str
    kind: str
    ts: float
    events: list[ObsEvent]
    # Events this engine process's observer lost so far (all causes, a running total, so a
    # lost batch does not hide it); 0 in recordings made before it was carried.
    num_dropped: int = 0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(type=ObserverBatch)


def encode_observer_batch(batch: ObserverBatch) -> bytes:
    """msgpack payload of one batch."""
    return _encoder.encode(batch)


def decode_observer_batch(payload: bytes) -> ObserverBatch:
    """Decode one payload; raises `msgspec.DecodeError`/`ValidationError` on bad input."""
    return _decoder.decode(payload)


def decode_observer_frames(frames: list[bytes]) -> ObserverBatch:
    """Decode one multipart message `[b"labkit-obs", payload]`."""
    if len(frames) != 2 or bytes(frames[0]) != OBS_TOPIC:
        raise ValueError("not an observer message: expected [b'labkit-obs', payload]")
    return decode_observer_batch(frames[1])


class ObserverPublisher:
    """Non-blocking PUB for observer batches, safe to call from inside vLLM's engine loop.

    `publish*()` return False (and count a drop) instead of waiting when the send queue is
    full, and swallow every error after closing or on a broken socket.  Use it from ONE
    thread (ZMQ sockets are not thread-safe); a worker process gets its own publisher.

    Args:
        endpoint: ZMQ address, e.g. `tcp://127.0.0.1:5600` (`...:*` binds a free port).
        engine_id, role, kind: stamped on batches built by `publish()`.
        bind: True (default) binds, so a lab subscriber connects to it; False connects to a
            subscriber that binds (several processes into one SUB).
        sndhwm: messages queued per subscriber before sends are dropped.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        engine_id: str = "",
        role: str = "",
        kind: str = "vllm",
        bind: bool = True,
        sndhwm: int = 1000,
    ) -> None:
        self.engine_id, self.role, self.kind = engine_id, role, kind
        self.num_sent = 0
        self.num_dropped = 0
        self.num_errors = 0
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.XPUB_NODROP, 1)  # full queue -> zmq.Again, not silent loss
        self._sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's join reaches greet()
        self._sock.setsockopt(zmq.LINGER, 0)
        if bind:
            self._sock.bind(endpoint)
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._sock.connect(endpoint)
            self.endpoint = endpoint

    def publish(self, events: list[ObsEvent], ts: float | None = None,
                num_dropped: int = 0) -> bool:
        """Send `events` as one batch stamped with this publisher's engine and the events
        its producer lost so far (`num_dropped`); True if queued."""
        batch = ObserverBatch(
            engine_id=self.engine_id,
            role=self.role,
            kind=self.kind,
            ts=time.time() if ts is None else ts,
            events=events,
            num_dropped=num_dropped,
        )
        return self.publish_batch(batch)

    def publish_batch(self, batch: ObserverBatch) -> bool:
        """Send one batch without blocking; False if dropped (queue full) or failed."""
        sock = self._sock
        if sock is None:
            self.num_dropped += 1
            return False
        try:
            self._drain_subscriptions(sock)
            sock.send_multipart((OBS_TOPIC, _encoder.encode(batch)), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.num_dropped += 1
            return False
        except Exception:  # never raise into the engine
            self.num_errors += 1
            if self.num_errors == 1:
                logger.exception("observer publish failed (further errors only counted)")
            return False
        self.num_sent += 1
        return True

    def greet(self, num_dropped: int = 0) -> bool:
        """Send an empty batch if a subscriber joined since the last send: ZMQ drops what a
        PUB sends before a subscription arrives, so this hello is how a lab learns that this
        publisher now reaches it (`LiveTelemetry.wait_connected`). Call it from the
        publishing thread while idle; True if a hello went out."""
        sock = self._sock
        if sock is None:
            return False
        try:
            joined = self._drain_subscriptions(sock)
        except zmq.ZMQError:
            return False
        return joined > 0 and self.publish([], num_dropped=num_dropped)

    @staticmethod
    def _drain_subscriptions(sock: zmq.Socket) -> int:
        """Read the subscription messages XPUB hands up (so they do not pile up); returns
        how many were joins (b"\x01" + topic). A subscription is registered before XPUB hands
        it up, so whatever is sent after this call reaches the joined subscriber."""
        joined = 0
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            joined += sock.recv(zmq.NOBLOCK)[:1] == b"\x01"
        return joined

    def close(self) -> None:
        """Close the socket (pending messages are discarded: linger 0). Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close(linger=0)
            except zmq.ZMQError:  # pragma: no cover - a context already terminated: closed
                pass

    def __enter__(self) -> ObserverPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
