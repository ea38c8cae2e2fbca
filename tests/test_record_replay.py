"""Record a telemetry source, replay it: the views must get the same data, seek/pause behave,
the header says what ran, a file cut short still reads, the shipped recording plays."""

from __future__ import annotations

import argparse
import dataclasses
import time
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from labfixtures import FIXTURES

from labkit.cli.replay import register_record, register_replay
from labkit.telemetry.metrics import MetricsSnapshot
from labkit.telemetry.recording import Recorder, read_recording, record
from labkit.telemetry.replay import Replay, replay, title_of
from labkit.telemetry.source import MetricsSample, SourceInfo, TelemetryDelta, TelemetrySource
from labkit.viz.dashboard import Dashboard
from labkit.viz.offload import OffloadState
from labkit.viz.state import (
    BlockMapState,
    LatencyState,
    MemoryState,
    ScheduleState,
    TransferState,
)
from labkit.viz.synthetic import SyntheticSource


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedSource:
    """Hands out the given deltas one per poll, then empty ones."""

    def __init__(self, deltas: list[TelemetryDelta], kind: str = "sim") -> None:
        self.deltas, self.kind = list(deltas), kind

    def poll(self) -> TelemetryDelta:
        return self.deltas.pop(0) if self.deltas else TelemetryDelta()

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "engines": [{"name": "prefill", "role": "prefill", "num_blocks": 64, "block_size": 16}],
        }


def view_state(dash: Dashboard) -> dict:
    """Everything the views draw from, as plain comparable data."""
    blocks = {
        name: (
            e.kind,
            e.state.tobytes(),
            e.refs.tobytes(),
            e.owner.tobytes(),
            e.pos.tobytes(),
            list(e.req_names),
            e.req_tokens[: len(e.req_names)].tolist(),
            {k: list(v) for k, v in e.req_blocks.items()},
            dict(e.holders),
            set(e.sending),
        )
        for name, e in dash.blocks.engines.items()
    }
    tr = dash.transfers
    return {
        "blocks": blocks,
        "transfers": (
            [dataclasses.asdict(r) for r in tr.requests.values()],
            dict(tr.layers),
            list(tr.layer_order),
            tr.t0,
        ),
        "memory": (
            dict(dash.memory.latest),
            dict(dash.memory.engine_mem),
            {g: list(h) for g, h in dash.memory.history.items()},
        ),
        "schedule": (
            {k: [dataclasses.asdict(s) for s in v] for k, v in dash.schedule.steps.items()},
            dict(dash.schedule.kinds),
        ),
        "latency": (
            list(dash.latency.ttft),
            list(dash.latency.itl),
            dash.latency.hist,
            dict(dash.latency.kinds),
        ),
    }


def folded(source, deltas: list[TelemetryDelta]) -> dict:
    """The Dashboard's own fold into its reducers (without building the widgets: slow)."""
    info = SourceInfo.from_dict(source.describe())
    engines = {e.name: (e.role, e.kind, e.num_blocks, e.block_size) for e in info.engines}
    dash = SimpleNamespace(blocks=BlockMapState(engines), transfers=TransferState(),
                           memory=MemoryState(), schedule=ScheduleState(), latency=LatencyState(),
                           offload=OffloadState())
    for d in deltas:
        Dashboard.fold(dash, d)  # type: ignore[arg-type]
    return view_state(dash)  # type: ignore[arg-type]


def same_delta(a: TelemetryDelta, b: TelemetryDelta) -> bool:
    return (
        a.observer == b.observer
        and a.timeline == b.timeline
        and a.gpu_samples == b.gpu_samples
        and a.engine_memory == b.engine_memory
    )


# ---- round trips ---------------------------------------------------------------------------------
def test_synthetic_round_trip_gives_the_views_identical_state(tmp_path: Path) -> None:
    src = SyntheticSource(num_blocks=2048, seed=3, arrival_p=0.6)
    with Recorder(src, tmp_path / "syn.lkrec", metrics_hz=None) as rec:
        live = [rec.poll() for _ in range(60)]
    live = [d for d in live if not d.is_empty()]
    assert sum(len(b.events) for d in live for b in d.observer) > 1000  # a busy run

    rp = replay(tmp_path / "syn.lkrec", speed=None)
    replayed = list(rp)
    assert rp.done and len(replayed) == len(live)
    assert all(same_delta(a, b) for a, b in zip(live, replayed, strict=True))
    want = folded(src, live)
    assert want["transfers"][0] and any(e[1] != bytes(2048) for e in want["blocks"].values())
    assert folded(rp, replayed) == want


