"""The views tell one consistent truth (issue 14): a simulated PD lab and the shipped REAL
recordings, driven through the streaming view, give one row per request whose phases are
ordered, end at the request's finish, and whose KV transfer is the connector's own time."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from labkit.telemetry.observer_schema import KVTransfer, RequestAllocated
from labkit.telemetry.replay import Replay
from labkit.telemetry.source import TelemetryDelta
from labkit.viz.requests import response_id
from labkit.viz.state import TransferState
from labkit.viz.streaming import StreamingView

RECORDINGS = Path(__file__).resolve().parents[1] / "labkit" / "data" / "recordings"
EPS = 1e-6


def fold(deltas: list[TelemetryDelta]) -> tuple[TransferState, StreamingView]:
    st = TransferState(max_requests=200)
    view = StreamingView(st, ["vllm"], link="nvlink")
    for d in deltas:
        for b in d.observer:
            st.apply(b)
        for ev in d.timeline:
            st.apply_timeline(ev)
    view.update()
    return st, view


def proxy_ids_by_response(deltas: list[TelemetryDelta]) -> dict[str, str]:
    """decode response id -> proxy id, as the proxy recorded them at finish (independently
    of the views)."""
    return {ev["decode_id"]: ev["req_id"] for d in deltas for ev in d.timeline
            if ev["event"] == "finish" and ev.get("decode_id")}


def connector_times(deltas: list[TelemetryDelta]) -> dict[str, float]:
    """proxy id -> seconds of decode's KVTransfer "recv"."""
    by_response = proxy_ids_by_response(deltas)
    out = {}
    for d in deltas:
        for b in d.observer:
            for ev in b.events:
                if isinstance(ev, KVTransfer) and ev.direction == "recv":
                    out[by_response[response_id(ev.req_id)]] = ev.end - ev.start
    return out


def no_external_kv(deltas: list[TelemetryDelta]) -> set[str]:
    """Proxy ids of ExampleConnector requests to which decode allocated no external tokens:
    the prompt's whole blocks were all in decode's own prefix cache (a re-sent prompt), so
    nothing was loaded. (NIXL's RequestAllocated counts differently: none excluded there.)"""
    example = {ev["req_id"] for d in deltas for ev in d.timeline
               if ev["event"] == "arrival" and ev.get("connector") == "example"}
    by_response = proxy_ids_by_response(deltas)
    return {rid for d in deltas for b in d.observer if b.role == "decode" for ev in b.events
            if isinstance(ev, RequestAllocated) and ev.num_external_tokens == 0
            and (rid := by_response.get(response_id(ev.req_id))) in example}


def check_one_truth(deltas: list[TelemetryDelta]) -> int:
    st, view = fold(deltas)
    proxy_ids = [ev["req_id"] for d in deltas for ev in d.timeline if ev["event"] == "arrival"]
    finish = {ev["req_id"]: ev["ts"] for d in deltas for ev in d.timeline if ev["event"] == "finish"}
    assert proxy_ids and len(set(proxy_ids)) == len(proxy_ids)
    # One streaming row per request, in the figure itself (each phase trace: one bar per row)
    queue, prefill, transfer, decode = view.figure.data[:4]
    labels = [st.label(r) for r in proxy_ids]
    for tr in (queue, prefill, transfer, decode):
        assert sorted(tr.y) == sorted(labels), tr.name
    assert list(view.figure.layout.yaxis.categoryarray) == labels
    t0 = st.t0
    recv = connector_times(deltas)
    # every request with KV to move went through the connector
    assert set(recv) == set(proxy_ids) - no_external_kv(deltas)
    for rid, label in zip(proxy_ids, labels, strict=True):
        spans = []
        for tr in (queue, prefill, transfer, decode):
            i = list(tr.y).index(label)
            a = t0 + tr.base[i]
            spans.append((a, a + tr.x[i]))
        (q0, q1), (p0, p1), (x0, x1), (d0, d1) = spans
        assert q0 <= q1 + EPS and q1 <= p0 + EPS and p0 <= p1 + EPS, (rid, spans)
        assert p1 <= x0 + EPS and x0 <= x1 + EPS and x1 <= d0 + EPS and d0 <= d1 + EPS, (rid, spans)
        assert d1 == pytest.approx(finish[rid], abs=1e-6)  # ends at the request's finish
        if rid in recv:  # the connector's own time, within 1 ms (else the proxy's wait, so labelled)
            assert abs((x1 - x0) - recv[rid]) < 1e-3
    return len(proxy_ids)


