"""ZMQ SUB readers for vLLM's KV events and labkit's observer events.

Each reader owns one background thread that owns its SUB socket (ZMQ sockets belong to one
thread): poll with a short timeout, decode, hand the result to a callback or a bounded
thread-safe queue. `close()` stops and joins the thread and closes the socket.
A message that does not decode is counted in `.num_errors`, never raised.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import zmq
from zmq.utils.monitor import recv_monitor_message

from labkit.telemetry.kv_events import KVEventBatch, decode_frames
from labkit.telemetry.observer_schema import OBS_TOPIC, ObserverBatch, decode_observer_frames

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KVEventMessage:
    """One received KV-event message: vLLM's topic and sequence number, the batch, and when
    it arrived here (`recv_ts`, time.time())."""

    topic: str
    seq: int
    batch: KVEventBatch
    recv_ts: float


class _ZmqSubscriber(Generic[T]):
    """A SUB socket on its own thread; subclasses say how frames become a `T`."""

    thread_name = "zmq-subscriber"

    def __init__(
        self,
        endpoint: str,
        topic: bytes,
        *,
        callback: Callable[[T], None] | None = None,
        maxsize: int = 10_000,
        bind: bool = False,
        poll_ms: int = 50,
    ) -> None:
        self.endpoint = endpoint
        self.num_received = 0
        self.num_errors = 0
        self.num_dropped = 0  # queue full
        self.num_peers = 0  # ZMTP handshakes completed (peers that connected, reconnects too)
        self.connected = threading.Event()  # set at the first completed handshake
        self._topic = topic
        self._callback = callback
        self._bind = bind
        self._poll_ms = poll_ms
        self.queue: queue.Queue[T] = queue.Queue(maxsize=maxsize)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=self.thread_name)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    # --- consumer side ------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> T:
        """Next decoded item (queue mode); raises `queue.Empty` after `timeout` seconds."""
        return self.queue.get(timeout=timeout)

    def drain(self) -> list[T]:
        """Every item queued so far, without waiting."""
        items: list[T] = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                return items

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread, close the socket, join. Idempotent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the thread ---------------------------------------------------------------------
    def _decode(self, frames: list[bytes]) -> T:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            sock = zmq.Context.instance().socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, self._topic)
            # The socket monitor says when a peer's handshake completes: after it the SUB's
            # subscription is on its way, the earliest a publisher can reach this reader.
            # Attached before connect: a listening peer completes the handshake at once, and
            # an event before the monitor exists is never seen (`connected` stayed unset).
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            if self._bind:
                sock.bind(self.endpoint)
                self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                sock.connect(self.endpoint)
        except BaseException as exc:  # surfaced to the constructor
            self._start_error = exc
            self._ready.set()
            return
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        self._ready.set()
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(self._poll_ms))
                if monitor in ready:
                    self._note_handshakes(monitor)
                if sock not in ready:
                    continue
                while not self._stop.is_set():
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._deliver(frames)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def _note_handshakes(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.num_peers += 1
                self.connected.set()

    def _deliver(self, frames: list[bytes]) -> None:
        try:
            item = self._decode(frames)
        except Exception:
            self.num_errors += 1
            if self.num_errors == 1:
                logger.exception("%s: undecodable message (further ones only counted)", self)
            return
        self.num_received += 1
        if self._callback is not None:
            try:
                self._callback(item)
            except Exception:
                self.num_errors += 1
                logger.exception("%s: callback failed", self)
            return
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.num_dropped += 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.endpoint!r})"


class KVEventSubscriber(_ZmqSubscriber[KVEventMessage]):
    """Reads vLLM's KV events (`[topic, seq, msgpack(KVEventBatch)]`) from `endpoint`.

    Args:
        endpoint: the engine's KV-event PUB address, e.g. `tcp://127.0.0.1:5557`.
        topic: topic prefix to subscribe to ("" = all, vLLM's default topic is "").
        callback: called on the reader thread with each `KVEventMessage`; without one,
            messages go to `.queue` (bounded by `maxsize`; overflow counted in `num_dropped`).
        bind: bind instead of connect.

    `num_missed` counts sequence gaps (vLLM numbers every batch); a sequence that goes
    backwards means the engine restarted and starts a new count.
    """

    thread_name = "kv-event-subscriber"

    def __init__(
        self,
        endpoint: str,
        topic: str = "",
        *,
        callback: Callable[[KVEventMessage], None] | None = None,
        maxsize: int = 10_000,
        bind: bool = False,
        poll_ms: int = 50,
    ) -> None:
        self.num_missed = 0
        self.last_seq: int | None = None
        super().__init__(
            endpoint,
            topic.encode("utf-8"),
            callback=callback,
            maxsize=maxsize,
            bind=bind,
            poll_ms=poll_ms,
        )

    def _decode(self, frames: list[bytes]) -> KVEventMessage:
        topic, seq, batch = decode_frames(frames)
        if self.last_seq is not None and seq > self.last_seq + 1:
            self.num_missed += seq - self.last_seq - 1
        self.last_seq = seq
        return KVEventMessage(topic, seq, batch, time.time())


class ObserverSubscriber(_ZmqSubscriber[ObserverBatch]):
    """Reads labkit observer batches (`[b"labkit-obs", msgpack(ObserverBatch)]`).

    Args:
        endpoint: an observer publisher's address (connect), or with `bind=True` an address
            this reader binds so that several observer publishers (`bind=False`) connect to it.
        callback, maxsize: as for `KVEventSubscriber`.
    """

    thread_name = "observer-subscriber"

    def __init__(
        self,
        endpoint: str,
        *,
        callback: Callable[[ObserverBatch], None] | None = None,
        maxsize: int = 10_000,
        bind: bool = False,
        poll_ms: int = 50,
    ) -> None:
        super().__init__(
            endpoint, OBS_TOPIC, callback=callback, maxsize=maxsize, bind=bind, poll_ms=poll_ms
        )

    def _decode(self, frames: list[bytes]) -> ObserverBatch:
        return decode_observer_frames(frames)
