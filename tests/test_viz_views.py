"""Each view built from a scripted event sequence: the figure DATA follows the events, and the
kind (SIMULATED / REAL vLLM / REPLAY) is in every title."""
from __future__ import annotations

import numpy as np
import pytest
from labfixtures import FIXTURES

from labkit.telemetry.metrics import MetricsSnapshot
from labkit.telemetry.observer_schema import (
    KVTransfer,
    LayerTiming,
    ObserverBatch,
    PoolSnapshot,
    RequestAllocated,
    RequestFinished,
    StepScheduled,
)
from labkit.telemetry.source import EngineMemory, GpuSample, MetricsSample, SourceInfo
from labkit.viz.blocks import MAX_CELLS, Z_REQ0, BlockMapView, block_grid
from labkit.viz.latency import LatencyView
from labkit.viz.memory import MemoryView
from labkit.viz.schedule import ScheduleView
from labkit.viz.state import BlockMapState, LatencyState, MemoryState, ScheduleState, TransferState
from labkit.viz.streaming import StreamingView

GiB = 2**30


def ob(events, engine="prefill-0", role="prefill", kind="sim") -> ObserverBatch:
    return ObserverBatch(engine, role, kind, 0.0, events)


def step(n, budget, sched, new_blocks, computed, finished=()) -> StepScheduled:
    return StepScheduled(n, float(n), budget, sched, new_blocks, computed, [], list(finished))


def test_block_map_follows_allocation_sharing_and_free():
    st = BlockMapState({"prefill-0": ("prefill", "sim", 64, 16)})
    view = BlockMapView(st)
    assert view.update()
    z0 = np.asarray(view.figure.data[0].z)
    assert len(z0) == 64 and (z0 == 0).all()
    st.apply(ob([RequestAllocated(0.0, "a", [1, 2, 3], 0), step(1, 64, {"a": 40}, {"a": [1, 2, 3]}, {"a": 0})]))
    st.apply(ob([RequestAllocated(0.0, "b", [1, 2, 4], 0), step(2, 64, {"b": 8}, {"b": [1, 2, 4]}, {"b": 32})]))
    assert view.update()
    z1 = np.asarray(view.figure.data[0].z)
    assert z1[1] == z1[2] == 2, "shared-prefix blocks have their own colour"
    assert z1[3] >= Z_REQ0 and z1[4] >= Z_REQ0, "in-use blocks take their request's colour"
    text = view.figure.data[0].text
    assert "shared by a, b" in text[1] and "16 tokens" in text[1] and text[4].startswith("block 4<br>request b")
    assert "in use 4 (shared 2)" in view.figure.layout.annotations[0].text
    legend = [tr.name for tr in view.figure.data if tr.showlegend is not False and tr.name]
    assert {"free", "cached (evictable)", "shared prefix"} <= set(legend)
    st.apply(ob([RequestFinished(3.0, "a", [1, 2, 3], False)]))
    st.apply(ob([step(3, 64, {}, {}, {}, finished=["b"])]))
    assert view.update()
    z2 = np.asarray(view.figure.data[0].z)
    assert z2[1:5].tolist() == [1, 1, 0, 0], "full blocks stay cached, tails are free"
    assert not view.update(), "no new events: no redraw"
    assert "SIMULATED" in view.figure.layout.title.text
    assert "SIMULATED" in view.figure.layout.annotations[0].text