@pytest.mark.parametrize("name", ["real-h200x2-nixl", "real-h100-1gpu-example",
                                  "real-h200x4-nixl-tp2", "sim-lab-1b-pd"])  # fmt: skip
def test_shipped_recording_one_row_per_request(name):
    deltas = list(Replay(RECORDINGS / f"{name}.lkrec", speed=None))
    assert check_one_truth(deltas) >= 7


def test_simulated_lab_one_row_per_request(tmp_path):
    from labkit.lab import Lab

    with Lab(mode="sim", model="lab-1b", num_gpu_blocks=600, run_dir=tmp_path / "run") as lab:  # real-time clock
        tel = lab.telemetry()
        deltas = [tel.poll()]
        for n in (700, 300, 1100):
            lab.complete(list(range(1000, 1000 + n)), max_tokens=8)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            deltas.append(tel.poll())
            events = [ev for d in deltas for ev in d.timeline]
            recvs = [ev for d in deltas for b in d.observer for ev in b.events
                     if isinstance(ev, KVTransfer) and ev.direction == "recv"]
            if sum(ev["event"] == "finish" for ev in events) == 3 and len(recvs) == 3:
                break
            time.sleep(0.1)
    assert check_one_truth(deltas) == 3


def test_block_map_at_255k_blocks_shows_cached_and_in_use_and_zooms_to_blocks():
    """The TP=2 REAL recording (253,995 blocks per engine): super-cells keep cached and in-use
    regions visible, and zooming shows single blocks in their request's colour."""
    import numpy as np

    from labkit.telemetry.source import SourceInfo
    from labkit.viz.blocks import MAX_CELLS, Z_REQ0, BlockMapView
    from labkit.viz.state import BlockMapState

    rp = Replay(RECORDINGS / "real-h200x4-nixl-tp2.lkrec", speed=None)
    info = SourceInfo.from_dict(rp.describe())
    blocks = BlockMapState({e.name: (e.role, e.kind, e.num_blocks, e.block_size) for e in info.engines})
    transfers = TransferState()
    view = BlockMapView(blocks, ids=transfers.ids)
    assert max(e.num_blocks for e in info.engines) > 250_000
    seen = None
    for d in rp:
        for b in d.observer:
            blocks.apply(b)
            transfers.apply(b)
        for ev in d.timeline:
            transfers.apply_timeline(ev)
        counts = blocks.engines["decode"].counts()
        if counts[1] > 0 and counts[2] > 0:  # cached and in-use blocks at once
            seen = blocks.engines["decode"].state.copy()
            break
    assert seen is not None
    assert list(blocks.engines) == ["prefill", "decode"]  # worker ranks get no map of their own
    view.update()
    z = np.asarray(view.figure.data[1].z)
    assert len(z) <= MAX_CELLS
    assert ((z >= 1) & (z <= 4)).any(), "cached super-cells are visible"
    assert ((z >= 5) & (z <= 12)).any(), "in-use super-cells are visible"
    used = int(np.flatnonzero(seen == 2)[0])
    view.zoom("decode", used - 10)
    fine = np.asarray(view.figure.data[1].z)
    text = view.figure.data[1].text
    assert len(fine) == MAX_CELLS and text[10].startswith(f"block {used}<br>request #")
    assert fine[10] >= Z_REQ0  # one block, in its request's colour
    owner = blocks.engines["decode"].req_names[blocks.engines["decode"].owner[used]]
    from labkit.viz.style import REQUEST_COLORS
    assert REQUEST_COLORS[int(fine[10]) - Z_REQ0] == transfers.ids.color(owner)
    assert transfers.ids.resolve(owner) in transfers.requests  # the Gantt's row of that request