def _metrics_samples() -> list[MetricsSample]:
    """12 scrapes per engine 0.25 s apart, counters growing, one series vanishing midway."""
    out = []
    for engine in ("prefill", "decode"):
        text = (FIXTURES / "metrics" / f"nixl-{engine}.txt").read_text()
        base = MetricsSnapshot.parse(text, ts=100.0)
        gone = next(k for k in base.samples if k[0] == "vllm:num_requests_waiting")
        for i in range(12):
            samples = {
                k: (v + i if k[0].endswith("_total") else v) for k, v in base.samples.items()
            }
            if i >= 6:
                samples.pop(gone)
            snap = MetricsSnapshot(100.0 + 0.25 * i, samples, dict(base.types))
            out.append(MetricsSample(engine, snap.ts, snap, engine, "vllm"))
    return sorted(out, key=lambda m: m.ts)


def test_metrics_are_stored_as_deltas_thinned_to_2hz_and_rebuilt_exactly(tmp_path: Path) -> None:
    samples = _metrics_samples()
    clock = FakeClock()
    src = ScriptedSource([TelemetryDelta(metrics=[m]) for m in samples], kind="vllm")
    with Recorder(
        src, tmp_path / "m.lkrec", compression="none", metrics_hz=2.0, clock=clock
    ) as rec:
        for _ in samples:
            clock.now += 0.125
            rec.poll()
    got = [m for _, d in read_recording(tmp_path / "m.lkrec").frames for m in d.metrics]
    live = {(m.engine, m.ts): m.snapshot for m in samples}
    for engine in ("prefill", "decode"):
        ts = [m.ts for m in got if m.engine == engine]
        assert ts == [100.0, 100.5, 101.0, 101.5, 102.0, 102.5, 102.75]  # 2 Hz + the newest
    for m in got:  # each rebuilt snapshot is the scrape it came from, series and types
        assert m.snapshot.samples == live[(m.engine, m.ts)].samples
        assert m.snapshot.types == live[(m.engine, m.ts)].types
    last = got[-1].snapshot
    assert last.get("vllm:num_requests_waiting") is None  # the vanished series stays gone
    assert last.histogram("vllm:time_to_first_token_seconds") is not None
    firsts = ScriptedSource([TelemetryDelta(metrics=samples[:2])], kind="vllm")
    with Recorder(firsts, tmp_path / "f.lkrec", compression="none", metrics_hz=None) as one:
        one.poll()  # one full scrape per engine; the 12 more per engine add little
    assert rec.num_bytes_raw < 1.3 * one.num_bytes_raw


# ---- the replay clock ----------------------------------------------------------------------------
def _numbered(tmp_path: Path, n: int = 10) -> Path:
    """A recording of n frames at t = 0.5, 1.0, ...; frame i holds timeline event req i."""
    clock = FakeClock()
    deltas = [
        TelemetryDelta(timeline=[{"req_id": str(i), "ts": 5.0 + i, "event": "arrival"}])
        for i in range(n)
    ]
    with Recorder(ScriptedSource(deltas), tmp_path / "n.lkrec", clock=clock) as rec:
        for _ in range(n):
            clock.now += 0.5
            rec.poll()
    return tmp_path / "n.lkrec"


def ids(d: TelemetryDelta) -> list[int]:
    return [int(e["req_id"]) for e in d.timeline]


def test_seek_pause_speed_follow_the_replay_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    rp = Replay(_numbered(tmp_path), speed=2.0, clock=clock)
    assert rp.duration == 5.0 and rp.position == 0.0
    assert ids(rp.poll()) == []
    clock.now += 0.5  # x2: the replay clock is at 1.0
    assert ids(rp.poll()) == [0, 1]
    rp.pause()
    clock.now += 10
    assert rp.position == 1.0 and ids(rp.poll()) == []
    rp.seek(3.0)  # forwards: what was skipped over comes next, no reset
    assert ids(rp.poll()) == [2, 3, 4, 5] and rp.generation == 0
    rp.seek(1.2)  # backwards: from the start again, as a reset
    assert rp.generation == 1
    d = rp.poll()
    assert ids(d) == [0, 1] and getattr(d, "reset", True)
    rp.speed = 4.0
    rp.resume()
    clock.now += 1.0
    assert rp.position == 5.0 and ids(rp.poll()) == [2, 3, 4, 5, 6, 7, 8, 9] and rp.done
    clock.now += 100
    assert rp.position == 5.0 and rp.poll().is_empty()
    with pytest.raises(ValueError):
        rp.speed = 0


