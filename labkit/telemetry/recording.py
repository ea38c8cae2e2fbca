"""Record what a telemetry source says to one compact file, to replay it anywhere later.

A GPU run is precious (minutes of a lent H200); a recording keeps everything the views were
shown, so a laptop replays it through the same dashboard (labkit.replay). `Recorder` wraps
any TelemetrySource (usually a Lab's LiveTelemetry) and is one itself: each `poll()` passes
the delta through AND appends it, so a dashboard can show and record at once.

File layout (docs/record-replay.md), the whole stream gzip- (default) or zstd-compressed:

    b"LABKITRC" | u32 len | msgpack(header dict) | u32 len | msgpack(Frame) | ...

- header: format version, labkit version, created, the source's describe(), hardware (GPU
  names, driver) and vLLM's version for real runs, the lab's config and plan as dicts;
- Frame = (t: seconds since the recording started, the delta): observer batches as their
  own msgspec encoding (pool snapshots stay raw bytes), timeline events as dicts, GPU samples
  and engine memory as dicts, /metrics as per-engine DELTAS of the parsed samples (a series
  table, then only the values that changed), at most `metrics_hz` per engine.
A file cut short (a crash mid-run) reads up to its last whole frame.
"""

from __future__ import annotations

import gzip
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from labkit.telemetry.observer_schema import decode_observer_batch, encode_observer_batch
from labkit.telemetry.source import (
    EngineMemory,
    GpuSample,
    MetricsSample,
    TelemetryDelta,
    TelemetrySource,
)

MAGIC = b"LABKITRC"
FORMAT = "labkit-recording"
FORMAT_VERSION = 1
_GZIP_MAGIC, _ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
_LEN = 4  # bytes of the big-endian length before each record


class MetricsRecord(msgspec.Struct, array_like=True):
    """One /metrics scrape of one engine as a delta against that engine's previous record.

    `new_keys` extend the engine's series table (index = position, in order of appearance);
    `ids`/`values` are the series whose value changed; `types` is sent when it changed."""

    engine: str
    role: str
    kind: str
    ts: float
    new_keys: list[tuple[str, list[tuple[str, str]]]] = []
    ids: list[int] = []
    values: list[float] = []
    removed: list[int] = []
    types: dict[str, str] | None = None


class Frame(msgspec.Struct, array_like=True):
    """What one poll() returned, `t` seconds after the recording started."""

    t: float
    observer: list[msgspec.Raw] = []  # each an encoded ObserverBatch
    timeline: list[dict[str, Any]] = []
    metrics: list[MetricsRecord] = []
    gpu_samples: list[GpuSample] = []
    engine_memory: list[EngineMemory] = []


_frame_decoder = msgspec.msgpack.Decoder(Frame)

# What a recording may declare and decompress (a shipped one: <= 550 KB a frame, <= 8 MiB
# in all). A crafted file must be refused in well under a second and a few MB of memory:
# 39 KB of msgpack can declare 10 M empty maps (2 GB of Python dicts), 1 MB of gzip can
# inflate to 1 GB. Raise the bounds with read_recording(..., max_bytes=...) for a long run.
MAX_HEADER_BYTES = 1 << 20
MAX_RECORD_BYTES = 16 << 20
MAX_DECOMPRESSED_BYTES = 128 << 20
MAX_TIMELINE_EVENTS = 2_000_000


class _EventCheck(msgspec.Struct):
    """What every timeline event has (contract 4); checked before a frame is built."""

    event: str
    ts: float
    seq: int | None = None
    req_id: str | None = None


class _FrameCheck(msgspec.Struct, array_like=True):
    t: float
    observer: list[msgspec.Raw] = []
    timeline: list[_EventCheck] = []


class _HeaderCheck(msgspec.Struct):
    format: str
    version: int
    kind: str = "sim"
    created: str | float | None = None
    source: dict[str, Any] = {}
    hardware: dict[str, Any] = {}


_frame_check = msgspec.msgpack.Decoder(_FrameCheck)
_header_check = msgspec.msgpack.Decoder(_HeaderCheck)