@pytest.mark.parametrize("connector", ["example", "nixl"])
def test_simulated_lab_per_layer_timings_follow_the_connector(tmp_path, connector):
    """The simulator reports per-layer hooks as the observer inside vLLM does: ExampleConnector
    saves one file per layer inside prefill's forward (bars that add up to its KVTransfer
    "send") and decode's wait_for_layer_load returns at once; NIXL saves nothing per layer."""
    from labkit.lab import Lab
    from labkit.telemetry.observer_schema import LayerTiming

    with Lab(mode="sim", model="lab-1b", num_gpu_blocks=600, connector=connector,
             run_dir=tmp_path / "run") as lab:  # fmt: skip
        tel = lab.telemetry()
        batches = list(tel.poll().observer)
        lab.complete(list(range(1000, 1700)), max_tokens=4)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            batches += tel.poll().observer
            if any(isinstance(e, KVTransfer) and e.direction == "recv" for b in batches for e in b.events):
                break
            time.sleep(0.1)
    layers = {(b.role, e.op): [] for b in batches for e in b.events if isinstance(e, LayerTiming)}
    for b in batches:
        for e in b.events:
            if isinstance(e, LayerTiming):
                layers[(b.role, e.op)].append(e)
    send = next(e for b in batches for e in b.events if isinstance(e, KVTransfer) and e.direction == "send")
    saves = layers[("prefill", "save")]
    num_layers = len({e.layer for e in saves})
    assert num_layers > 1 and len(saves) == num_layers  # one prompt, one pass
    st = TransferState()
    view = StreamingView(st, ["sim"])
    for b in batches:
        st.apply(b)
    view.update()
    note = next(a.text for a in view.figure.layout.annotations if a.name == "layer-note")
    save_bars, load_bars = view.figure.data[4], view.figure.data[5]
    if connector == "example":
        assert all(e.end - e.start > 20e-6 for e in saves)
        assert sum(e.end - e.start for e in saves) == pytest.approx(send.end - send.start, rel=1e-6)
        assert sum(e.num_bytes for e in saves) == pytest.approx(send.num_bytes, rel=0.01)
        loads = layers[("decode", "load")]
        assert len(loads) == num_layers and all(e.end == e.start for e in loads)
        assert len(save_bars.x) == num_layers and min(save_bars.y) > 0.02  # ms
        assert len(load_bars.x) == 0 and "load (decode): returns at once" in note
    else:
        assert all(e.end == e.start for e in saves)
        assert ("decode", "load") not in layers
        assert len(save_bars.x) == 0 and len(load_bars.x) == 0
        assert "has no per-layer phase here" in note and "one read" in note


def test_trace_phases_add_up_to_the_proxy_wait(tmp_path):
    """Notebook 06's three numbers as one story: the proxy's wait for decode's first byte is
    decode taking the request + the connector's own transfer (its KVTransfer recv) + decode's
    first step; prefill's send is named apart."""
    from labkit.lab import Lab
    from labkit.teach import live

    with Lab(mode="sim", model="lab-tiny", chunk=512, num_gpu_blocks=96, max_num_seqs=16,
             run_dir=tmp_path / "run") as lab:  # fmt: skip
        trace = live.send(lab, prompt_len=1000, max_tokens=16)
    rows = trace.phases().rows
    wait, taken, transfer, first_step, send = (r["ms"] for r in rows)
    assert "proxy" in rows[0]["part"] and "prefill's send" in rows[4]["part"]
    assert taken + transfer + first_step == pytest.approx(wait, abs=1e-6)
    assert min(taken, transfer, first_step) >= 0
    recv = next(e for b in trace.observer for e in b.events
                if isinstance(e, KVTransfer) and e.direction == "recv")
    assert transfer == pytest.approx((recv.end - recv.start) * 1e3, abs=1e-3)
    table = {r["ms"] for r in trace.transfers().rows}
    assert any(abs(t - transfer) < 1e-3 for t in table)  # the same figure as trace.transfers()
