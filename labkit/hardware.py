"""The GPUs the lab runs on: a datasheet table, link peaks, and NVML detection.

`detect()` asks NVML (nvidia-ml-py, imported inside the function, never at import time);
with no driver or no GPU it returns a simulated machine and says so. `simulated()` builds
the cluster the simulator runs on where there is no GPU.

The lab honours the parent's CUDA_VISIBLE_DEVICES: `detect()` keeps the GPUs it names, in
its order, so plan GPU k (a *logical* GPU, 0..n-1) is the k-th entry; `engine_gpu_env()`
turns logical GPUs back into the parent's entries for an engine's environment.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from labkit.visible_devices import (  # noqa: F401  (re-exported: the lab's one place for it)
    _NO_GPU,
    VISIBLE_ENV,
    cuda_visible_devices,
    engine_gpu_env,
    resolve_visible,
    visible_entries,
)

GiB = 1 << 30
MiB = 1 << 20
# CUDA reports less than NVML's total (what the driver keeps): an H100 80GB HBM3 shows
# 81,559 MiB in NVML and 79.18 GiB (81,080 MiB) to torch.cuda.mem_get_info, which is the
# base vLLM multiplies --gpu-memory-utilization with (fixtures/vllm-0.26/logs).
_CUDA_RESERVED = 479 * MiB


@dataclass(frozen=True)
class GPUType:
    """Peak numbers of one GPU model (dense, from NVIDIA's datasheets)."""

    key: str
    name: str
    memory_bytes: int  # total as CUDA reports it: the base of --gpu-memory-utilization
    bf16_flops: float
    fp8_flops: float | None
    mem_bw: float
    compute_capability: tuple[int, int]
    nvlink_bw: float | None  # bytes/s, one direction, GPU<->GPU
    pcie_bw: float  # bytes/s, one direction

    @property
    def supports_fp8_kv(self) -> bool:
        """vLLM's fp8 KV cache needs compute capability 8.9 (Ada) or newer."""
        return self.compute_capability >= (8, 9)


GPU_TYPES: dict[str, GPUType] = {
    "h100": GPUType(
        "h100", "NVIDIA H100 80GB HBM3", 81_080 * MiB, 989e12, 1979e12, 3.35e12, (9, 0), 450e9, 64e9
    ),
    # H200: torch.cuda.mem_get_info() on the lent H200 (NVML: 143,771 MiB)
    "h200": GPUType(
        "h200", "NVIDIA H200", 150_109_880_320, 989e12, 1979e12, 4.8e12, (9, 0), 450e9, 64e9
    ),
    "a100": GPUType(
        "a100", "NVIDIA A100-SXM4-80GB", 81_920 * MiB - _CUDA_RESERVED, 312e12, None, 2.039e12,
        (8, 0), 300e9, 32e9
    ),
    "l4": GPUType(
        "l4", "NVIDIA L4", 23_034 * MiB - _CUDA_RESERVED, 121e12, 242e12, 300e9, (8, 9), None, 32e9
    ),
}


@dataclass(frozen=True)
class LinkSpec:
    """A path KV can take from the prefill GPU to the decode GPU (peak, one direction)."""

    key: str
    name: str
    bandwidth: float  # bytes/s
    latency: float  # seconds


LINKS: dict[str, LinkSpec] = {
    # ExampleConnector writes one safetensors file per (request, layer) to /dev/shm and reads
    # them back; latency is per file. Measured on an H200 (docs/gpu-runs.md), lab-1b, 1,072
    # tokens = 4.39 MB per layer file: save 1.39-1.79 ms per layer (bracket mode), load of
    # 16 files 21.6-24.4 ms; 0.1 ms + 4.39 MB / 3 GB/s = 1.56 ms per file sits in between.
    "same-gpu": LinkSpec("same-gpu", "same GPU, through host /dev/shm files", 3.0e9, 1e-4),
    "nvlink": LinkSpec("nvlink", "NVLink 4 (18 links)", 450e9, 3e-6),
    "pcie": LinkSpec("pcie", "PCIe Gen5 x16", 64e9, 5e-6),
    "rdma": LinkSpec("rdma", "InfiniBand NDR 400 Gb/s (RDMA)", 50e9, 5e-6),
    "tcp": LinkSpec("tcp", "TCP over 25 GbE", 3.125e9, 50e-6),
}

# What a connector really gets out of a link (the LINKS above are the links' peaks, drawn as
# the "peak" line in the streaming view). NixlConnector over NVLink between two H200s moved
# 68 blocks of lab-1b (71,303,168 B) in 5.7-6.1 ms: ~12.1 GB/s (docs/gpu-runs.md). Links
# without a measurement use their peak.
ACHIEVED: dict[tuple[str, str], LinkSpec] = {
    ("nixl", "nvlink"): LinkSpec("nvlink", "NVLink 4, NixlConnector as measured (2xH200)",
                                 12.1e9, 3e-6),
    # Both engines on ONE GPU: UCX moves the blocks without CUDA IPC, through the host
    # (vLLM's KV Transfer metrics on an H100, 2026-11-21: 108.6 MB per transfer, 245 MB/s).
    ("nixl", "same-gpu"): LinkSpec("same-gpu", "one GPU, NixlConnector as measured (H100)",
                                   0.245e9, 1e-3),
    # ExampleConnector's save: per layer, .cpu() then one safetensors file. Fitted to the 255
    # per-layer save timings the observer recorded inside real vLLM (H200, shipped recordings
    # real-h200-1gpu-example / -fp8): 0.41 ms per file + 2.0 GB/s. (Loads: LINKS["same-gpu"].)
    ("example-save", "same-gpu"): LinkSpec("same-gpu", "ExampleConnector save, as measured (H200)",
                                           2.0e9, 4.1e-4),
}


def achieved_link(connector: str, link: LinkSpec) -> LinkSpec:
    """The link as `connector` achieves it where measured, else the link's peak."""
    return ACHIEVED.get((connector, link.key), link)


@dataclass(frozen=True)
class GPUInfo:
    """One GPU as NVML sees it (or as the simulator pretends it).

    `index` is the logical position (what plans call GPU k: the k-th entry of the parent's
    CUDA_VISIBLE_DEVICES, or NVML's k-th GPU when it is unset); `physical` is NVML's own
    index of it (PCI bus order), None for a simulated GPU.
    """

    index: int
    name: str
    uuid: str
    memory_total: int
    memory_used: int
    compute_capability: tuple[int, int]
    gpu_type: GPUType | None
    physical: int | None = None


@dataclass(frozen=True)
class Hardware:
    """The machine: its GPUs, whether they are simulated, and their type."""

    gpus: list[GPUInfo]
    simulated: bool
    gpu_type: GPUType
    note: str = field(default="", compare=False)

    @property
    def num_gpus(self) -> int:
        return len(self.gpus)


def gpu_type_for(name: str) -> GPUType | None:
    """The GPU_TYPES entry for an NVML device name ("NVIDIA H100 80GB HBM3" -> h100).

    Whole words only: "GH200" (Grace Hopper) and "L40S" are other GPUs.
    """
    low = name.lower()
    for key in ("h200", "h100", "a100", "l4"):
        if re.search(rf"\b{key}\b", low):
            return GPU_TYPES[key]
    return None


def simulated(num_gpus: int = 2, gpu_type: str = "h100") -> Hardware:
    """A simulated machine of `num_gpus` GPUs of `gpu_type` (a GPU_TYPES key)."""
    if gpu_type not in GPU_TYPES:
        raise ValueError(f"unknown gpu_type {gpu_type!r} (known: {', '.join(GPU_TYPES)})")
    if num_gpus < 0:
        raise ValueError(f"num_gpus must be >= 0, got {num_gpus}")
    t = GPU_TYPES[gpu_type]
    gpus = [
        GPUInfo(i, t.name, f"SIM-{gpu_type}-{i}", t.memory_bytes, 0, t.compute_capability, t)
        for i in range(num_gpus)
    ]
    return Hardware(gpus, True, t, note=f"simulated: {num_gpus} x {t.name}")


def _unknown_type(info: GPUInfo) -> GPUType:
    """A GPUType for a GPU outside the table: NVML's memory, peaks of the nearest kind."""
    cc = info.compute_capability
    near = GPU_TYPES["h100" if cc >= (9, 0) else "l4" if cc >= (8, 9) else "a100"]
    return replace(
        near,
        key="other",
        name=info.name,
        memory_bytes=max(0, info.memory_total - _CUDA_RESERVED),
        compute_capability=cc,
        fp8_flops=near.fp8_flops if cc >= (8, 9) else None,
    )


def detect() -> Hardware:
    """The GPUs this process may use, through NVML; a simulated machine with no GPU when NVML
    fails or CUDA_VISIBLE_DEVICES hides every GPU.

    Raises:
        ConfigError: CUDA_VISIBLE_DEVICES has an entry that names no GPU (before anything
            starts; CUDA itself would silently drop it and every entry after it).
    """
    raw = os.environ.get(VISIBLE_ENV)
    if raw is not None and raw.strip() in _NO_GPU:
        return replace(simulated(0), note=f"no GPU: {VISIBLE_ENV}={raw!r} hides every GPU")
    try:
        import pynvml
    except ImportError:
        return replace(simulated(0), note="no GPU: nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return replace(simulated(0), note=f"no GPU: NVML unavailable ({exc})")
    try:
        entries = visible_entries()
        try:
            every = [_gpu_info(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
            mig = _mig_devices(pynvml, every) if _wants_mig(entries) else {}
        except Exception as exc:
            return replace(simulated(0), note=f"no GPU: NVML query failed ({exc})")
        physical = resolve_visible(entries, [g.uuid for g in every], _mig_parents(mig))
        named = entries or [""] * len(physical)
        gpus = [replace(mig.get(named[k]) or every[p], index=k, physical=p)
                for k, p in enumerate(physical)]
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    if not gpus:
        return replace(simulated(0), note="no GPU found by NVML")
    first = gpus[0]
    kind = first.gpu_type or _unknown_type(first)
    note = f"{len(gpus)} x {first.name}"
    if entries is not None:
        note += (f" ({VISIBLE_ENV}={raw}: physical GPU(s) "
                 f"{', '.join(str(g.physical) for g in gpus)} of {len(every)})")
    return Hardware(gpus, False, kind, note=note)


def _gpu_info(nv: Any, i: int) -> GPUInfo:
    """NVML GPU `i` (index and physical both i; detect() renumbers the visible ones)."""
    h = nv.nvmlDeviceGetHandleByIndex(i)
    name = _text(nv.nvmlDeviceGetName(h))
    mem = nv.nvmlDeviceGetMemoryInfo(h)
    cc = tuple(nv.nvmlDeviceGetCudaComputeCapability(h))
    return GPUInfo(i, name, _text(nv.nvmlDeviceGetUUID(h)), int(mem.total), int(mem.used),
                   (int(cc[0]), int(cc[1])), gpu_type_for(name), physical=i)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _wants_mig(entries: Sequence[str] | None) -> bool:
    return any(e.startswith("MIG-") and not e.startswith("MIG-GPU-") for e in entries or ())


def _mig_devices(nv: Any, gpus: Sequence[GPUInfo]) -> dict[str, GPUInfo]:
    """MIG instance UUID -> the instance (its own memory, its GPU's physical index; no
    datasheet type: a slice has a share of the peaks), for GPUs in MIG mode."""
    out: dict[str, GPUInfo] = {}
    for g in gpus:
        h = nv.nvmlDeviceGetHandleByIndex(g.physical)
        try:
            slots = int(nv.nvmlDeviceGetMaxMigDeviceCount(h))
        except Exception:  # no MIG support on this GPU
            continue
        for j in range(slots):
            try:
                mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
            except Exception:  # an empty slot
                continue
            uuid, mem = _text(nv.nvmlDeviceGetUUID(mh)), nv.nvmlDeviceGetMemoryInfo(mh)
            out[uuid] = replace(g, name=f"{g.name} (MIG)", uuid=uuid, gpu_type=None,
                                memory_total=int(mem.total), memory_used=int(mem.used))
    return out


def _mig_parents(mig: Mapping[str, GPUInfo]) -> dict[str, int]:
    return {u: g.physical for u, g in mig.items() if g.physical is not None}


def visible_physical(nv: Any, environ: Mapping[str, str] | None = None) -> list[int]:
    """NVML indices of the GPUs CUDA_VISIBLE_DEVICES lets this process use, in its order
    (position k = logical GPU k). `nv` is pynvml, initialised; raises as resolve_visible."""
    entries = visible_entries(environ)
    count = int(nv.nvmlDeviceGetCount())
    if entries is None:
        return list(range(count))
    uuids = [_text(nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
    mig = _mig_devices(nv, [_gpu_info(nv, i) for i in range(count)]) if _wants_mig(entries) \
        else {}
    return resolve_visible(entries, uuids, _mig_parents(mig))


def vllm_available() -> bool:
    """Whether vLLM can be imported here (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def nixl_available() -> bool:
    """Whether the NIXL wheel vLLM's NixlConnector needs can be imported here."""
    return importlib.util.find_spec("nixl") is not None