def printable(text: Any, limit: int = 200) -> str:
    """`text` safe for a terminal: control characters (ANSI / OSC escapes, newlines, C1)
    written as escapes, cut to `limit` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[: limit * 2])
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _clean(value: Any, depth: int = 0) -> Any:
    """A header with every string made printable (the header is shown: title, summary)."""
    if isinstance(value, str):
        return printable(value, 10_000)
    if isinstance(value, dict) and depth < 32:
        return {printable(k, 200): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list) and depth < 32:
        return [_clean(v, depth + 1) for v in value]
    return value
_encoder = msgspec.msgpack.Encoder(enc_hook=str)  # header extras: paths, enums -> str


# ---- /metrics as deltas -----------------------------------------------------------------------
def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


class MetricsDeltaEncoder:
    """Per engine: the series table and last values written; encodes only what moved."""

    def __init__(self) -> None:
        self._ids: dict[str, dict[tuple, int]] = {}
        self._last: dict[str, dict[int, float]] = {}
        self._types: dict[str, dict[str, str]] = {}

    def encode(self, m: MetricsSample) -> MetricsRecord:
        snap = m.snapshot
        ids, last = self._ids.setdefault(m.engine, {}), self._last.setdefault(m.engine, {})
        rec = MetricsRecord(m.engine, m.role, m.kind, float(snap.ts), [], [], [], [])
        seen: set[int] = set()
        for key, value in snap.samples.items():
            i = ids.get(key)
            if i is None:
                i = ids[key] = len(ids)
                rec.new_keys.append((key[0], [tuple(p) for p in key[1]]))
            seen.add(i)
            if i not in last or not _same(last[i], value):
                last[i] = value
                rec.ids.append(i)
                rec.values.append(value)
        rec.removed = [i for i in last if i not in seen]
        for i in rec.removed:
            del last[i]
        if dict(snap.types) != self._types.get(m.engine):
            self._types[m.engine] = dict(snap.types)
            rec.types = dict(snap.types)
        return rec


class MetricsDeltaDecoder:
    """Rebuilds full MetricsSnapshots from MetricsDeltaEncoder's records, in order."""

    def __init__(self) -> None:
        self._keys: dict[str, list[tuple]] = {}
        self._values: dict[str, dict[int, float]] = {}
        self._types: dict[str, dict[str, str]] = {}

    def decode(self, rec: MetricsRecord) -> MetricsSample:
        from labkit.telemetry.metrics import MetricsSnapshot

        keys = self._keys.setdefault(rec.engine, [])
        keys.extend((name, tuple(tuple(p) for p in labels)) for name, labels in rec.new_keys)
        values = self._values.setdefault(rec.engine, {})
        values.update(zip(rec.ids, rec.values, strict=True))
        for i in rec.removed:
            values.pop(i, None)
        if rec.types is not None:
            self._types[rec.engine] = dict(rec.types)
        snap = MetricsSnapshot(
            rec.ts, {keys[i]: v for i, v in values.items()}, dict(self._types.get(rec.engine, {}))
        )
        return MetricsSample(rec.engine, rec.ts, snap, rec.role, rec.kind)


# ---- the stream ------------------------------------------------------------------------------
def _open_write(path: Path, compression: str) -> BinaryIO:
    if compression == "gzip":
        return gzip.GzipFile(path, "wb", compresslevel=6, mtime=0)  # type: ignore[return-value]
    if compression == "zstd":
        import zstandard  # optional: pip install zstandard

        return zstandard.ZstdCompressor(level=10).stream_writer(open(path, "wb"))  # type: ignore[return-value]
    if compression == "none":
        return open(path, "wb")
    raise ValueError(f"compression {compression!r} is not one of gzip, zstd, none")


