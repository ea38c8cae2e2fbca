"""The lab's configuration and plan types: what the learner sets (EngineConfig, PDConfig) and
what `labkit.plan.validate` makes of it (Plan, EnginePlan, GPUPlan, ...). Plain data; the
checks live in labkit/plan/planner.py, the memory arithmetic in labkit/plan/memory.py."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from labkit.hardware import GPUType
from labkit.models import ModelShape

Role = Literal["prefill", "decode", "both"]


@dataclass
class EngineConfig:
    """One `vllm serve` engine: the knobs a learner turns (None = the planner picks)."""

    model: str = "lab-1b"
    role: Role = "both"
    tp: int = 1
    pp: int = 1
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    max_num_batched_tokens: int | None = None  # the chunk size; None = vLLM's serve default
    max_num_seqs: int = 256
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_offloading_size_gb: float | None = None
    enforce_eager: bool = True
    load_format: Literal["dummy", "auto"] = "dummy"  # dummy: random weights, no download
    num_gpu_blocks_override: int | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


@dataclass
class PDConfig:
    """A prefill engine and a decode engine (or one colocated engine, for comparisons);
    num_prefill / num_decode copies of each for xPyD (labkit/plan/xpyd.py places them)."""

    prefill: EngineConfig = field(default_factory=lambda: EngineConfig(role="prefill"))
    decode: EngineConfig = field(default_factory=lambda: EngineConfig(role="decode"))
    connector: Literal["auto", "example", "nixl"] = "auto"
    num_gpus: int | None = None  # None = detected (2 simulated GPUs where there is none)
    gpu_type: str | None = None  # a GPU_TYPES key; differing from the machine = simulated
    colocated: bool = False  # one engine (the prefill config) doing both phases, no PD
    num_prefill: int = 1  # xPyD: prefill engines, each a copy of `prefill` on its own GPUs
    num_decode: int = 1  # xPyD: decode engines, each a copy of `decode` on its own GPUs


@dataclass(frozen=True)
class RankPlacement:
    pp_rank: int
    tp_rank: int
    gpu: int


@dataclass
class MemoryLine:
    """One engine's share of one GPU, in bytes (overhead = non-torch + CUDA graphs + context)."""

    engine: str
    weights: int
    kv: int
    activation: int
    overhead: int
    budget: int  # ceil(total * gpu_memory_utilization): vLLM's requested_memory


@dataclass
class GPUPlan:
    index: int
    total: int
    lines: list[MemoryLine]
    free: int


@dataclass(kw_only=True)
class EnginePlan:
    """One engine with every None resolved, its ranks and its KV capacity."""

    name: str  # "prefill" | "decode" | "colocated"
    role: Role
    config: EngineConfig  # resolved copy
    ranks: list[RankPlacement]
    gpu_memory_utilization: float
    max_num_batched_tokens: int
    max_model_len: int
    kv_cache_dtype: str
    kv_bytes_per_token: int  # per GPU, largest PP stage
    page_bytes: int  # one block on one GPU, all its layers
    weight_bytes: list[int]  # per PP stage
    activation_bytes: int
    overhead_bytes: int  # non-torch + CUDA graphs, inside the budget
    kv_cache_bytes: int  # what vLLM would log as "Available KV cache memory" (smallest rank)
    num_blocks: int  # vLLM's num_gpu_blocks; block 0 is its null block, so num_blocks-1 usable
    num_tokens: int  # num_blocks * block_size: vLLM's "GPU KV cache size: N tokens"
    source: EngineConfig | None = field(default=None, repr=False, compare=False)

    @property
    def gpus(self) -> list[int]:
        return sorted({r.gpu for r in self.ranks})

    @property
    def max_concurrency(self) -> float:
        return self.num_tokens / self.max_model_len


@dataclass(kw_only=True)
class Plan:
    kind: Literal["vllm", "sim"]
    gpu_type: GPUType
    num_gpus: int
    connector: str | None  # "example" | "nixl" | None (colocated)
    link: str  # a hardware.LINKS key the KV travels over
    model: ModelShape
    engines: list[EnginePlan]
    gpus: list[GPUPlan]
    notes: list[str] = field(default_factory=list)

    def engine(self, key: int | str | EngineConfig | EnginePlan) -> EnginePlan:
        """An engine by index, name ("prefill"), role, or the EngineConfig it came from."""
        if isinstance(key, EnginePlan):
            return key
        if isinstance(key, int):
            return self.engines[key]
        for e in self.engines:
            if isinstance(key, str) and key in (e.name, e.role):
                return e
        if isinstance(key, EngineConfig):
            for e in self.engines:
                if e.source is key:
                    return e
            for e in self.engines:
                if e.role == key.role:
                    return e
        raise KeyError(f"no engine {key!r} in this plan ({[e.name for e in self.engines]})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for `labkit plan --json` and the views)."""
        d = asdict(self)
        d["gpu_type"] = self.gpu_type.key
        d["model"] = self.model.name
        for e, ed in zip(self.engines, d["engines"], strict=True):
            ed.pop("source", None)
            ed["gpus"], ed["max_concurrency"] = e.gpus, round(e.max_concurrency, 2)
        return d
