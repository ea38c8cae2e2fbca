"""One row per request through the PD pair, each phase taken from the side that knows it.

Every time here is wall-clock seconds (`time.time()`) of the lab's host: the proxy's timeline,
the engines' observer events and the simulator all use it, so they share one axis.

    phase        from                                           clock of
    queue        proxy `arrival` -> prefill's first scheduled   proxy, then prefill engine
                 step with the request (StepScheduled)
    prefill      that step -> prefill's `request_finished`      prefill engine (observer)
                 (RequestFinished); ExampleConnector's per-layer
                 saves happen inside it (LayerTiming "save")
    KV transfer  the connector's own start/end: decode's        decode engine (NIXL read,
                 KVTransfer "recv" (NIXL read, ExampleConnector  Example load); else prefill
                 load); prefill's "send" where no recv exists    engine (send)
    decode       max(transfer end, decode's first scheduled     decode engine, then proxy
                 step) -> proxy `finish`

Where no engine event is known (an engine without the observer), the proxy's own marks stand
in (`prefill_start`/`prefill_end`, `kv_transfer_start`/`kv_transfer_end`: the proxy's wait
for decode's first byte, which holds the transfer AND decode's first step) and the view says so.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

from labkit.telemetry.observer_schema import (
    KVTransfer,
    LayerTiming,
    RequestFinished,
    StepScheduled,
)
from labkit.viz.requests import RequestIds, response_id

PHASE_NAMES = ("queue", "prefill", "KV transfer", "decode")

# vLLM's CPU-tier connector: its loads are not PD transfers
OFFLOAD_CONNECTOR = "OffloadingConnector"


@dataclass
class RequestTimes:
    """One request's life through the PD pair (wall-clock seconds; None: not seen yet)."""

    req_id: str  # the proxy's id; an engine's response id while no proxy event joined it
    arrival: float | None = None  # proxy
    proxy_prefill_start: float | None = None  # proxy sent the prefill request
    proxy_prefill_end: float | None = None  # proxy got prefill's answer
    proxy_transfer_start: float | None = None  # proxy sent the decode request
    proxy_transfer_end: float | None = None  # decode's first byte (transfer + first step)
    first_token: float | None = None  # proxy
    finish: float | None = None  # proxy
    prefill_first_step: float | None = None  # prefill engine: first step scheduling it
    prefill_done: float | None = None  # prefill engine: request_finished
    save_start: float | None = None  # prefill worker: first per-layer save naming it
    save_end: float | None = None
    send_start: float | None = None  # prefill's connector (KVTransfer "send")
    send_end: float | None = None
    recv_start: float | None = None  # decode's connector (KVTransfer "recv")
    recv_end: float | None = None
    decode_first_step: float | None = None  # decode engine: first step scheduling it
    error: bool = False
    num_tokens: int = 0  # KV tokens moved
    num_bytes: int = 0  # KV bytes moved
    connector: str = ""
    joined: bool = False  # the proxy's row (False: engine events whose proxy id is unknown)

    @property
    def prefill_start(self) -> float | None:
        return self.prefill_first_step if self.prefill_first_step is not None else self.proxy_prefill_start

    @property
    def prefill_end(self) -> float | None:
        return self.prefill_done if self.prefill_done is not None else self.proxy_prefill_end

    def transfer(self) -> tuple[float | None, float | None, str]:
        """(start, end, what measured it) of the KV transfer."""
        if self.recv_start is not None:
            return self.recv_start, self.recv_end, f"{self.connector or 'connector'} on decode"
        if self.send_start is not None:
            return self.send_start, self.send_end, f"{self.connector or 'connector'} on prefill"
        return self.proxy_transfer_start, self.proxy_transfer_end, "proxy: wait for decode's first byte"

    @property
    def transfer_seconds(self) -> float:
        """The connector's own duration of the move (0 when no connector reported it)."""
        a, b, _ = self.transfer()
        if a is None or b is None or (self.recv_start is None and self.send_start is None):
            return 0.0
        return max(b - a, 0.0)

    @property
    def gbps(self) -> float | None:
        """Achieved KV transfer rate in GB/s (1e9 bytes/s), from the connector's figures."""
        s = self.transfer_seconds
        return self.num_bytes / s / 1e9 if self.num_bytes and s > 0 else None

    def spans(self, now: float) -> list[tuple[float, float] | None]:
        """[start, end] per PHASE_NAMES (None: not reached); open phases end `now`.

        Ordered by construction: each phase starts no earlier than the previous one ended
        (the transfer excepted: it is the connector's, drawn as measured)."""

        def span(a: float | None, b: float | None) -> tuple[float, float] | None:
            return None if a is None else (a, max(b if b is not None else now, a))

        p0 = self.prefill_start
        queue = span(self.arrival, p0 if p0 is not None else None) if self.arrival is not None else None
        prefill = span(p0, self.prefill_end)
        t0, t1, _ = self.transfer()
        transfer = span(t0, t1)
        starts = [t for t in (t1, self.decode_first_step) if t is not None]
        if transfer is None and prefill is not None and self.prefill_end is not None:
            starts.append(self.prefill_end)
        d0 = max(starts) if starts else self.first_token
        if d0 is not None and self.finish is not None:
            d0 = min(d0, self.finish)
        decode = span(d0, self.finish) if d0 is not None else None
        return [queue, prefill, transfer, decode]


