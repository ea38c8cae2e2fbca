"""Per-GPU and per-process GPU memory, sampled through NVML (nvidia-ml-py), mapped to engines.

`pynvml` is imported lazily: without it, or without a GPU, `available()` is False and the
sampler is never started; the mapping of process samples to engines (`attribute()`) is pure
and works on recorded samples. Only the GPUs the parent's CUDA_VISIBLE_DEVICES lets the lab
use are sampled, numbered by their logical position (plan GPU k), with NVML's own index
beside it (`GpuSample.physical`); NVML itself ignores CUDA_VISIBLE_DEVICES.

    sampler = NvmlSampler(hz=4).start(); ...; sampler.latest(); sampler.stop()
    per_engine = attribute(sample, {"prefill": prefill.group_pids(), "decode": [...]})
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from labkit.plan.devices import visible_physical

_NVML: ModuleType | None = None
_NVML_LOCK = threading.Lock()


def _nvml() -> ModuleType | None:
    """Import and initialise pynvml once; None when it or the driver is missing."""
    global _NVML
    with _NVML_LOCK:
        if _NVML is not None:
            return _NVML
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no nvidia-ml-py, no driver, no GPU: NVML is "not available"
            return None
        _NVML = pynvml
        return _NVML


def available() -> bool:
    """True when NVML answers and at least one GPU is visible (CUDA_VISIBLE_DEVICES)."""
    nv = _nvml()
    if nv is None:
        return False
    try:
        return len(visible_physical(nv)) > 0
    except Exception:  # a probe: an NVML that cannot list devices is not available
        return False


@dataclass(frozen=True, slots=True)
class ProcessMemory:
    """One process's memory on one GPU (logical index; bytes, None when the driver hides it)."""

    gpu: int
    pid: int
    used_bytes: int | None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one time: `index` is its logical position (plan GPU k), `physical` NVML's
    index (None in samples recorded before it was kept)."""

    index: int
    name: str
    used_bytes: int
    total_bytes: int
    util_percent: int | None
    physical: int | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    """All GPUs and their compute processes at `ts` (time.time())."""

    ts: float
    gpus: list[GpuSample]
    processes: list[ProcessMemory] = field(default_factory=list)


def read_sample() -> Sample:
    """One NVML reading of every visible GPU and its compute processes (raises without NVML,
    and as hardware.resolve_visible on a CUDA_VISIBLE_DEVICES that names no GPU)."""
    nv = _nvml()
    if nv is None:
        raise RuntimeError("NVML is not available (no nvidia-ml-py, driver or GPU)")
    gpus: list[GpuSample] = []
    procs: list[ProcessMemory] = []
    for k, i in enumerate(visible_physical(nv)):  # k: logical, i: NVML's index
        h = nv.nvmlDeviceGetHandleByIndex(i)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        try:
            util: int | None = int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception:  # not supported on every GPU (MIG slices): unknown, not zero
            util = None
        name = nv.nvmlDeviceGetName(h)
        if isinstance(name, bytes):
            name = name.decode()
        gpus.append(GpuSample(k, str(name), int(mem.used), int(mem.total), util, physical=i))
        try:
            running = nv.nvmlDeviceGetComputeRunningProcesses(h)
        except Exception:  # a driver that will not list processes: only device totals
            running = []
        for p in running:
            used = getattr(p, "usedGpuMemory", None)
            procs.append(ProcessMemory(k, int(p.pid), int(used) if used is not None else None))
    return Sample(time.time(), gpus, procs)


@dataclass(frozen=True, slots=True)
class EngineMemory:
    """An engine's memory on each GPU, summed over its processes."""

    engine: str
    per_gpu: dict[int, int]
    pids: list[int]

    @property
    def total_bytes(self) -> int:
        return sum(self.per_gpu.values())


def attribute(sample: Sample, engine_pids: Mapping[str, Iterable[int]]) -> dict[str, EngineMemory]:
    """Map the sample's processes to engines by pid (an engine's process group members).

    Processes of no engine are gathered under "other". A process whose memory the driver
    hides (None) counts 0 but is listed in `pids`.
    """
    owner: dict[int, str] = {}
    for engine, pids in engine_pids.items():
        for pid in pids:
            owner[int(pid)] = engine
    out: dict[str, EngineMemory] = {}
    for p in sample.processes:
        engine = owner.get(p.pid, "other")
        em = out.get(engine)
        if em is None:
            em = out[engine] = EngineMemory(engine, {}, [])
        em.per_gpu[p.gpu] = em.per_gpu.get(p.gpu, 0) + (p.used_bytes or 0)
        if p.pid not in em.pids:
            em.pids.append(p.pid)
    for engine in engine_pids:
        out.setdefault(engine, EngineMemory(engine, {}, []))
    return out


class NvmlSampler:
    """A daemon thread reading NVML at `hz`, keeping the last `maxlen` samples."""

    def __init__(self, hz: float = 4.0, maxlen: int = 2400) -> None:
        self.period = 1.0 / hz
        self.samples: deque[Sample] = deque(maxlen=maxlen)
        self.num_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> NvmlSampler:
        if not available():
            raise RuntimeError("NVML is not available: nothing to sample")
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.samples.append(read_sample())
            except Exception:
                self.num_errors += 1
            if self._stop.wait(self.period):
                return

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> NvmlSampler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