def _open_read(path: Path) -> tuple[BinaryIO, str, tuple[type[Exception], ...]]:
    """The decompressed stream, its compression, and the errors a cut-short stream raises."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(path, "rb"), "gzip", (EOFError, gzip.BadGzipFile)  # type: ignore[return-value]
    if head == _ZSTD_MAGIC:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return reader, "zstd", (zstandard.ZstdError,)  # type: ignore[return-value]
    return open(path, "rb"), "none", ()


def _records(stream: BinaryIO, cut: tuple[type[Exception], ...],
             max_record: int = MAX_RECORD_BYTES, max_total: int | None = None
             ) -> Iterator[bytes | None]:
    """Length-prefixed records; yields None once if the stream is cut short.

    Raises:
        ValueError: a record declares more than `max_record` bytes, or the records add up to
            more than `max_total` (checked before anything is read).
    """
    total = 0
    while True:
        try:
            head = stream.read(_LEN)
            if not head:
                return
            n = int.from_bytes(head, "big")
            total += n + _LEN
            if n > max_record:
                raise ValueError(f"a record declares {n:,} bytes (the limit is {max_record:,})")
            if max_total is not None and total > max_total:
                raise ValueError(f"it decompresses to more than {max_total:,} bytes")
            body = stream.read(n) if len(head) == _LEN else b""
        except cut:  # a compressed stream that ends mid-block
            yield None
            return
        if len(head) < _LEN or len(body) < n:
            yield None
            return
        yield body


# ---- the header ------------------------------------------------------------------------------
def _hardware(kind: str, describe: dict[str, Any]) -> dict[str, Any]:
    """GPU names and driver of a real run (NVML); a simulated run's GPUs are labelled so."""
    gpus = [g.get("name", "GPU") for g in describe.get("gpus", [])]
    if kind != "vllm":
        return {"simulated": True, "gpus": gpus}
    out: dict[str, Any] = {"simulated": False, "gpus": gpus}
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            drv = pynvml.nvmlSystemGetDriverVersion()
            out["driver"] = drv.decode() if isinstance(drv, bytes) else drv
            from labkit.plan.devices import visible_physical

            phys = visible_physical(pynvml)  # the GPUs this run could use (CUDA_VISIBLE_DEVICES)
            names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in phys]
            out["gpus"] = [x.decode() if isinstance(x, bytes) else x for x in names]
            if phys != list(range(pynvml.nvmlDeviceGetCount())):
                out["physical"] = phys
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # NVML missing or failing: say so, keep describe()'s names
        out["nvml_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def make_header(source: TelemetrySource, lab: Any = None, meta: dict[str, Any] | None = None,
                *, compression: str = "gzip", metrics_hz: float | None = 2.0) -> dict[str, Any]:
    """The recording's header: what ran, where, and how it was recorded."""
    import dataclasses
    import platform

    import labkit

    desc = msgspec.to_builtins(source.describe(), enc_hook=str)
    kind = str(desc.get("kind", "sim"))
    header: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "labkit_version": labkit.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "created_ts": time.time(),
        "kind": kind, "source": desc, "hardware": _hardware(kind, desc),
        "vllm_version": _version("vllm") if kind == "vllm" else None,
        "python": platform.python_version(), "compression": compression,
        "metrics_hz": metrics_hz, "meta": dict(meta or {}),
    }  # fmt: skip
    if lab is not None:
        header["lab"] = {
            "mode": getattr(lab, "mode", None), "describe": lab.describe(),
            "config": msgspec.to_builtins(dataclasses.asdict(lab.config), enc_hook=str),
            "plan": msgspec.to_builtins(lab.plan.to_dict(), enc_hook=str),
        }  # fmt: skip
    return header


