"""How long one engine step takes: a roofline over the model shape on the GPU's peaks.

Per pipeline stage (each GPU of a TP group does 1/tp of it):

    compute = matmul FLOPs(scheduled tokens) / (peak * matmul_eff)
            + attention FLOPs(query x context pairs) / (peak * attention_eff)
    memory  = (weights of the stage, read once per step + KV read and written) / (HBM bw * mem_eff)
    stage   = max(compute, memory) + TP all-reduce (2 per layer, ring over NVLink or PCIe)

    step    = sum of stages (one batch crosses every stage; V1's PP micro-batch overlap is
              not modelled) + PP sends between stages
              + overhead (per step + per layer * layers + per request)

A step has two parts that the engine treats differently (`step_parts`): the LAUNCH part
(the overhead: the engine-core thread preparing inputs and launching kernels, CPU time) and
the GPU part (the stages and sends). Which one dominates decides whether vLLM's async
engine core schedules one step ahead or emits a step's tokens one launch late
(labkit/engines/sim/async_sched.py); two engines on one GPU share only the GPU part
(labkit/engines/sim/shared_gpu.py).

The KV-cache dtype changes KV bytes (fp8: 1 byte per element). Constants come from
labkit/data/costs/<gpu>.json; they are marked "uncalibrated defaults" until fitted to real
vLLM runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # labkit.models / labkit.hardware are light, but keep import order loose
    from labkit.hardware import GPUType, LinkSpec
    from labkit.models import ModelShape

COSTS_DIR = Path(__file__).resolve().parents[2] / "data" / "costs"


@dataclass(frozen=True)
class CostParams:
    """Efficiency factors and overheads of one GPU type (labkit/data/costs/<gpu>.json)."""

    gpu: str = "h100"
    calibrated: bool = False
    matmul_efficiency: float = 0.6
    attention_efficiency: float = 0.4
    memory_efficiency: float = 0.8
    comm_efficiency: float = 0.7
    step_overhead_s: float = 0.002
    per_request_overhead_s: float = 1.5e-5
    # With --enforce-eager vLLM launches each layer's kernels from Python, so a step's launch
    # time grows with the layers: step_overhead_s + per_layer_overhead_s * num_layers (0: a
    # costs file fitted to one model, whose layers' share sits in step_overhead_s).
    per_layer_overhead_s: float = 0.0
    allreduce_latency_s: float = 1.2e-5
    pp_send_latency_s: float = 2e-5
    memory: dict[str, Any] = field(default_factory=dict)


def load_cost_params(gpu_key: str) -> CostParams:
    """Read labkit/data/costs/<gpu_key>.json (unknown GPUs fall back to h100's constants)."""
    path = COSTS_DIR / f"{gpu_key}.json"
    if not path.exists():
        path = COSTS_DIR / "h100.json"
    raw = json.loads(path.read_text())
    known = set(CostParams.__dataclass_fields__)
    return CostParams(**{k: v for k, v in raw.items() if k in known})


def load_api_latency(gpu_key: str) -> float:
    """The API time of one engine call the calibration measured on this GPU (seconds; 0 when
    the costs file has none): client -> vLLM's HTTP server -> engine core -> first byte back."""
    path = COSTS_DIR / f"{gpu_key}.json"
    if not path.exists():
        return 0.0
    return float(json.loads(path.read_text()).get("calibration", {}).get("api_latency_s", 0.0))


@dataclass(slots=True)
class StepCost:
    """The parts of one step's time (seconds), for views that show the roofline."""

    compute_s: float
    memory_s: float
    comm_s: float
    overhead_s: float
    total_s: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    @property
    def launch_s(self) -> float:
        """CPU time on the engine-core thread (inputs, kernel launches): the overhead."""
        return self.overhead_s

    @property
    def gpu_s(self) -> float:
        """Time the GPU itself works: the stages, TP all-reduces and PP sends."""
        return self.total_s - self.overhead_s


class CostModel:
    """Step time of one engine (one TP x PP group of GPUs) from the model's arithmetic.

    Args:
        model: the model shape (labkit.models.ModelShape).
        gpu: the GPU type (labkit.hardware.GPUType).
        tp, pp: tensor / pipeline parallel sizes.
        kv_cache_dtype: "auto" (model dtype), "fp8", ...
        params: efficiency constants; default: labkit/data/costs/<gpu.key>.json.
        tp_link_bw: GPU<->GPU bandwidth for all-reduce and PP sends (bytes/s); default
            NVLink if the GPU has it, else PCIe.
    """

    def __init__(self, model: ModelShape, gpu: GPUType, tp: int = 1, pp: int = 1,
                 kv_cache_dtype: str = "auto", params: CostParams | None = None,
                 tp_link_bw: float | None = None) -> None:
        self.model, self.gpu, self.tp, self.pp = model, gpu, tp, pp
        self.kv_cache_dtype = kv_cache_dtype
        self.params = p = params or load_cost_params(gpu.key)
        link_bw = tp_link_bw or gpu.nvlink_bw or gpu.pcie_bw
        flops = gpu.bf16_flops
        layers = model.layers_per_stage(pp)
        max_layers = max(layers)
        weights = model.weight_bytes(tp, pp)
        kv_tok_max = model.kv_bytes_per_token(kv_cache_dtype, tp, pp)
        self.kv_bytes_per_token = kv_tok_max
        matmul_tok = model.matmul_flops_per_token() / tp
        attn_pair = model.attention_flops(1, 1) / tp  # 4 * L * heads * head_dim, one (query, key) pair
        act_bytes = 2  # bf16 activations on the wire
        # Per stage: (seconds per scheduled token of matmul, per attention pair, fixed weight
        # read, per context token of KV traffic, per token of all-reduce, fixed all-reduce).
        self._stages: list[tuple[float, float, float, float, float, float]] = []
        for n, w in zip(layers, weights, strict=False):
            frac = n / model.num_layers
            comm_tok = comm_fixed = 0.0
            if tp > 1:
                ring = 2.0 * (tp - 1) / tp * model.hidden_size * act_bytes / (link_bw * p.comm_efficiency)
                comm_tok = 2 * n * ring
                comm_fixed = 2 * n * p.allreduce_latency_s
            self._stages.append((
                matmul_tok * frac / (flops * p.matmul_efficiency),
                attn_pair * frac / (flops * p.attention_efficiency),
                w / (gpu.mem_bw * p.memory_efficiency),
                kv_tok_max * n / max_layers / (gpu.mem_bw * p.memory_efficiency),
                comm_tok,
                comm_fixed,
            ))
        self._pp_send_tok = (pp - 1) * model.hidden_size * act_bytes / link_bw if pp > 1 else 0.0
        self._pp_send_fixed = (pp - 1) * p.pp_send_latency_s
        # The launch part of a step: per step + per layer (every stage's layers: one batch
        # crosses all of them, as the stages' times add up above) + per request (step_cost).
        self._overhead = p.step_overhead_s + p.per_layer_overhead_s * model.num_layers
        self._per_req = p.per_request_overhead_s

    def step_cost(self, num_tokens: int, num_reqs: int, sum_context: float, attn_pairs: float) -> StepCost:
        """Time of one step.

        Args:
            num_tokens: tokens scheduled this step (prefill chunks + decodes).
            num_reqs: requests in the batch.
            sum_context: sum over requests of the tokens whose KV is read or written.
            attn_pairs: sum over requests of causal (query, key) pairs.
        """
        compute = memory = comm = total = 0.0
        for mm, at, w, kv, ct, cf in self._stages:
            c = mm * num_tokens + at * attn_pairs
            m = w + kv * sum_context
            x = ct * num_tokens + cf
            compute += c
            memory += m
            comm += x
            total += (c if c > m else m) + x
        if self._pp_send_tok:
            send = self._pp_send_tok * num_tokens + self._pp_send_fixed
            comm += send
            total += send
        overhead = self._overhead + self._per_req * num_reqs
        return StepCost(compute, memory, comm, overhead, total + overhead)

    def step_time(self, num_tokens: int, num_reqs: int, sum_context: float, attn_pairs: float) -> float:
        """Seconds for one step (the hot path: no allocation for pp=1)."""
        if len(self._stages) == 1 and not self._pp_send_tok:
            mm, at, w, kv, ct, cf = self._stages[0]
            c = mm * num_tokens + at * attn_pairs
            m = w + kv * sum_context
            return (c if c > m else m) + ct * num_tokens + cf + self._overhead + self._per_req * num_reqs
        return self.step_cost(num_tokens, num_reqs, sum_context, attn_pairs).total_s

    def step_parts(self, num_tokens: int, num_reqs: int, sum_context: float, attn_pairs: float
                   ) -> tuple[float, float]:
        """(launch seconds, GPU seconds) of one step; their sum is `step_time` (hot path)."""
        launch = self._overhead + self._per_req * num_reqs
        if len(self._stages) == 1 and not self._pp_send_tok:
            mm, at, w, kv, ct, cf = self._stages[0]
            c = mm * num_tokens + at * attn_pairs
            m = w + kv * sum_context
            return launch, (c if c > m else m) + ct * num_tokens + cf
        cost = self.step_cost(num_tokens, num_reqs, sum_context, attn_pairs)
        return launch, cost.total_s - cost.overhead_s

    def kv_bytes(self, num_tokens: int) -> int:
        """KV bytes of `num_tokens` tokens on one GPU of this engine."""
        return num_tokens * self.kv_bytes_per_token


def transfer_time(num_bytes: float, link: LinkSpec) -> float:
    """Seconds to move `num_bytes` over a link: latency + bytes / bandwidth."""
    return link.latency + num_bytes / link.bandwidth


def kv_cache_num_blocks(model: ModelShape, gpu: GPUType, *, gpu_memory_utilization: float = 0.92,
                        tp: int = 1, pp: int = 1, kv_cache_dtype: str = "auto", block_size: int = 16,
                        max_num_batched_tokens: int = 2048, connector: str | None = None,
                        params: CostParams | None = None) -> int:
    """GPU KV blocks vLLM would allocate (gpu_worker.py: util x total - weights - peak
    activation - non-torch memory), the null block included.

    The fraction is of the whole GPU, as vLLM's --gpu-memory-utilization.
    """
    p = params or load_cost_params(gpu.key)
    mem = p.memory
    budget = gpu.memory_bytes * gpu_memory_utilization
    weights = max(model.weight_bytes(tp, pp))
    act = max_num_batched_tokens * (
        model.hidden_size * mem.get("activation_k_hidden", 24)
        + model.intermediate_size / tp * mem.get("activation_k_intermediate", 8)
        + model.vocab_size / tp * mem.get("activation_k_vocab", 3.3))
    key = "non_torch_bytes_nixl" if connector == "nixl" else "non_torch_bytes"
    non_torch = mem.get(key, mem.get("non_torch_bytes", 6.5e8))
    kv = budget - weights - act - non_torch
    block_bytes = block_size * model.kv_bytes_per_token(kv_cache_dtype, tp, pp)
    num_blocks = int(kv // block_bytes)
    if num_blocks < 2:
        raise ValueError(
            f"no memory left for the KV cache: {budget / 2**30:.2f} GiB budget, weights "
            f"{weights / 2**30:.2f} GiB, activations {act / 2**30:.2f} GiB, other {non_torch / 2**30:.2f} GiB")
    return num_blocks
