"""Replay a recording through the same views: record on a GPU, watch anywhere.

    rp = labkit.replay("h200-pd.lkrec")         # a TelemetrySource of kind "replay"
    labkit.viz.Dashboard(rp).start()           # the views (telemetry never imports them)
    rp.pause(); rp.seek(12.5); rp.speed = 4.0; rp.resume()

The replay clock runs at `speed` x the wall clock; `poll()` returns every recorded frame up
to the clock's position not yet returned, merged into one delta. `speed=None` (or `step()`)
plays one frame per poll, as fast as the caller polls (tests, exports).

Views fold deltas into cumulative state, which cannot run backwards: a seek backwards
replays from the start, and the next delta says so (`generation` goes up and the delta's
`reset`, where TelemetryDelta has that field, is True), so a view rebuilds its state.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from labkit.telemetry.recording import Recording, read_recording
from labkit.telemetry.source import TelemetryDelta

_HAS_RESET = any(f.name == "reset" for f in dataclasses.fields(TelemetryDelta))
_ORIGIN = {"vllm": "a real vLLM run", "sim": "a SIMULATED run"}


def title_of(header: dict[str, Any]) -> str:
    """'REPLAY of a real vLLM run on NVIDIA H200, recorded 2026-11-21'."""
    kind = str(header.get("kind", "sim"))
    # The GPUs the run used (the source's), not every GPU of the machine it ran on: a pair
    # recorded under CUDA_VISIBLE_DEVICES=2,3 of a 4-GPU host used two.
    gpus = [g.get("name", "GPU") for g in header.get("source", {}).get("gpus", [])] or list(
        header.get("hardware", {}).get("gpus") or []
    )
    where = ""
    if gpus:
        uniq = sorted(set(gpus))
        where = " on " + ", ".join(
            f"{n} ×{gpus.count(n)}" if gpus.count(n) > 1 else n for n in uniq
        )
        where += " (simulated)" if kind != "vllm" else ""
    day = str(header.get("created", ""))[:10]
    return f"REPLAY of {_ORIGIN.get(kind, f'a {kind} run')}{where}" + (
        f", recorded {day}" if day else ""
    )


class Replay:
    """A recording played back as a TelemetrySource (`describe()["kind"] == "replay"`).

    Args:
        recording: a path or a Recording already read.
        speed: replay seconds per wall second; None: one frame per poll, as fast as polled.
        paused: start paused (poll() returns nothing until resume() or a seek).
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        recording: Recording | str | Path,
        speed: float | None = 1.0,
        *,
        paused: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.recording = (
            recording if isinstance(recording, Recording) else read_recording(recording)
        )
        self.header = self.recording.header
        self._frames = self.recording.frames
        self._clock = clock
        self._speed = speed
        self._next = 0  # index of the first frame not yet returned
        self._pos = 0.0  # replay position at wall time self._wall
        self._wall = clock()
        self._paused = paused
        self._reset = False
        self.generation = 0  # bumps on every backward seek

    # -- the clock -------------------------------------------------------------------------------
    @property
    def duration(self) -> float:
        """Seconds from the start of the recording to its last frame."""
        return self.recording.duration

    @property
    def position(self) -> float:
        """Where the replay clock stands, in seconds since the start of the recording."""
        if self._paused or self._speed is None:
            return self._pos
        return min(self.duration, self._pos + (self._clock() - self._wall) * self._speed)

    @property
    def speed(self) -> float | None:
        return self._speed

    @speed.setter
    def speed(self, value: float | None) -> None:
        if value is not None and value <= 0:
            raise ValueError(f"speed must be > 0 or None (as fast as polled), got {value}")
        self._pos, self._wall, self._speed = self.position, self._clock(), value

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def done(self) -> bool:
        """Every frame has been returned."""
        return self._next >= len(self._frames)

    def pause(self) -> None:
        self._pos, self._paused = self.position, True

    def resume(self) -> None:
        self._wall, self._paused = self._clock(), False

    def seek(self, t: float) -> None:
        """Move the clock to `t` s (clamped to the recording). Forwards: the next poll returns
        the frames skipped over. Backwards: it returns everything from the start, as a reset."""
        t = min(max(0.0, float(t)), self.duration)
        if self._next > 0 and self._frames[self._next - 1][0] > t:
            self._next, self._reset = 0, True
            self.generation += 1
        self._pos, self._wall = t, self._clock()

    # -- the TelemetrySource protocol --------------------------------------------------------------
    def poll(self) -> TelemetryDelta:
        """What happened up to the replay clock and was not returned yet; with speed=None,
        the next frame (and any a seek skipped over)."""
        fast = self._speed is None and not self._paused
        return self._advance(1 if fast else 0)

    def step(self, n: int = 1) -> TelemetryDelta:
        """Return the next `n` frames (and any a seek skipped over); the clock moves to them."""
        return self._advance(max(n, 0))

    def _advance(self, min_frames: int) -> TelemetryDelta:
        pos = self.position
        end = self._next
        while end < len(self._frames) and self._frames[end][0] <= pos:
            end += 1
        end = min(max(end, self._next + min_frames), len(self._frames))
        if end > 0 and self._frames[end - 1][0] > pos:
            self._pos, self._wall = self._frames[end - 1][0], self._clock()
        return self._take(end)

    def _take(self, end: int) -> TelemetryDelta:
        out = TelemetryDelta()
        for _, d in self._frames[self._next : end]:
            out.observer += d.observer
            out.timeline += d.timeline
            out.metrics += d.metrics
            out.gpu_samples += d.gpu_samples
            out.engine_memory += d.engine_memory
        self._next = max(self._next, end)
        if self._reset:
            if _HAS_RESET:
                out.reset = True  # type: ignore[attr-defined]
            self._reset = False
        return out

    def __iter__(self) -> Iterator[TelemetryDelta]:
        """Every remaining frame's delta, in order."""
        while not self.done:
            yield self.step()

    def describe(self) -> dict[str, Any]:
        """The recorded source's describe(), with kind "replay" and where it came from."""
        src = dict(self.header.get("source", {}))
        return {
            **src,
            "kind": "replay",
            "original_kind": self.recording.kind,
            "title": title_of(self.header),
            "recording": {
                k: self.header.get(k)
                for k in ("created", "labkit_version", "vllm_version", "hardware", "meta")
            }
            | {"path": str(self.recording.path), "duration": self.duration},
        }

    # -- for people ------------------------------------------------------------------------------
    def summary(self) -> str:
        return summarize(self.recording)

    def __repr__(self) -> str:
        return (
            f"<Replay {title_of(self.header)}: {self.position:.1f}/{self.duration:.1f} s, "
            f"{'paused' if self._paused else f'speed {self._speed}'}>"
        )


