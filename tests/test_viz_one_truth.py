"""The views tell one consistent truth (issue 14): a simulated PD lab and the shipped REAL
recordings, driven through the streaming view, give one row per request whose phases are
ordered, end at the request's finish, and whose KV transfer is the connector's own time."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from labkit.telemetry.observer_schema import KVTransfer
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


def connector_times(deltas: list[TelemetryDelta]) -> dict[str, float]:
    """proxy id -> seconds of decode's KVTransfer "recv", joined independently of the views:
    through the decode response id the proxy recorded at finish."""
    by_response: dict[str, str] = {}
    for d in deltas:
        for ev in d.timeline:
            if ev["event"] == "finish" and ev.get("decode_id"):
                by_response[ev["decode_id"]] = ev["req_id"]
    out = {}
    for d in deltas:
        for b in d.observer:
            for ev in b.events:
                if isinstance(ev, KVTransfer) and ev.direction == "recv":
                    out[by_response[response_id(ev.req_id)]] = ev.end - ev.start
    return out


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
    assert set(recv) == set(proxy_ids)  # every request's KV went through the connector
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
        assert abs((x1 - x0) - recv[rid]) < 1e-3  # the connector's own time, within 1 ms
    return len(proxy_ids)


@pytest.mark.parametrize("name", ["real-h200x2-nixl", "real-h200-1gpu-example",
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