def test_block_map_100k_blocks_is_bounded_super_cells():
    n = 100_000
    st = BlockMapState({"d": ("decode", "vllm", n, 16)})
    rng = np.random.default_rng(1)
    state = np.zeros(n, np.uint8)
    state[: n // 2] = 2  # first half in use, second half free
    state[n // 2 : n // 2 + 1000] = 1
    st.apply(ob([PoolSnapshot(0.0, n, n // 2, state.tobytes())], engine="d", role="decode", kind="vllm"))
    grid = block_grid(st.engines["d"])
    assert grid.num_cells <= MAX_CELLS and grid.blocks_per_cell == 25
    assert grid.z[0] == 1 + 4 * 1 + 3 and grid.z[-1] == 0  # all in use: full shade; free
    cached = grid.z[(n // 2) // 25 + 1]  # a super-cell of 25 cached blocks
    assert cached == 1 + 4 * 0 + 3
    assert grid.counts.tolist() == [n // 2 - 1000, 1000, n // 2 - 1, 0]
    view = BlockMapView(st)
    view.update()
    assert len(view.figure.data[0].z) == grid.num_cells
    assert "REAL vLLM" in view.figure.layout.title.text
    churn = rng.integers(0, 4, n, dtype=np.uint8)
    st.apply(ob([PoolSnapshot(1.0, n, 0, churn.tobytes())], engine="d", role="decode", kind="vllm"))
    view.update()
    z = np.asarray(view.figure.data[0].z)
    assert set(np.unique(z).tolist()) <= set(range(13)) and (z > 0).all()  # every cell has a mix
    view.zoom("d", 5000)
    fine = np.asarray(view.figure.data[0].z)
    assert len(fine) == MAX_CELLS and view.figure.data[0].text[0].startswith("block 5000<br>")
    assert "zoom: blocks 5,000" in view.figure.layout.annotations[0].text
    view.zoom("d", None)
    assert len(view.figure.data[0].z) == grid.num_cells


def test_streaming_view_bars_appear():
    st = TransferState()
    view = StreamingView(st, ["sim"], link="nvlink")
    for ev, t in [("arrival", 0.0), ("prefill_start", 0.01), ("prefill_end", 0.05),
                  ("kv_transfer_start", 0.05), ("kv_transfer_end", 0.08), ("first_token", 0.09),
                  ("finish", 0.3)]:
        st.apply_timeline({"req_id": "req-a", "ts": 100 + t, "event": ev})
    view.update()
    queue, prefill, transfer, decode = view.figure.data[:4]
    # seconds since the run started; the row is named by its number
    assert list(prefill.x) == pytest.approx([0.04]) and list(prefill.base) == pytest.approx([0.01])
    assert list(transfer.x) == pytest.approx([0.03]) and list(decode.x) == pytest.approx([0.22])
    assert list(prefill.y) == ["#1"] and "proxy" in transfer.customdata[0][3]
    assert len(view.figure.data[4].x) == 0  # no layer timings yet
    st.apply(ob([KVTransfer(0, "req-a", "recv", 1000, 64_000_000, 100.05, 100.07, "NixlConnector")]
                + [LayerTiming(0, "load", f"model.layers.{i}.attn", 100.05 + i / 1e3, 100.0505 + i / 1e3,
                               4_000_000, ["req-a"]) for i in range(4)]
                + [LayerTiming(0, "save", f"model.layers.{i}.attn", 100.0, 100.000002, 4_000_000, ["req-a"])
                   for i in range(4)], engine="decode-0", role="decode"))
    view.update()
    assert list(transfer.x) == pytest.approx([0.02])  # the connector's own 20 ms
    load = view.figure.data[5]
    assert list(load.x) == ["L0", "L1", "L2", "L3"] and list(load.y) == pytest.approx([0.5] * 4)
    note = next(a.text for a in view.figure.layout.annotations if a.name == "layer-note")
    assert "save (decode): returns at once" in note and "NIXL" in note
    rate, peak, measured = view.figure.data[6], view.figure.data[7], view.figure.data[8]
    assert list(rate.y) == pytest.approx([3.2]) and list(rate.x) == ["#1"]
    assert view.figure.layout.yaxis3.type == "log"
    assert peak.y[0] == pytest.approx(450.0) and "NVLink" in peak.name
    assert measured.y[0] == pytest.approx(390.1) and "measured" in measured.name
    assert "SIMULATED" in view.figure.layout.title.text


def test_memory_view_moves():
    info = SourceInfo.from_dict({
        "kind": "vllm", "gpus": [{"index": 0, "name": "NVIDIA H100", "total_bytes": 80 * GiB}],
        "engines": [{"name": "p", "role": "prefill", "gpus": [0]}, {"name": "d", "role": "decode", "gpus": [0]}],
    })
    st = MemoryState()
    view = MemoryView(st, info)
    st.apply_engine_memory(EngineMemory("p", 0, 2 * GiB, 10 * GiB))
    st.apply_sample(GpuSample(1.0, 0, 20 * GiB, 80 * GiB, {"p": 14 * GiB, "d": 5 * GiB}))
    view.update()
    bars = {tr.name: tr.y[0] for tr in view.figure.data[: len(view.bar_keys)]}
    assert bars["p: KV cache"] == pytest.approx(10) and bars["free"] == pytest.approx(60)
    st.apply_sample(GpuSample(2.0, 0, 40 * GiB, 80 * GiB, {"p": 14 * GiB, "d": 25 * GiB}))
    view.update()
    bars = {tr.name: tr.y[0] for tr in view.figure.data[: len(view.bar_keys)]}
    assert bars["free"] == pytest.approx(40) and bars["d: engine other"] == pytest.approx(25)
    other = view.figure.data[view.area_index[(0, "engine other")]]
    assert list(other.y) == pytest.approx([7, 27]) and list(other.x) == pytest.approx([0, 1])
    assert "REAL vLLM" in view.figure.layout.title.text


def test_schedule_view_chunks_fit_the_budget():
    st = ScheduleState()
    view = ScheduleView(st, [("prefill-0", "prefill", "sim")])
    budget = 512
    # A 1300-token prompt in chunks beside two decoding requests.
    st.apply(ob([step(1, budget, {"x": 1, "y": 1, "long": 510}, {}, {"x": 90, "y": 40, "long": 0}),
                 step(2, budget, {"x": 1, "y": 1, "long": 510}, {}, {"x": 91, "y": 41, "long": 510}),
                 step(3, budget, {"x": 1, "y": 1, "long": 280}, {}, {"x": 92, "y": 42, "long": 1020})]))
    view.update()
    pre, dec, bud = view.figure.data
    assert list(pre.x) == [0.0, 1.0, 2.0] and list(pre.y) == [510, 510, 280]  # s since the first step
    assert pre.text[0].startswith("step 1<br>request long: prefill chunk 510")
    assert list(dec.y) == [2, 2, 2] and list(dec.base) == [510, 510, 280], "decodes sit on the chunk"
    assert list(bud.y) == [budget] * 3
    for s in (0.0, 1.0, 2.0):
        total = sum(y for x, y in zip(pre.x, pre.y, strict=True) if x == s) + sum(y for x, y in zip(dec.x, dec.y, strict=True) if x == s)
        assert total <= budget
    assert "SIMULATED" in view.figure.layout.title.text


def test_schedule_view_engines_share_one_time_axis():
    st = ScheduleState()
    view = ScheduleView(st, [("p", "prefill", "vllm"), ("d", "decode", "vllm")])
    st.apply(ob([StepScheduled(900, 100.0, 512, {"a": 512}, {}, {"a": 0}, [], [])], engine="p", role="prefill"))
    st.apply(ob([StepScheduled(5, 100.5, 512, {"b": 1}, {}, {"b": 9}, [], [])], engine="d", role="decode"))
    view.update()
    assert list(view.figure.data[0].x) == [0.0] and list(view.figure.data[4].x) == [0.5]
    assert view.figure.layout.xaxis.matches == "x2" or view.figure.layout.xaxis2.matches == "x"


def test_schedule_view_decode_engine_budget_off_scale():
    st = ScheduleState()
    view = ScheduleView(st, [("decode-0", "decode", "vllm")])
    st.apply(ob([step(i, 2048, {"x": 1, "y": 1}, {}, {"x": 90 + i, "y": 40 + i}) for i in range(1, 4)]
                + [step(0, 2048, {"z": 1}, {}, {"z": 7})], engine="decode-0", role="decode", kind="vllm"))
    view.update()
    pre, dec, bud = view.figure.data
    assert len(pre.x) == 0 and list(dec.y) == [2, 2, 2, 1]
    assert len(bud.y) == 0 and "token budget 2048 (off scale: peak 2)" in view.figure.layout.annotations[0].text
    assert "REAL vLLM" in view.figure.layout.annotations[0].text


def test_latency_view_cdfs():
    st = LatencyState()
    view = LatencyView(st, [("decode-0", "decode", "replay")], "replay")
    for i, ttft in enumerate([0.1, 0.2, 0.4]):
        st.apply_timeline({"req_id": f"r{i}", "ts": 10.0 * i, "event": "arrival"})
        st.apply_timeline({"req_id": f"r{i}", "ts": 10.0 * i + ttft, "event": "first_token"})
        st.apply_timeline({"req_id": f"r{i}", "ts": 10.0 * i + ttft + 0.02, "event": "token"})
    snap = MetricsSnapshot.parse((FIXTURES / "metrics/nixl-decode.txt").read_text())
    st.apply_metrics(MetricsSample("decode-0", 0.0, snap, "decode", "replay"))
    view.update()
    ttft_proxy, ttft_engine, itl_proxy, _ = view.figure.data
    assert list(ttft_proxy.x) == pytest.approx([100, 200, 400])
    assert list(ttft_proxy.y) == pytest.approx([1 / 3, 2 / 3, 1])
    assert list(itl_proxy.x) == pytest.approx([20, 20, 20])
    assert ttft_engine.y[-1] == pytest.approx(1.0) and len(ttft_engine.x) > 5
    assert "REPLAY" in view.figure.layout.title.text


def test_png_render(tmp_path):
    """Needs kaleido >= 1 + Chrome, or kaleido 0.2 with $LABKIT_PLOTLYJS (a plotly.js v2)."""
    pytest.importorskip("kaleido")
    from labkit.viz.export import save_png

    st = ScheduleState()
    view = ScheduleView(st, [("p", "prefill", "sim")])
    st.apply(ob([step(1, 64, {"a": 60}, {}, {"a": 0})], engine="p"))
    view.update()
    try:
        out = save_png(view.figure, tmp_path / "s.png")
    except RuntimeError as e:
        pytest.skip(str(e))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_memory_view_block_count_override_shows_the_pool():
    """num_gpu_blocks=128: the engine allocates 128 blocks, not the ~71 GiB its log calls
    available; the KV segment is blocks x block bytes, and the tiny segments are named."""
    info = SourceInfo.from_dict({
        "kind": "sim", "gpus": [{"index": 0, "name": "NVIDIA H100", "total_bytes": 80 * GiB}],
        "engines": [{"name": "prefill", "role": "prefill", "gpus": [0], "num_blocks": 128,
                     "block_size": 16, "model": "lab-1b"}],
    })
    st = MemoryState()
    view = MemoryView(st, info)
    block = 16 * 65536  # lab-1b in bf16: 16 layers x 2 x 8 heads x 128 x 2 B per token
    st.apply_engine_memory(EngineMemory("prefill", 0, 40 * 2**20, 71 * GiB, "prefill", "sim"))
    st.apply_sample(GpuSample(1.0, 0, 71 * GiB + 40 * 2**20, 80 * GiB,
                              {"prefill": 71 * GiB + 40 * 2**20}, kind="sim"))
    view.update()
    bars = {tr.name: tr for tr in view.figure.data[: len(view.bar_keys)]}
    assert bars["prefill: KV cache"].y[0] * GiB == pytest.approx(128 * block)
    assert bars["prefill: KV cache"].text[0] == "128 MiB"
    assert bars["prefill: weights"].text[0] == "40 MiB"
    assert bars["free"].y[0] * GiB == pytest.approx(80 * GiB - 40 * 2**20 - 128 * block)
    note = next(a.text for a in view.figure.layout.annotations if a.name == "segments")
    assert "weights 40 MiB" in note and "KV 128 MiB<br>   (128 blocks × 1 MiB)" in note
    assert "s since" in view.figure.layout.xaxis2.title.text


def test_memory_view_block_bytes_from_describe_fp8(tmp_path):
    """An fp8 KV cache has half the block bytes: the lab's describe() says so per engine and the
    memory view's KV segment is blocks x those bytes (a recording without the field falls back
    to the model's dtype)."""
    from labkit.lab import Lab

    with Lab(mode="sim", model="lab-1b", num_gpu_blocks=128, kv_cache_dtype="fp8",
             run_dir=tmp_path / "run") as lab:  # fmt: skip
        desc = lab.telemetry().describe()
    bf16_block = 16 * 65536
    assert {e["kv_bytes_per_block"] for e in desc["engines"]} == {bf16_block // 2}
    info = SourceInfo.from_dict(desc)
    view = MemoryView(MemoryState(), info)
    assert view.pools["prefill"] == (128, bf16_block // 2)
    assert "128 blocks × 512 KiB" in view.pool_note["prefill"]
    for e in desc["engines"]:
        del e["kv_bytes_per_block"]  # an older recording's header
    assert MemoryView(MemoryState(), SourceInfo.from_dict(desc)).pools["prefill"] == (128, bf16_block)


def test_every_view_titles_its_kind_on_a_line_of_its_own_and_follows_its_box():
    """The kind (SIMULATED / REAL vLLM / REPLAY) is the title's second line, not an annotation
    placed from the right edge that a long title runs into; subplot titles start at their
    plot's left edge; no figure has a width of its own."""
    from pathlib import Path

    from labkit.telemetry.replay import Replay
    from labkit.viz.dashboard import Dashboard

    rp = Replay(Path(__file__).resolve().parents[1] / "labkit/data/recordings/real-h200x2-nixl.lkrec",
                speed=None)  # fmt: skip
    dash = Dashboard(rp)
    dash.refresh()
    for name, view in dash.views.items():
        layout = view.figure.layout
        first, second = layout.title.text.split("<br>")
        assert view.title in first and "REPLAY + REAL vLLM" in second, name
        assert layout.title.xanchor == "left" and layout.title.yanchor == "top"
        assert not [a for a in layout.annotations if a.name == "kind-badge"]
        assert layout.autosize and layout.width is None, name
        subtitles = [a for a in layout.annotations if a.name is None and a.yanchor == "bottom"]
        assert subtitles and all(a.xanchor == "left" for a in subtitles), name


def engines_8_synthetic(steps: int = 6) -> BlockMapState:
    """8 simulated engines: 4 synthetic PD pairs (labkit/viz/synthetic.py), 100k and 512
    blocks by turns, renamed prefill-<i> / decode-<i>."""
    from labkit.viz.synthetic import SyntheticSource

    pairs = [SyntheticSource(num_blocks=100_000 if i % 2 == 0 else 512, seed=i, arrival_p=0.9)
             for i in range(4)]
    st = BlockMapState({f"{r}-{i}": (r, "sim", src.num_blocks, 16)
                        for i, src in enumerate(pairs) for r in ("prefill", "decode")})
    for _ in range(steps):
        for i, src in enumerate(pairs):
            for b in src.poll().observer:
                name = b.engine_id.replace("-0", f"-{i}")
                st.apply(ObserverBatch(name, b.role, b.kind, b.ts, b.events))
    return st


def test_block_map_of_8_engines_is_a_grid_of_two_columns():
    """8 simulated engines: 4 rows x 2 columns of maps (not 8 stacked, ~2,600 px), titles
    of short lines, the container's width; super-cells, hover, zoom and legend as with one."""
    import re

    from labkit.viz.blocks import map_grid

    st = engines_8_synthetic()
    names = list(st.engines)
    view = BlockMapView(st)
    assert view.update()
    lay = view.figure.layout
    heat = [t for t in view.figure.data if t.type == "heatmap"]
    assert len(heat) == 8 and all(len(t.z) > 0 for t in heat)
    xdom = {tuple(lay[t.xaxis.replace("x", "xaxis")].domain) for t in heat}
    ydom = {tuple(lay[t.yaxis.replace("y", "yaxis")].domain) for t in heat}
    assert (len(ydom), len(xdom)) == map_grid(8) == (4, 2)
    # row by row: map i sits in column i % 2, and its title is annotation i, on its left edge
    for i, t in enumerate(heat):
        x0 = lay[t.xaxis.replace("x", "xaxis")].domain[0]
        assert x0 == sorted(d[0] for d in xdom)[i % 2]
        assert names[i] in lay.annotations[i].text and lay.annotations[i].x == pytest.approx(x0)
    assert lay.height <= 1200 and lay.width is None and lay.autosize
    for a in lay.annotations[:8]:
        lines = re.sub(r"</?b>", "", a.text).split("<br>")
        assert len(lines) == 4 and max(map(len, lines)) <= 27, lines
    assert "SIMULATED" in lay.title.text and "SIMULATED" not in lay.annotations[0].text
    assert names[:2] == ["prefill-0", "decode-0"] and len(names) == 8
    big = heat[0]  # 100k blocks: super-cells with their mix, hover says so
    assert len(big.z) <= MAX_CELLS and "click: block by block" in big.text[0]
    assert "/cell" in lay.annotations[0].text
    fine = heat[2]  # prefill-1, 512 blocks: one per cell, in-use blocks in their request's colour
    assert fine.text[1].startswith("block 1<br>") and (np.asarray(fine.z) >= Z_REQ0).any()
    assert len([t for t in view.figure.data if t.type == "scatter"]) == 5  # the legend
    view.zoom(names[5], 5000)  # decode-2, 100k blocks
    assert "zoom: 5,000" in lay.annotations[5].text and len(heat[5].z) == MAX_CELLS
    view.zoom(names[5], None)
    assert "zoom" not in lay.annotations[5].text


def test_block_map_of_3_engines_hides_the_empty_cell():
    st = BlockMapState({n: ("decode", "sim", 64, 16) for n in ("decode-0", "decode-1", "decode-2")})
    view = BlockMapView(st)
    view.update()
    lay = view.figure.layout
    assert lay.height <= 700 and len(lay.annotations) == 3
    assert lay.xaxis4.visible is False and lay.yaxis4.visible is False
    assert lay.xaxis3.visible is not False