def test_fast_replay_plays_one_frame_per_poll(tmp_path: Path) -> None:
    rp = Replay(_numbered(tmp_path), speed=None)
    assert ids(rp.poll()) == [0] and rp.position == 0.5
    assert ids(rp.step(3)) == [1, 2, 3] and rp.position == 2.0
    rp.seek(3.0)  # forwards in fast mode: the skipped frames come at once
    assert ids(rp.poll()) == [4, 5]
    rp.seek(0.0)
    assert rp.generation == 1 and ids(rp.poll()) == [0]
    assert [ids(d) for d in rp] == [[i] for i in range(1, 10)]


# ---- what a replay says it is ----------------------------------------------------------------------
def test_describe_says_replay_and_the_original_kind(tmp_path: Path) -> None:
    src = SyntheticSource(num_blocks=256, seed=1)
    with Recorder(src, tmp_path / "s.lkrec", meta={"note": "unit test"}) as rec:
        for _ in range(5):
            rec.poll()
    rp = replay(tmp_path / "s.lkrec")
    d = rp.describe()
    assert d["kind"] == "replay" and d["original_kind"] == "sim"
    assert d["engines"] == src.describe()["engines"] and d["link"] == "pcie"
    h = rp.header
    assert h["hardware"]["simulated"] is True and h["vllm_version"] is None
    assert (
        d["title"]
        == f"REPLAY of a SIMULATED run on Synthetic GPU (simulated), recorded {h['created'][:10]}"
    )
    assert d["recording"]["meta"] == {"note": "unit test"}
    dash = Dashboard(rp)
    assert "REPLAY" in dash.header.value
    dash.refresh()  # the data keeps its own kind: a replayed simulation still says SIMULATED
    assert "SIMULATED" in dash.views["blocks"].figure.layout.title.text


def test_record_polls_on_its_own_and_the_recorder_is_a_source(tmp_path: Path) -> None:
    src = SyntheticSource(num_blocks=256, seed=4)
    rec = Recorder(src, tmp_path / "own.lkrec")
    assert isinstance(rec, TelemetrySource) and rec.describe() == src.describe()
    rec.close()
    path = record(
        SyntheticSource(num_blocks=256, seed=4), tmp_path / "r.lkrec", duration_s=0.6, interval=0.1
    )
    frames = read_recording(path).frames
    assert 4 <= len(frames) <= 9 and frames[-1][0] >= 0.5
    assert [t for t, _ in frames] == sorted(t for t, _ in frames)


def test_title_of_a_real_run() -> None:
    header = {
        "kind": "vllm",
        "created": "2026-11-21T08:00:00Z",
        "hardware": {"gpus": ["NVIDIA H200", "NVIDIA H200"], "driver": "580.1"},
    }
    assert title_of(header) == "REPLAY of a real vLLM run on NVIDIA H200 ×2, recorded 2026-11-21"


# ---- files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_a_file_cut_short_reads_up_to_its_last_whole_frame(
    tmp_path: Path, compression: str
) -> None:
    src = SyntheticSource(num_blocks=4096, seed=2)
    with Recorder(src, tmp_path / "c.lkrec", compression=compression) as rec:
        for _ in range(30):
            rec.poll()
    full = read_recording(tmp_path / "c.lkrec")
    assert not full.truncated and len(full.frames) == 30 and full.compression == compression
    data = (tmp_path / "c.lkrec").read_bytes()
    (tmp_path / "cut.lkrec").write_bytes(data[: int(len(data) * 0.6)])
    cut = read_recording(tmp_path / "cut.lkrec")
    assert cut.truncated and 0 < len(cut.frames) < 30
    assert all(same_delta(a, b) for (_, a), (_, b) in zip(cut.frames, full.frames, strict=False))
    (tmp_path / "junk.lkrec").write_bytes(b"not a recording at all")
    with pytest.raises(ValueError, match="not a labkit recording"):
        read_recording(tmp_path / "junk.lkrec")


def test_zstd_when_installed(tmp_path: Path) -> None:
    pytest.importorskip("zstandard")
    with Recorder(SyntheticSource(num_blocks=256), tmp_path / "z.lkrec", compression="zstd") as rec:
        live = [rec.poll() for _ in range(5)]
    rec2 = read_recording(tmp_path / "z.lkrec")
    assert rec2.compression == "zstd" and same_delta(rec2.frames[-1][1], live[-1])


