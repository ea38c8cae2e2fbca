"""LiveTelemetry's queues between two polls: bounded when nobody polls, complete when a
view keeps up."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from labkit.telemetry import live
from labkit.telemetry.live import EngineTap, LiveTelemetry, _Drain
from labkit.telemetry.observer_schema import ObserverBatch, PoolSnapshot


def test_drain_is_bounded_in_items_and_counts_what_fell_off() -> None:
    d = _Drain("x", maxlen=3)
    for i in range(10):
        d.put(i)
    assert len(d) == 3 and d.dropped == 7
    assert d.take() == [7, 8, 9]  # the newest survive
    assert d.take() == [] and d.dropped == 7


def test_drain_is_bounded_in_bytes_but_keeps_the_newest_item() -> None:
    d = _Drain("x", maxlen=100, max_bytes=1000, size=len)
    for _ in range(5):
        d.put(b"a" * 400)
    assert len(d) == 2 and d.dropped == 3
    d.put(b"b" * 5000)  # bigger than the budget alone: kept, everything older goes
    assert d.take() == [b"b" * 5000] and d.dropped == 5


@pytest.fixture()
def tel():
    taps = [EngineTap(name=n, role=n, kind="sim", base_url="http://127.0.0.1:9", gpus=[0],
                      num_blocks=4, block_size=16, model="m") for n in ("prefill", "decode")]
    t = LiveTelemetry("sim", taps, interval=60)
    yield t
    t.close()


def _batch(i: int, num_blocks: int) -> ObserverBatch:
    snap = PoolSnapshot(ts=float(i), num_blocks=num_blocks, num_free=num_blocks,
                        block_state=bytes(num_blocks))
    return ObserverBatch(engine_id="prefill", role="prefill", kind="sim", ts=float(i),
                         events=[snap])


def test_nobody_polling_keeps_memory_bounded(tel) -> None:
    """An idle `labkit up` lab: metrics scraped at 4 Hz and pool snapshots nobody takes."""
    engine = tel.engines[0]
    for i in range(1000):
        tel._on_metrics(engine, SimpleNamespace(ts=float(i)))
    for i in range(200):  # 200 snapshots of a 1 MiB pool: 200 MiB offered
        tel._on_observer(_batch(i, 1 << 20))
    delta = tel.poll()
    assert len(delta.metrics) == live.METRICS_KEPT_PER_ENGINE * 2
    assert [m.ts for m in delta.metrics][-1] == 999.0
    held = sum(len(ev.block_state) for b in delta.observer for ev in b.events)
    assert held <= live.OBSERVER_BYTES_KEPT and delta.observer[-1].ts == 199.0
    dropped = tel.dropped()
    assert dropped["metrics"] == 1000 - len(delta.metrics)
    assert dropped["observer"] == 200 - len(delta.observer) > 0


def test_a_view_that_keeps_up_loses_nothing(tel) -> None:
    got = []
    for i in range(500):
        tel._on_observer(_batch(i, 64))
        if i % 50 == 49:
            got += tel.poll().observer
    assert [b.ts for b in got] == [float(i) for i in range(500)]
    assert tel.dropped()["observer"] == 0


def test_observer_drops_follow_each_engines_running_total(tel) -> None:
    for engine, n in (("prefill", 0), ("decode", 2), ("decode", 5), ("decode", 4)):
        tel._on_observer(ObserverBatch(engine_id=engine, role=engine, kind="vllm", ts=0.0,
                                       events=[], num_dropped=n))
    assert tel.observer_drops() == {"decode": 5}  # a late, older batch does not lower it


def test_wait_connected_waits_for_every_engines_publishers() -> None:
    """ZMQ's late join: a publisher's hello (ObserverPublisher.greet) tells the lab that it
    is heard; what it sends after that arrives."""
    import threading
    import time

    from labkit.plan.ports import free_port
    from labkit.telemetry.kv_events import KVEventPublisher
    from labkit.telemetry.observer_schema import ObserverPublisher

    kv_ep = f"tcp://127.0.0.1:{free_port()}"  # what a lab gives an engine: vLLM connects
    kv_pub = KVEventPublisher(kv_ep)
    taps = [EngineTap(name=n, role=n, kind="sim", base_url="http://127.0.0.1:9", gpus=[0],
                      num_blocks=4, block_size=16, model="m",
                      kv_events_endpoint=kv_ep if n == "prefill" else None)
            for n in ("prefill", "decode")]
    tel = LiveTelemetry("sim", taps, observer_endpoint="tcp://127.0.0.1:*", interval=60)
    stop = threading.Event()
    greeted: list[str] = []

    def engine(engine_id: str) -> None:  # an idle engine's publishing thread
        pub = ObserverPublisher(tel.obs_sub.endpoint, engine_id=engine_id, bind=False)
        while not stop.is_set():
            if pub.greet():
                greeted.append(engine_id)
                pub.publish([PoolSnapshot(time.time(), 4, 4, bytes(4))])  # right after: heard
            time.sleep(0.02)
        pub.close()

    threads = [threading.Thread(target=engine, args=("prefill",), daemon=True)]
    try:
        threads[0].start()
        assert tel.wait_connected(0.5) is False  # decode says nothing yet
        threads.append(threading.Thread(target=engine, args=("decode/rank0",), daemon=True))
        threads[1].start()
        assert tel.wait_connected(10.0) is True
        assert tel.kv_subs["prefill"].connected.is_set()
        deadline = time.monotonic() + 10
        got = []
        while len(got) < 2:
            assert time.monotonic() < deadline, got
            got += tel.poll().observer
            time.sleep(0.02)
        # one snapshot each, the hellos (empty batches) are not handed to the views
        assert sorted(b.engine_id for b in got) == ["decode/rank0", "prefill"]
        assert sorted(greeted) == ["decode/rank0", "prefill"]
        tel.reconnecting("decode")  # a restarted engine must be heard again
        assert tel.wait_connected(0.3) is False
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        tel.close()
        kv_pub.close()


class _VllmLikeEngine:
    """Stands in for one vLLM 0.26 engine as the lab starts it, publishers only.

    - KV events as vllm/distributed/kv_events.py `ZmqEventPublisher._socket_setup` does it:
      a PUB that binds wildcard / "::" / ipc / inproc endpoints and CONNECTS to any other
      (the lab gives `tcp://127.0.0.1:PORT`), made when the engine starts, long before the
      lab's readers exist (Lab.start builds them after /health).
    - The observer (labkit/pd/observer.py Outbox) inside EngineCore: a connecting
      ObserverPublisher made lazily by its own thread (here: only after a first scheduler
      step, the latest it could be), greeting while idle.
    """

    def __init__(self, name: str, kv_ep: str, obs_ep: str, first_step_after_s: float) -> None:
        import threading

        import zmq

        self.pub = zmq.Context.instance().socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if "*" in kv_ep or "::" in kv_ep or kv_ep.startswith(("ipc://", "inproc://")):
            self.pub.bind(kv_ep)
        else:
            self.pub.connect(kv_ep)
        self.name, self.obs_ep, self.delay = name, obs_ep, first_step_after_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._outbox, daemon=True)
        self.thread.start()

    def _outbox(self) -> None:
        from labkit.telemetry.observer_schema import ObserverPublisher

        if self.stop.wait(self.delay):  # the socket appears at the first scheduler step
            return
        pub = ObserverPublisher(self.obs_ep, engine_id=self.name, bind=False)
        while not self.stop.wait(0.05):
            pub.greet()
        pub.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pub.close(linger=0)


def test_wait_connected_hears_engines_that_connect_like_vllm() -> None:
    """vLLM connects its KV-event PUB to the lab's concrete endpoint; a reader that connected
    too never completed a handshake and wait_connected timed out on every real lab."""
    import time

    from labkit.plan.ports import free_port

    obs_ep = f"tcp://127.0.0.1:{free_port()}"
    kv = {n: f"tcp://127.0.0.1:{free_port()}" for n in ("prefill", "decode")}
    engines = [_VllmLikeEngine("prefill", kv["prefill"], obs_ep, 0.0),
               _VllmLikeEngine("decode", kv["decode"], obs_ep, 0.3)]  # lazy observer socket
    time.sleep(0.2)  # the engines are up before the lab's readers (Lab.start's order)
    taps = [EngineTap(name=n, role=n, kind="vllm", base_url="http://127.0.0.1:9", gpus=[],
                      num_blocks=4, block_size=16, model="m", kv_events_endpoint=kv[n])
            for n in ("prefill", "decode")]
    tel = LiveTelemetry("sim", taps, observer_endpoint=obs_ep, interval=60)
    try:
        t0 = time.monotonic()
        ok = tel.wait_connected(5.0)
        assert ok, tel.missing()
        assert time.monotonic() - t0 < 3.0
        assert tel.missing() == []
        # an engine restarted on Apply connects to the same, still bound, endpoints
        engines[1].close()
        tel.reconnecting("decode")
        assert tel.wait_connected(0.3) is False
        assert sorted(tel.missing()) == ["kv-events:decode", "observer:decode"]
        engines[1] = _VllmLikeEngine("decode", kv["decode"], obs_ep, 0.1)
        assert tel.wait_connected(5.0), tel.missing()
    finally:
        for e in engines:
            e.close()
        tel.close()