# ---- writing ---------------------------------------------------------------------------------
class Recorder:
    """A TelemetrySource that records what it passes through.

    Args:
        source: the source to wrap (LiveTelemetry, SyntheticSource, ...).
        path: the file to write (`.lkrec` by convention); replaced if present.
        compression: "gzip" (default, stdlib), "zstd" (needs `zstandard`) or "none".
        metrics_hz: at most this many /metrics scrapes per second per engine are kept (the
            newest one is always written, late if need be); None keeps all.
        lab: the Lab behind the source: its config and plan go in the header.
        meta: free-form notes for the header (workload, purpose).
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, source: TelemetrySource, path: str | Path, *, compression: str = "gzip",
                 metrics_hz: float | None = 2.0, lab: Any = None,
                 meta: dict[str, Any] | None = None, clock: Any = time.monotonic) -> None:
        self.source = source
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.header = make_header(source, lab, meta, compression=compression,
                                  metrics_hz=metrics_hz)
        self._min_gap = 1.0 / metrics_hz if metrics_hz else 0.0
        self._clock = clock
        self._t0 = self._last_flush = clock()
        self._metrics = MetricsDeltaEncoder()
        self._kept_ts: dict[str, float] = {}  # engine -> ts of the last metrics kept
        self._held: dict[str, MetricsSample] = {}  # engine -> newest sample not yet kept
        self.num_frames = 0
        self.num_bytes_raw = len(MAGIC)  # uncompressed
        self._stream: BinaryIO | None = _open_write(self.path, compression)
        self._stream.write(MAGIC)
        self._put(_encoder.encode(self.header))

    # the TelemetrySource protocol: pass through, and record
    def poll(self) -> TelemetryDelta:
        delta = self.source.poll()
        self.write(delta)
        return delta

    def describe(self) -> dict[str, Any]:
        return self.source.describe()

    def write(self, delta: TelemetryDelta, t: float | None = None) -> None:
        """Append one delta (`t`: seconds since the start; default: now). Empty ones are skipped."""
        if self._stream is None:
            raise ValueError(f"recording {self.path} is closed")
        t = self._clock() - self._t0 if t is None else t
        metrics = self._thin(delta.metrics, flush=False)
        if not (delta.observer or delta.timeline or metrics or delta.gpu_samples
                or delta.engine_memory):
            return
        frame = Frame(t, [msgspec.Raw(encode_observer_batch(b)) for b in delta.observer],
                      list(delta.timeline), [self._metrics.encode(m) for m in metrics],
                      list(delta.gpu_samples), list(delta.engine_memory))
        self._put(_encoder.encode(frame))
        self.num_frames += 1
        if self._clock() - self._last_flush > 5.0:  # a crash loses at most ~5 s
            self._stream.flush()
            self._last_flush = self._clock()

    def _thin(self, samples: list[MetricsSample], flush: bool) -> list[MetricsSample]:
        """At most one scrape per engine per 1/metrics_hz s; the newest is never lost."""
        for m in samples:
            self._held[m.engine] = m
        keep = []
        for engine, m in list(self._held.items()):
            last = self._kept_ts.get(engine)
            if flush or last is None or m.ts - last >= self._min_gap:
                keep.append(m)
                self._kept_ts[engine] = m.ts
                del self._held[engine]
        return keep

    def _put(self, payload: bytes) -> None:
        assert self._stream is not None
        self._stream.write(len(payload).to_bytes(_LEN, "big"))
        self._stream.write(payload)
        self.num_bytes_raw += _LEN + len(payload)

    def close(self) -> Path:
        """Write what is held back, close the file; returns its path. Idempotent."""
        if self._stream is not None:
            held = self._thin([], flush=True)
            if held:
                t = self._clock() - self._t0
                self._put(_encoder.encode(Frame(t, metrics=[self._metrics.encode(m) for m in held])))
                self.num_frames += 1
            stream, self._stream = self._stream, None
            stream.close()
        return self.path

    @property
    def num_bytes(self) -> int:
        """Bytes on disk (exact after close)."""
        return self.path.stat().st_size if self.path.exists() else 0

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def record(source: TelemetrySource, path: str | Path, duration_s: float,
           interval: float = 0.25, **kwargs: Any) -> Path:
    """Poll `source` every `interval` s for `duration_s` s into `path` (Recorder's keywords)."""
    with Recorder(source, path, **kwargs) as rec:
        end = time.monotonic() + duration_s
        while (now := time.monotonic()) < end:
            rec.poll()
            time.sleep(max(0.0, min(interval, end - now)))
        rec.poll()
    return Path(path)


# ---- reading ---------------------------------------------------------------------------------
@dataclass
class Recording:
    """A recording read back: its header and (t, delta) per frame, in order."""

    path: Path
    header: dict[str, Any]
    frames: list[tuple[float, TelemetryDelta]] = field(default_factory=list)
    compression: str = "none"
    truncated: bool = False  # the file ended mid-frame (the run was cut short)
    num_bytes: int = 0

    @property
    def duration(self) -> float:
        return self.frames[-1][0] if self.frames else 0.0

    @property
    def kind(self) -> str:
        """The kind of the run recorded: "vllm" or "sim"."""
        return str(self.header.get("kind", "sim"))


def read_recording(path: str | Path, *, max_bytes: int = MAX_DECOMPRESSED_BYTES) -> Recording:
    """Read a whole recording (a few MB: kept in memory, so seeking is free).

    Everything a file declares is checked before it is built: a header under 1 MiB of the
    expected types, records under 16 MiB, `max_bytes` decompressed in all, timeline events
    with their four fields, at most 2 M of them.

    Raises:
        ValueError: one line saying what is wrong (no traceback from inside the file's data);
            every text from the file in it made printable.
    """
    path = Path(path)
    name = printable(path, 120)
    try:
        return _read(path, name, max_bytes)
    except ValueError as exc:
        msg = str(exc) if name in str(exc) else f"{name}: {exc}"
        raise ValueError(printable(msg, 400)) from None
    except (msgspec.DecodeError, msgspec.ValidationError, OSError, EOFError, TypeError,
            KeyError, IndexError, OverflowError, RecursionError, MemoryError) as exc:
        raise ValueError(f"{name} is not a readable labkit recording "
                         f"({type(exc).__name__}: {printable(exc, 200)})") from None
    except Exception as exc:  # zlib.error, zstandard.ZstdError, gzip.BadGzipFile, ...
        raise ValueError(f"{name} is not a readable labkit recording "
                         f"({type(exc).__name__}: {printable(exc, 200)})") from None


def _read(path: Path, name: str, max_bytes: int) -> Recording:
    stream, compression, cut = _open_read(path)
    with stream:
        try:
            magic = stream.read(len(MAGIC))
        except (*cut, OSError) as exc:
            raise ValueError(f"{name} is not a labkit recording ({exc})") from exc
        if magic != MAGIC:
            raise ValueError(f"{name} is not a labkit recording (no {MAGIC!r} at the start)")
        records = _records(stream, cut, MAX_RECORD_BYTES, max_bytes)
        try:
            head = stream.read(_LEN)
        except cut:
            head = b""
        n = int.from_bytes(head, "big") if len(head) == _LEN else -1
        if n < 0:
            raise ValueError(f"{name}: the recording has no header")
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{name}: the header declares {n:,} bytes (the limit is "
                             f"{MAX_HEADER_BYTES:,})")
        first = stream.read(n)
        if len(first) < n:
            raise ValueError(f"{name}: the recording has no whole header")
        try:
            checked = _header_check.decode(first)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"{name}: the header is not a labkit recording header "
                             f"({printable(exc, 200)})") from None
        if checked.format != FORMAT or checked.version > FORMAT_VERSION:
            raise ValueError(f"{name}: format {printable(checked.format, 40)} "
                             f"v{checked.version} is not one this labkit reads "
                             f"(v{FORMAT_VERSION})")
        header = _clean(msgspec.msgpack.decode(first))
        gpus = (header.get("source") or {}).get("gpus", [])
        if not isinstance(gpus, list) or not all(isinstance(g, dict) for g in gpus) or \
                not isinstance((header.get("hardware") or {}).get("gpus", []), list):
            raise ValueError(f"{name}: the header's GPU lists are not lists of GPUs")
        rec = Recording(path, header, compression=compression, num_bytes=path.stat().st_size)
        metrics = MetricsDeltaDecoder()
        events = 0
        for i, body in enumerate(records):
            if body is None:
                rec.truncated = True
                break
            try:
                events += len(_frame_check.decode(body).timeline)
                if events > MAX_TIMELINE_EVENTS:
                    raise ValueError(f"more than {MAX_TIMELINE_EVENTS:,} timeline events")
                f = _frame_decoder.decode(body)
                delta = TelemetryDelta(
                    observer=[decode_observer_batch(bytes(r)) for r in f.observer],
                    timeline=f.timeline, metrics=[metrics.decode(m) for m in f.metrics],
                    gpu_samples=f.gpu_samples, engine_memory=f.engine_memory)
            except Exception as exc:
                raise ValueError(f"{name}: frame {i} is malformed ({type(exc).__name__}: "
                                 f"{printable(exc, 200)})") from None
            rec.frames.append((f.t, delta))
    return rec
