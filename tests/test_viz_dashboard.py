"""The dashboard polls a TelemetrySource, folds, redraws; its loop runs at >= 4 Hz."""
from __future__ import annotations

import asyncio
import time

import numpy as np

from labkit.bench.viz_refresh import run
from labkit.telemetry.observer_schema import ObserverBatch, RequestAllocated
from labkit.telemetry.source import GpuSample, TelemetryDelta, TelemetrySource
from labkit.viz.dashboard import Dashboard
from labkit.viz.synthetic import SyntheticSource

GiB = 2**30


class ScriptedSource:
    """Hands out the given deltas one per poll, then empty ones."""

    def __init__(self, deltas: list[TelemetryDelta], info: dict) -> None:
        self.deltas, self.info, self.num_polls = list(deltas), info, 0

    def poll(self) -> TelemetryDelta:
        self.num_polls += 1
        return self.deltas.pop(0) if self.deltas else TelemetryDelta()

    def describe(self) -> dict:
        return self.info


def info(kind: str) -> dict:
    return {"kind": kind,
            "engines": [{"name": "p", "role": "prefill", "gpus": [0], "num_blocks": 32, "block_size": 16}],
            "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_bytes": 80 * GiB}]}  # fmt: skip


def test_refresh_folds_and_redraws_every_view():
    deltas = [
        TelemetryDelta(observer=[ObserverBatch("p", "prefill", "sim", 0.0, [RequestAllocated(0.0, "a", [1, 2], 0)])],
                       timeline=[{"req_id": "a", "ts": 1.0, "event": "arrival"},
                                 {"req_id": "a", "ts": 1.1, "event": "prefill_start"}],
                       gpu_samples=[GpuSample(1.0, 0, 10 * GiB, 80 * GiB, {"p": 9 * GiB})]),
    ]  # fmt: skip
    src = ScriptedSource(deltas, info("sim"))
    assert isinstance(src, TelemetrySource)
    dash = Dashboard(src)
    assert "SIMULATED" in dash.header.value
    for view in dash.views.values():
        assert "SIMULATED" in view.figure.layout.title.text
    timings = dash.refresh()
    assert set(timings) == {"poll", "fold", "blocks", "streaming", "memory", "schedule", "latency",
                            "offload"}
    z = np.asarray(dash.views["blocks"].figure.data[0].z)
    assert z[1] >= 4 and z[2] >= 4  # in use by "a"
    assert list(dash.views["streaming"].figure.data[0].y) == ["#1"]  # queued: request #1 ("a")
    assert dash.views["memory"].figure.data[-1].y[-1] == 80  # capacity line in GiB
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_header_names_real_gpu_and_replay():
    assert "REAL vLLM on NVIDIA H100 80GB HBM3" in Dashboard(ScriptedSource([], info("vllm"))).header.value
    assert "REPLAY" in Dashboard(ScriptedSource([], info("replay"))).header.value