SHIPPED = Path(__file__).resolve().parent.parent / "data" / "recordings"


def recordings() -> list[str]:
    """Names of the recordings shipped with labkit (real GPU runs and simulated ones)."""
    return sorted(p.stem for p in SHIPPED.glob("*.lkrec"))


def resolve(path: str | Path) -> Path:
    """A file path, or the name of a shipped recording ("real-h200x2-nixl")."""
    p = Path(path)
    if p.exists():
        return p
    shipped = SHIPPED / (p.name if p.suffix == ".lkrec" else f"{p.name}.lkrec")
    if shipped.exists():
        return shipped
    raise FileNotFoundError(f"no recording {str(path)!r}; shipped ones: {', '.join(recordings())}")


def replay(path: str | Path, speed: float | None = 1.0, **kwargs: Any) -> Replay:
    """Open a recording for replay: a path, or a shipped name (see `recordings()`)."""
    return Replay(resolve(path), speed, **kwargs)


def summarize(rec: Recording) -> str:
    """A readable table of what a recording holds."""
    h = rec.header
    events: Counter[tuple[str, str]] = Counter()
    batches: Counter[str] = Counter()
    timeline: Counter[str] = Counter()
    scrapes: Counter[str] = Counter()
    reqs: set[str] = set()
    num_gpu = 0
    for _, d in rec.frames:
        for b in d.observer:
            batches[b.engine_id] += 1
            events.update((b.engine_id, type(e).__name__) for e in b.events)
        for ev in d.timeline:
            timeline[str(ev.get("event"))] += 1
            reqs.add(str(ev.get("req_id")))
        scrapes.update(m.engine for m in d.metrics)
        num_gpu += len(d.gpu_samples)
    lines = [
        title_of(h),
        f"  file       {rec.path} ({rec.num_bytes / 1e6:.2f} MB, {rec.compression}"
        f"{', CUT SHORT' if rec.truncated else ''})",
        f"  recorded   {h.get('created')} with labkit {h.get('labkit_version')}"
        + (f", vLLM {h['vllm_version']}" if h.get("vllm_version") else ""),
        f"  duration   {rec.duration:.1f} s in {len(rec.frames)} frames",
    ]
    if "lab" in h:
        lines.append(f"  lab        {h['lab'].get('describe')}")
    if h.get("hardware", {}).get("driver"):
        lines.append(f"  driver     {h['hardware']['driver']}")
    lines += ["", f"  {'engine':<14}{'batches':>8}  {'/metrics':>8}  events"]
    for e in h.get("source", {}).get("engines", []):
        name = e["name"]
        ev = ", ".join(f"{k} {n}" for (en, k), n in sorted(events.items()) if en == name)
        lines.append(f"  {name:<14}{batches[name]:>8}  {scrapes[name]:>8}  {ev or '-'}")
    lines += [
        "",
        f"  requests   {len(reqs)} ("
        + ", ".join(f"{k} {n}" for k, n in sorted(timeline.items()))
        + ")",
        f"  GPU memory {num_gpu} samples",
    ]
    return "\n".join(lines)
