"""The time-series store: bounds, cursor semantics, thread safety, speed."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from labkit.telemetry.store import TelemetryStore


def test_series_ring_is_bounded_and_ordered() -> None:
    store = TelemetryStore(capacity=100)
    for i in range(250):
        store.append("vllm:kv_cache_usage_perc", float(i), i / 1000, source="prefill")
    ts, values = store.window("vllm:kv_cache_usage_perc", source="prefill")
    assert len(ts) == 100  # the oldest 150 points fell off
    assert ts.tolist() == [float(i) for i in range(150, 250)]
    np.testing.assert_allclose(values, np.arange(150, 250) / 1000)
    assert store.latest("vllm:kv_cache_usage_perc", source="prefill") == (249.0, 0.249)
    assert store.num_appended("vllm:kv_cache_usage_perc", source="prefill") == 250


def test_window_since_and_sources_are_separate() -> None:
    store = TelemetryStore(capacity=16)
    for i in range(10):
        store.append("running", float(i), i, source="prefill")
        store.append("running", float(i), -i, source="decode")
    ts, values = store.window("running", since=6.5, source="decode")
    assert ts.tolist() == [7.0, 8.0, 9.0] and values.tolist() == [-7.0, -8.0, -9.0]
    assert store.latest("running", source="prefill") == (9.0, 9.0)
    assert store.latest("nope") is None
    assert store.window("nope")[0].size == 0
    assert store.series("decode") == [("decode", "running")]
    # window() returns copies: a writer cannot change what a view already holds
    ts2, _ = store.window("running", source="prefill")
    store.append("running", 10.0, 10, source="prefill")
    assert ts2[-1] == 9.0


def test_sources_carry_kind_and_labels() -> None:
    store = TelemetryStore()
    store.add_source("prefill-0", "vllm", role="prefill", gpu=0)
    store.add_source("decode-0", "sim", role="decode")
    assert store.source("prefill-0").labels == {"role": "prefill", "gpu": "0"}
    assert {n: s.kind for n, s in store.sources().items()} == {
        "prefill-0": "vllm",
        "decode-0": "sim",
    }
    with pytest.raises(ValueError):
        store.add_source("x", "gpu")


def test_log_cursor_semantics() -> None:
    store = TelemetryStore(log_capacity=5)
    assert store.cursor("kv") == 0
    first = store.since("kv")
    assert first.events == [] and first.cursor == 0 and first.missed == 0
    cursors = [store.log("kv", {"i": i}, source="prefill", ts=100.0 + i) for i in range(3)]
    assert cursors == [0, 1, 2]
    s = store.since("kv", 0)
    assert [e.event["i"] for e in s.events] == [0, 1, 2] and s.cursor == 3 and s.missed == 0
    assert store.since("kv", s.cursor).events == []  # nothing new
    for i in range(3, 9):
        store.log("kv", {"i": i})
    # log holds cursors 4..8; a reader at 3 missed one, a reader at 0 missed four
    late = store.since("kv", 3)
    assert [e.cursor for e in late.events] == [4, 5, 6, 7, 8] and late.missed == 1
    assert store.since("kv", 0).missed == 4
    mid = store.since("kv", 6)
    assert [e.event["i"] for e in mid.events] == [6, 7, 8] and mid.missed == 0
    limited = store.since("kv", 4, limit=2)
    assert [e.cursor for e in limited.events] == [4, 5] and limited.cursor == 6
    assert store.since("kv", 1000).cursor == 9  # a cursor from the future is clamped
    assert store.since("obs", 0).events == []  # logs are separate
    assert store.log_many("proxy", [(1.0, "arrival"), (2.0, "finish")]) == 2
    assert [(e.ts, e.event) for e in store.since("proxy").events] == [
        (1.0, "arrival"),
        (2.0, "finish"),
    ]


def test_two_writer_threads_and_a_reader() -> None:
    store = TelemetryStore(capacity=50_000, log_capacity=50_000)
    n = 20_000
    errors: list[BaseException] = []

    def writer(src: str) -> None:
        try:
            for i in range(n):
                store.append("x", float(i), i, source=src)
                store.append("shared", float(i), i)
                store.log("obs", (src, i), source=src)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        cursor = 0
        while not stop.is_set():
            s = store.since("obs", cursor)
            seen.extend(e.cursor for e in s.events)
            cursor = s.cursor
        s = store.since("obs", cursor)
        seen.extend(e.cursor for e in s.events)

    threads = [threading.Thread(target=writer, args=(s,)) for s in ("a", "b")]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert not errors
    assert store.num_appended("shared") == 2 * n
    for src in ("a", "b"):
        ts, values = store.window("x", source=src)
        assert values.tolist() == list(range(n))  # each writer's own order is kept
    assert seen == list(range(2 * n))  # every cursor exactly once, in order
    events = store.since("obs").events
    for src in ("a", "b"):
        assert [i for s, i in (e.event for e in events) if s == src] == list(range(n))


def test_append_rate() -> None:
    """The readers of two engines write a few thousand points a second: 100k/s is ample."""
    store = TelemetryStore()
    names = [f"s{i}" for i in range(50)]
    n = 100_000
    t0 = time.perf_counter()
    for i in range(n):
        store.append(names[i % 50], float(i), 1.0, "prefill")
    rate = n / (time.perf_counter() - t0)
    print(f"store.append: {rate:,.0f}/s")
    assert rate > 100_000