def test_thread_loop_at_4hz_and_survives_errors():
    src = SyntheticSource(num_blocks=2000, steps_per_poll=2)
    dash = Dashboard(src, interval=0.25)
    stamps: list[float] = []
    refresh = dash._safe_refresh

    def stamped() -> None:
        stamps.append(time.monotonic())
        refresh()

    dash._safe_refresh = stamped  # type: ignore[method-assign]
    dash.start()
    try:
        time.sleep(1.4)
        assert dash.running
    finally:
        dash.stop()
    assert not dash.running
    # one refresh every 0.25 s: not slower, and not a loop that forgets to wait (a busy
    # machine may delay one refresh, so the median gap is what is checked)
    assert 3 <= len(stamps) <= 8, len(stamps)
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    assert 0.2 <= gaps[len(gaps) // 2] <= 0.4, gaps
    assert dash.num_refreshes == len(stamps)
    n = dash.num_refreshes
    time.sleep(0.3)
    assert dash.num_refreshes == n, "stop() stops"

    def broken() -> TelemetryDelta:
        raise OSError("engine gone")

    dash.source.poll = broken  # type: ignore[method-assign]
    dash._safe_refresh()
    assert "engine gone" in dash.status.value


def test_asyncio_loop():
    dash = Dashboard(SyntheticSource(num_blocks=2000, steps_per_poll=2), interval=0.1)

    async def main() -> None:
        dash.start()
        assert dash._task is not None and dash._thread is None
        await asyncio.sleep(0.8)
        dash.stop()

    asyncio.run(main())
    assert dash.num_refreshes >= 4


def test_bench_reports_every_view():
    r = run(refreshes=3, num_blocks=20_000, steps_per_poll=2)
    assert set(r["per_stage_ms"]) >= {"blocks", "streaming", "memory", "schedule", "latency"}
    assert r["cpu_s"] > 0 and r["wall_s"] > 0


# ---------------------------------------------------------------- a replay's time controls
class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _steps(dash: Dashboard) -> int:
    return sum(len(t.x or ()) for t in dash.views["schedule"].figure.data if t.type == "bar")


def test_replay_controls_play_pause_seek_speed_and_an_end_that_stays_drawn():
    from labkit.telemetry.replay import replay

    clock = FakeClock()
    rp = replay("real-h200x2-nixl", speed=1.0, clock=clock)  # 3.1 s of a real 2 x H200 run
    dash = Dashboard(rp, autoplay=False)
    rc = dash.replay_controls
    assert rc is not None and rp.paused and "paused" in rc.clock.value
    assert dash.controls.apply_button.disabled  # a replay has no Apply
    # The recorded config, from the recording's header: chunk, TP, PP, dtype, block size.
    for word in ("max_num_batched_tokens", "kv_cache_dtype", "block_size", "nixl", "126532"):
        assert word in rc.config.value, word
    clock.t += 5
    dash.refresh()
    assert rp.position == 0.0 and _steps(dash) == 0  # paused: nothing moves
    rc.play_button.click()
    assert not rp.paused and rc.play_button.description == "pause"
    clock.t += 1.0
    dash.refresh()
    assert rc.position.value == 1.0 and "1.0 / 3.1 s" in rc.clock.value
    at_1s = _steps(dash)
    assert at_1s > 0
    rc.play_button.click()  # pause
    clock.t += 5
    dash.refresh()
    assert rp.paused and rc.position.value == 1.0 and _steps(dash) == at_1s
    rc.speed.value = 2.0
    rc.play_button.click()
    clock.t += 0.5  # 1 s of replay at 2x
    dash.refresh()
    assert rp.speed == 2.0 and rc.position.value == 2.0 and _steps(dash) > at_1s
    rc.position.value = 0.5  # the learner drags the slider back: the views start over
    assert rp.position == 0.5 and rp.generation == 1
    dash.refresh()
    assert 0 < _steps(dash) < at_1s
    clock.t += 10  # past the end
    dash.refresh()
    end = _steps(dash)
    assert rc.ended and rp.paused and rc.play_button.description == "replay"
    assert abs(rc.position.value - rp.duration) < 0.06 and "ended" in rc.clock.value
    for _ in range(3):  # it stays drawn
        clock.t += 1
        dash.refresh()
    assert _steps(dash) == end > at_1s
    rc.play_button.click()  # again, from the start
    assert not rp.paused and rp.position == 0.0 and not rc.ended


def test_page_watch_starts_the_page_timer_sees_beats_and_calls_a_closed_page_gone():
    from labkit.teach.page import PageWatch

    clock = FakeClock()
    seen, gone = [], []
    watch = PageWatch(on_seen=lambda: seen.append(1), on_gone=lambda: gone.append(1),
                      timeout_s=10, clock=clock)
    assert not watch.check() and not watch.beat.playing  # just started: no (re)start yet
    clock.t += 4
    assert not watch.check() and watch.beat.playing  # no beat in 3 s: start the page's timer
    for _ in range(30):  # the page ticks: value moves, never "gone" (30 s > timeout)
        clock.t += 1
        watch.beat.value += 1
        assert not watch.check()
    assert seen == [1] and watch.num_beats == 30 and gone == []
    clock.t += 10.5  # the page closed: no beat for more than the timeout
    assert watch.check() and gone == [1] and not watch.beat.playing
    assert watch.check() and gone == [1]  # once
    # JupyterLab (no timeout): a quiet page is never called gone.
    lab = PageWatch(on_gone=lambda: gone.append(2), timeout_s=None, clock=clock)
    lab.beat.value += 1
    clock.t += 1000
    assert not lab.check() and gone == [1]


def test_replay_page_plays_when_the_page_is_first_seen():
    from labkit.teach.page import ReplayPage

    page = ReplayPage("real-h200x2-nixl")
    try:
        assert page.replay.paused and page.box.children[0] is page.watch.beat
        page.watch.beat.value += 1  # the page's first heartbeat
        assert not page.replay.paused
    finally:
        page.stop()
    assert not page.dashboard.running
