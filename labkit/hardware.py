"""The GPUs the lab runs on, as facts: a datasheet table, link peaks, the machine type.

`simulated()` builds the cluster the simulator runs on where there is no GPU. Which GPUs this
process really sees (NVML, CUDA_VISIBLE_DEVICES) is the planner's `labkit.plan.devices.detect()`.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field, replace

from labkit.vocab import MiB

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
    "roce": LinkSpec("roce", "RoCE v2 over 200 GbE (RDMA)", 25e9, 5e-6),
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
    # real-h200-1gpu-example, in git history since 2026-12-05, and -fp8): 0.41 ms per file +
    # 2.0 GB/s. (Loads: LINKS["same-gpu"].)
    ("example-save", "same-gpu"): LinkSpec("same-gpu", "ExampleConnector save, as measured (H200)",
                                           2.0e9, 4.1e-4),
}


# Across nodes (labkit/cluster), one NIC per GPU: not measured yet. The NVLink run above moved
# 12.1 GB/s over a 450 GB/s link, so the link did not bound it: NIXL's own path did (UCX,
# one read per request). Across nodes the same path runs over the NIC, so a cross-node read
# gets at most the smaller of that measured 12.1 GB/s and the NIC's peak, with the NIC's
# latency: never faster than NVLink as measured (InfiniBand NDR and RoCE 200 GbE: 12.1 GB/s;
# TCP over 25 GbE: its 3.1 GB/s peak). An upper bound until a two-node run measures it.
NIXL_MEASURED_BW = ACHIEVED[("nixl", "nvlink")].bandwidth
for _key in ("rdma", "roce", "tcp"):
    _nic = LINKS[_key]
    ACHIEVED[("nixl", _key)] = LinkSpec(
        _key, f"{_nic.name}, NixlConnector bound: min(NIC peak, NVLink as measured)",
        min(_nic.bandwidth, NIXL_MEASURED_BW), _nic.latency)


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


def unknown_gpu_type(info: GPUInfo) -> GPUType:
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


def vllm_available() -> bool:
    """Whether vLLM can be imported here (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def nixl_available() -> bool:
    """Whether the NIXL wheel vLLM's NixlConnector needs can be imported here."""
    return importlib.util.find_spec("nixl") is not None