SHIPPED = sorted(Path(str(files("labkit") / "data" / "recordings")).glob("*.lkrec"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recording_loads_and_plays(path: Path) -> None:
    import labkit

    assert isinstance(labkit.replay(path), Replay)  # labkit.replay is the plain function
    assert path.stem in labkit.recordings()
    rp = Replay(path, speed=None)
    assert path.stat().st_size < 5e6 and not rp.recording.truncated
    assert rp.header["kind"] in ("sim", "vllm") and rp.describe()["kind"] == "replay"
    if rp.header["kind"] == "sim":
        assert "SIMULATED" in rp.describe()["title"] and rp.header["hardware"]["simulated"]
    else:
        assert rp.header["vllm_version"] and "real vLLM" in rp.describe()["title"]
    dash = Dashboard(rp)
    for d in rp:
        dash.fold(d)
    for view in dash.views.values():
        view.update()
    done = [r for r in dash.transfers.requests.values() if r.finish and r.transfer()[1]]
    arrivals = {e["req_id"] for _, d in rp.recording.frames for e in d.timeline
                if e["event"] == "arrival"}
    finished_ok = {e["req_id"] for _, d in rp.recording.frames for e in d.timeline
                   if e["event"] == "finish" and e.get("status", 200) == 200}
    # a shipped recording shows a working pair: every request the proxy saw finished, each
    # with a TTFT, and their KV transfers are drawn (the Gantt keeps the newest 40 ids)
    assert len(arrivals) >= 5 and finished_ok == arrivals
    assert len(done) >= 5 and len(dash.latency.ttft) >= len(arrivals)
    assert set(dash.schedule.steps) == {e["name"] for e in rp.describe()["engines"]}
    assert dash.memory.latest and dash.memory.engine_mem
    for engine in dash.schedule.steps:  # /metrics at most 2 Hz per engine
        n = sum(m.engine == engine for _, d in rp.recording.frames for m in d.metrics)
        assert 0 < n <= 2 * rp.duration + 2


# ---- a simulated Lab, end to end -----------------------------------------------------------------
def test_simulated_lab_round_trip(tmp_path: Path) -> None:
    from labkit.lab import Lab

    lab = Lab(mode="sim", run_dir=tmp_path / "run")
    lab.start(progress=False)
    try:
        tel = lab.telemetry()
        rec = Recorder(tel, tmp_path / "lab.lkrec", lab=lab)
        live = [rec.poll()]
        with httpx.Client(timeout=60) as client:
            for n in (1081, 300, 700):
                body = {
                    "model": lab.plan.model.name,
                    "prompt": list(range(1000, 1000 + n)),
                    "max_tokens": 16,
                    "ignore_eos": True,
                    "stream": True,
                }
                with client.stream("POST", f"{lab.url}/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    for _ in r.iter_lines():
                        pass
                live.append(rec.poll())
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            time.sleep(0.25)
            live.append(rec.poll())
        rec.close()
    finally:
        lab.stop()
    rp = replay(tmp_path / "lab.lkrec", speed=None)
    replayed = list(rp)

    def not_metrics(deltas: list[TelemetryDelta]) -> list[TelemetryDelta]:
        return [d for d in deltas if d.observer or d.timeline or d.gpu_samples or d.engine_memory]

    # metrics-only polls may be thinned away (2 Hz); everything else comes back poll by poll
    assert all(
        same_delta(a, b) for a, b in zip(not_metrics(live), not_metrics(replayed), strict=True)
    )
    assert sum(len(d.metrics) for d in replayed) < sum(len(d.metrics) for d in live)
    assert folded(rp, replayed) == folded(tel, live)  # metrics thinned, the newest kept
    h = rp.header
    assert h["kind"] == "sim" and h["lab"]["plan"]["kind"] == "sim"
    assert h["lab"]["config"]["prefill"]["role"] == "prefill"
    assert sum(e["event"] == "finish" for d in replayed for e in d.timeline) == 3


# ---- the command line ----------------------------------------------------------------------------
def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    register_record(sub)
    register_replay(sub)
    return parser.parse_args(argv)


def test_cli_record_then_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.lkrec"
    args = _cli(["record", "--mode", "sim", "--duration", "3", "--out", str(out)])
    assert args.func(args) == 0
    rec = read_recording(out)
    assert rec.kind == "sim" and rec.header["meta"]["requests"][0][1] == 1081
    assert any(e["event"] == "first_token" for _, d in rec.frames for e in d.timeline)
    args = _cli(["replay", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "REPLAY of a SIMULATED run" in text and "requests" in text
    assert np.isfinite(rec.duration) and rec.duration <= 5.0


def test_replay_title_counts_the_gpus_the_run_used_not_the_host() -> None:
    """real-h200x2-nixl-chunk256 ran on GPUs 2,3 of a 4-GPU host (CUDA_VISIBLE_DEVICES)."""
    import labkit

    rp = labkit.replay("real-h200x2-nixl-chunk256", speed=None)
    assert len(rp.header["hardware"]["gpus"]) == 4 and len(rp.header["source"]["gpus"]) == 2
    assert "NVIDIA H200 ×2" in rp.describe()["title"]