_TIMELINE_FIELDS = {
    "arrival": "arrival", "prefill_start": "proxy_prefill_start",
    "prefill_end": "proxy_prefill_end", "kv_transfer_start": "proxy_transfer_start",
    "kv_transfer_end": "proxy_transfer_end", "first_token": "first_token", "finish": "finish",
}  # fmt: skip


class TransferState:
    """Proxy timeline + observer events -> one row per request, and per-layer bars."""

    def __init__(self, max_requests: int = 40, ids: RequestIds | None = None) -> None:
        self.requests: OrderedDict[str, RequestTimes] = OrderedDict()
        self.max_requests = max_requests
        self.ids = ids if ids is not None else RequestIds()
        self.t0: float | None = None  # the run's start: the earliest time seen
        # ("save (prefill)", layer) -> (duration s, bytes) of the most recent pass: one series
        # per hook and role (decode's save_kv_layer runs too); layer order as first seen.
        self.layers: dict[tuple[str, str], tuple[float, int]] = {}
        self.layer_order: list[str] = []
        self.layer_engine: dict[str, str] = {}  # series -> engine that reported it
        self.connector = ""  # the connector in use (KVTransfer's name, else the proxy's)
        self._stepped: OrderedDict[tuple[str, str], None] = OrderedDict()  # (role, engine id)
        self.version = 0

    # -- rows --------------------------------------------------------------------------------
    def _put(self, key: str, row: RequestTimes) -> RequestTimes:
        self.requests[key] = row
        while len(self.requests) > self.max_requests:
            self.requests.popitem(last=False)
        return row

    def _row(self, engine_req_id: str) -> RequestTimes:
        proxy = self.ids.resolve(engine_req_id)
        if proxy is not None:
            r = self.requests.get(proxy)
            return r if r is not None else self._put(proxy, RequestTimes(proxy, joined=True))
        key = response_id(engine_req_id)
        r = self.requests.get(key)
        return r if r is not None else self._put(key, RequestTimes(key))

    def _merge_orphans(self, proxy: str) -> None:
        """Engine rows seen before the proxy named them join the proxy's row."""
        target = self.requests.get(proxy)
        for key in [k for k, r in self.requests.items() if not r.joined and self.ids.resolve(k) == proxy]:
            orphan = self.requests.pop(key)
            if target is None:
                target = self._put(proxy, RequestTimes(proxy, joined=True))
            for f in fields(RequestTimes):
                if f.name in ("req_id", "joined"):
                    continue
                mine, theirs = getattr(target, f.name), getattr(orphan, f.name)
                if mine in (None, 0, "", False) and theirs not in (None, 0, "", False):
                    setattr(target, f.name, theirs)

    def _seen(self, ts: float | None) -> None:
        if ts is not None and (self.t0 is None or ts < self.t0):
            self.t0 = ts

    # -- folding -----------------------------------------------------------------------------
    def apply_timeline(self, ev: dict[str, Any]) -> None:
        kind, ts = ev.get("event"), float(ev.get("ts", 0.0))
        if kind == "token":
            return  # latency's business; the Gantt only needs the first and the last
        rid = str(ev["req_id"])
        before = self.ids.version
        self.ids.note_timeline(ev)
        r = self.requests.get(rid) or self._put(rid, RequestTimes(rid, joined=True))
        r.joined = True
        self._seen(ts)
        if kind == "arrival" and ev.get("connector") and not self.connector:
            self.connector = str(ev["connector"])
        if kind == "error":
            r.error, r.finish = True, ts
        elif kind in _TIMELINE_FIELDS:
            setattr(r, _TIMELINE_FIELDS[kind], ts)
        if self.ids.version != before:
            self._merge_orphans(rid)
        self.version += 1

    def apply(self, batch: Any) -> None:
        """Fold the step / finish / transfer / layer events of one ObserverBatch."""
        role = batch.role
        for ev in batch.events:
            if isinstance(ev, StepScheduled):
                self._step(role, ev)
            elif isinstance(ev, RequestFinished) and role == "prefill":
                r = self._row(ev.req_id)
                if r.prefill_done is None:
                    r.prefill_done = ev.ts
                    self.version += 1
            elif isinstance(ev, KVTransfer) and ev.connector != OFFLOAD_CONNECTOR:
                self._transfer(ev)  # a CPU-tier load is the host-tier panel's (viz/offload.py)
            elif isinstance(ev, LayerTiming):
                self._layer(batch.engine_id, role, ev)

    def _step(self, role: str, ev: StepScheduled) -> None:
        if role not in ("prefill", "decode"):
            return
        for rid in ev.num_scheduled_tokens:
            key = (role, rid)
            if key in self._stepped:
                continue
            self._stepped[key] = None
            while len(self._stepped) > 20 * self.max_requests:
                self._stepped.popitem(last=False)
            r = self._row(rid)
            self._seen(ev.ts)
            if role == "prefill":
                r.prefill_first_step = ev.ts
            else:
                r.decode_first_step = ev.ts
            self.version += 1

    def _transfer(self, ev: KVTransfer) -> None:
        """A PD connector's move between engines; CPU-tier loads (KVTransfer from vLLM's
        OffloadingConnector, which the observer also reports as OffloadTransfer) stay out."""
        r = self._row(ev.req_id)
        self._seen(ev.start)
        r.num_bytes = max(r.num_bytes, ev.num_bytes)
        r.num_tokens = max(r.num_tokens, ev.num_tokens)
        r.connector = self.connector = ev.connector
        if ev.direction == "recv":
            r.recv_start, r.recv_end = ev.start, ev.end
        else:
            r.send_start, r.send_end = ev.start, ev.end
        self.version += 1

    def _layer(self, engine: str, role: str, ev: LayerTiming) -> None:
        if ev.layer not in self.layer_order:
            self.layer_order.append(ev.layer)
        series = f"{ev.op} ({role})"
        self.layers[(series, ev.layer)] = (max(ev.end - ev.start, 0.0), ev.num_bytes)
        self.layer_engine[series] = engine
        if ev.op == "save":
            for rid in ev.req_ids[:8]:
                r = self._row(rid)
                r.save_start = ev.start if r.save_start is None else min(r.save_start, ev.start)
                r.save_end = ev.end if r.save_end is None else max(r.save_end, ev.end)
        self.version += 1

    # -- reading -----------------------------------------------------------------------------
    def rows(self) -> list[RequestTimes]:
        """The rows a view draws: the proxy's requests, or every row where no proxy runs."""
        rows = list(self.requests.values())
        joined = [r for r in rows if r.joined]
        return joined if joined else rows

    def recent_gbps(self) -> list[tuple[str, float]]:
        return [(r.req_id, g) for r in self.rows() if (g := r.gbps) is not None]

    def label(self, req_id: str) -> str:
        return self.ids.label(req_id)
