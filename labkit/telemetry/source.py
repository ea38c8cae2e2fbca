"""The telemetry contract: the one thing the views read, a source polled for what is new.

A source is anything with `poll() -> TelemetryDelta` and `describe() -> dict`; the dashboard
never knows whether real vLLM, the simulator or a replayed recording stands behind it. Every
piece of data carries its engine name, role and kind so that a view can label it.

`describe()` returns a plain dict (JSON-able, so a recording can store it):

    {"kind": "sim" | "vllm" | "replay",
     "engines": [{"name": "prefill-0", "role": "prefill", "kind": "sim",
                  "gpus": [0], "num_blocks": 4096, "block_size": 16, "model": "..."}],
     "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_bytes": 85e9}],
     "link": "nvlink4" | None}            # key into labkit.hardware.LINKS, for the GB/s peak
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

KINDS = ("vllm", "sim", "replay")


@dataclass(frozen=True)
class EngineInfo:
    """What a view needs to know of one engine (from `describe()`)."""

    name: str
    role: str = "both"  # "prefill" | "decode" | "both"
    kind: str = "sim"  # "vllm" | "sim" | "replay"
    gpus: tuple[int, ...] = ()
    num_blocks: int = 0
    block_size: int = 16
    model: str = ""
    kv_bytes_per_block: int = 0  # one block on one GPU, kv_cache_dtype aware; 0: not said

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineInfo:
        return cls(
            name=str(d["name"]),
            role=str(d.get("role", "both")),
            kind=str(d.get("kind", "sim")),
            gpus=tuple(int(g) for g in d.get("gpus", ())),
            num_blocks=int(d.get("num_blocks", 0) or 0),
            block_size=int(d.get("block_size", 16) or 16),
            model=str(d.get("model", "")),
            kv_bytes_per_block=int(d.get("kv_bytes_per_block", 0) or 0),
        )


@dataclass(frozen=True)
class GpuInfo:
    """One GPU the engines run on (or a simulated one): `index` is the plan's (logical) GPU,
    `physical` NVML's index of it where known (they differ under CUDA_VISIBLE_DEVICES)."""

    index: int
    name: str = "GPU"
    total_bytes: int = 0
    physical: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GpuInfo:
        physical = d.get("physical")
        return cls(
            index=int(d["index"]),
            name=str(d.get("name", "GPU")),
            total_bytes=int(d.get("total_bytes", 0) or 0),
            physical=int(physical) if physical is not None else None,
        )


@dataclass(frozen=True)
class SourceInfo:
    """The parsed form of `describe()`."""

    kind: str
    engines: tuple[EngineInfo, ...]
    gpus: tuple[GpuInfo, ...] = ()
    link: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceInfo:
        kind = str(d.get("kind", "sim"))
        engines = tuple(
            EngineInfo.from_dict({"kind": kind, **e}) for e in d.get("engines", ())
        )
        gpus = tuple(GpuInfo.from_dict(g) for g in d.get("gpus", ()))
        return cls(kind=kind, engines=engines, gpus=gpus, link=d.get("link"))

    def engine(self, name: str) -> EngineInfo | None:
        return next((e for e in self.engines if e.name == name), None)


@dataclass(frozen=True)
class GpuSample:
    """One NVML reading of one GPU: device totals and what each engine's process holds on it.

    `gpu` is the plan's (logical) GPU, `physical` NVML's index of it (None: simulated, or
    not recorded). `process_bytes` maps engine name -> bytes its process(es) use on this GPU
    (NVML's per-process figure); memory used by anything else shows as "other processes".
    """

    ts: float
    gpu: int
    used_bytes: int
    total_bytes: int
    process_bytes: dict[str, int] = field(default_factory=dict)
    name: str = ""
    kind: str = "vllm"
    physical: int | None = None


@dataclass(frozen=True)
class EngineMemory:
    """An engine's own account of its memory on one GPU (one rank), from its log.

    vLLM logs per worker: "Model loading took X GiB" (weights) and "Available KV cache
    memory: X GiB" (KV); the rest of the process's NVML figure is activations, CUDA graphs,
    the CUDA context ("other").
    """

    engine: str
    gpu: int
    weights_bytes: int
    kv_bytes: int
    role: str = "both"
    kind: str = "vllm"


@dataclass(frozen=True)
class MetricsSample:
    """One /metrics scrape of one engine (`snapshot` is a labkit.telemetry.metrics.MetricsSnapshot)."""

    engine: str
    ts: float
    snapshot: Any
    role: str = "both"
    kind: str = "vllm"


@dataclass
class TelemetryDelta:
    """Everything new since the previous `poll()`.

    observer: ObserverBatch objects (labkit.telemetry.observer_schema), each with
        engine_id, role, kind, ts, events.
    timeline: proxy timeline events as dicts {req_id, ts, event} (architecture contract 4).
    metrics: the latest /metrics scrapes.
    gpu_samples: NVML readings.
    engine_memory: engines' own weights/KV figures (usually once, after start-up).
    """

    observer: list[Any] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[MetricsSample] = field(default_factory=list)
    gpu_samples: list[GpuSample] = field(default_factory=list)
    engine_memory: list[EngineMemory] = field(default_factory=list)
    reset: bool = False  # a replay seeked backwards: views start again from empty state

    def is_empty(self) -> bool:
        return not (
            self.reset
            or self.observer or self.timeline or self.metrics or self.gpu_samples or self.engine_memory
        )


@runtime_checkable
class TelemetrySource(Protocol):
    """What the dashboard polls. Real, simulated and replayed sources all look like this."""

    def poll(self) -> TelemetryDelta: ...

    def describe(self) -> dict[str, Any]: ...
