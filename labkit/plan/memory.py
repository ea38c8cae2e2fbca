"""Per-GPU memory the way vLLM 0.26 counts it: an engine's budget, weights, peak activation,
non-torch overhead and what is left for KV blocks (`_plan_engine`), the memory fraction each
engine of a shared GPU gets, and the per-GPU lines the plan shows. Used by labkit.plan.validate.
"""

from __future__ import annotations

import math
from dataclasses import replace

from labkit.hardware import GPUType
from labkit.models import ModelShape, normalize_kv_dtype, pad_vocab
from labkit.plan.errors import ConfigError
from labkit.plan.types import (
    EngineConfig,
    EnginePlan,
    GPUPlan,
    MemoryLine,
    RankPlacement,
    Role,
)
from labkit.vocab import GiB

MAX_TP = 64
SHARED_GPU_MAX_UTIL = 0.9  # the pair's fractions on one GPU: CUDA contexts live outside them
# Estimates of memory vLLM does not report ahead (labelled as such in every view):
CUDA_CONTEXT_BYTES = GiB // 2  # per process, taken before vLLM's budget is measured
NON_TORCH_BYTES = int(0.22 * GiB)  # vLLM's "non-torch memory", one engine alone (H200)
NON_TORCH_DIST_BYTES = GiB // 2  # extra with TP*PP > 1: NCCL and custom all-reduce buffers
CUDAGRAPH_BYTES = GiB // 2  # without --enforce-eager (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS)


def valid_tp_sizes(model: ModelShape, limit: int = MAX_TP) -> list[int]:
    """TP sizes vLLM can shard `model` over: heads, KV heads, MLP and padded vocab divide."""
    kv, out = model.num_kv_heads, []
    for tp in range(1, limit + 1):
        if (
            model.num_heads % tp == 0
            and (kv % tp == 0 or tp % kv == 0)
            and model.intermediate_size % tp == 0
            and pad_vocab(model.vocab_size) % tp == 0
        ):
            out.append(tp)
    return out


def default_max_num_batched_tokens(
    gpu: GPUType, max_model_len: int, max_num_seqs: int, chunked: bool
) -> int:
    """vLLM's serve default (engine/arg_utils.py get_batch_defaults and
    _set_default_max_num_seqs_and_batched_tokens_args): 8192 on GPUs of >= 70 GiB but
    A100, else 2048; without chunked prefill at least max_model_len; at most
    max_num_seqs * max_model_len."""
    big = gpu.memory_bytes >= 70 * GiB and "a100" not in gpu.name.lower()
    chunk = 8192 if big else 2048
    if not chunked:
        chunk = max(max_model_len, chunk)
    return min(max_num_seqs * max_model_len, chunk)


def activation_bytes(model: ModelShape, num_tokens: int, max_num_seqs: int, tp: int = 1) -> int:
    """Estimate of vLLM's "peak activation" from its profile run (num_tokens = the chunk).

    The MLP of one layer peaks at residual + hidden + gate_up + act = (4h + 3i/tp) per
    token (lab-1b, 8192 tokens: 0.383 GiB; real vLLM logged 0.38 GiB); the sampler's dummy
    run holds max_num_seqs rows of fp32 logits and probabilities (~8.5 B per vocab entry:
    qwen2.5-0.5b, 256 seqs: real vLLM logged 0.31 GiB). The larger one wins.
    """
    b = model.dtype_bytes
    forward = num_tokens * (4 * model.hidden_size + 3 * model.intermediate_size // tp) * b
    sampler = int(max_num_seqs * model.vocab_size * 8.5)
    return int(max(forward, sampler))


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def pick_utilization(
    names: list[str], engines: list[EngineConfig], shared: bool, notes: list[str]
) -> list[float]:
    utils = [e.gpu_memory_utilization for e in engines]
    if not shared:
        picked = [0.9 if u is None else u for u in utils]
    else:
        given = [u for u in utils if u is not None]
        default = 0.4 if not given else round(min(0.4, 0.85 - given[0]), 2)
        picked = [default if u is None else u for u in utils]
        if sum(picked) > SHARED_GPU_MAX_UTIL + 1e-9 or min(picked) <= 0:
            raise ConfigError(
                f"gpu_memory_utilization on the shared GPU adds up to {sum(picked):.2f} "
                f"(prefill {picked[0]}, decode {picked[1]}): each fraction is of the whole GPU and "
                f"each process also holds a CUDA context outside it",
                f"make them add up to <= {SHARED_GPU_MAX_UTIL}, e.g. 0.4 and 0.4",
            )
    for name, u, p in zip(names, utils, picked, strict=True):
        if u is None:
            notes.append(
                f"{name}: gpu_memory_utilization {p} picked"
                + (" (two engines share GPU 0)" if shared else "")
            )
    return picked


def plan_engine(
    name: str,
    role: Role,
    e: EngineConfig,
    model: ModelShape,
    gpu: GPUType,
    util: float,
    first_gpu: int,
    notes: list[str],
    num_gpus: int | None = None,
    num_engines: int = 1,
) -> EnginePlan:
    """Resolve one engine and count its memory the way vLLM's gpu_worker does:
    available KV = ceil(total * util) - weights - peak activation - non-torch
    (v1/worker/gpu_worker.py determine_available_memory), blocks = available // page
    (v1/core/kv_cache_utils.py get_num_blocks), the smallest worker wins."""
    kvd = normalize_kv_dtype(e.kv_cache_dtype)
    ranks = [
        RankPlacement(p, t, first_gpu + p * e.tp + t) for p in range(e.pp) for t in range(e.tp)
    ]
    model_len = e.max_model_len or model.max_position_embeddings
    chunk = e.max_num_batched_tokens or default_max_num_batched_tokens(
        gpu, model_len, e.max_num_seqs, e.enable_chunked_prefill
    )
    act = activation_bytes(model, chunk, e.max_num_seqs, e.tp)
    overhead = (
        NON_TORCH_BYTES
        + (NON_TORCH_DIST_BYTES if e.world_size > 1 else 0)
        + (0 if e.enforce_eager else CUDAGRAPH_BYTES)
    )
    budget = math.ceil(gpu.memory_bytes * util)
    weights = model.weight_bytes(e.tp, e.pp)
    layers = model.layers_per_stage(e.pp)
    tok_bytes = model.kv_bytes_per_token(kvd, e.tp) // model.num_layers  # one layer, one token
    avail = [budget - w - act - overhead for w in weights]
    pages = [e.block_size * tok_bytes * n for n in layers]
    worst = min(range(e.pp), key=lambda s: avail[s] // pages[s])
    if avail[worst] < pages[worst]:
        need = (weights[worst] + act + overhead + pages[worst]) / gpu.memory_bytes
        fits = [
            t
            for t in valid_tp_sizes(model)
            if t > e.tp and budget - model.weight_bytes(t, e.pp)[0] - act - overhead > pages[0]
        ]
        more = "use a larger pp or a smaller model"
        if fits:
            per = fits[0] * e.pp
            more = f"use tp={fits[0]} ({per} GPUs per engine)"
            if num_gpus is not None and per * num_engines > num_gpus:
                # the fix must be one that works: say the GPUs it takes
                more = (f"use tp={fits[0]} with num_gpus={per * num_engines} ({per} GPUs per "
                        f"engine, {num_engines} engines)")
                if per <= num_gpus and num_engines > 1:
                    more += f", or tp={fits[0]} with colocated=True (one engine, no PD)"
        raise ConfigError(
            f"{name}: {model.name} needs {_gib(weights[worst])} weights + {_gib(act)} activations "
            f"+ {_gib(overhead)} overhead per GPU, more than its {_gib(budget)} share "
            f"(gpu_memory_utilization {util} of {_gib(gpu.memory_bytes)})",
            (
                f"raise gpu_memory_utilization to >= {math.ceil(need * 100) / 100}, or "
                if need <= 0.9
                else ""
            )
            + f"{more}"
            + (", or a smaller max_num_batched_tokens" if act > weights[worst] else ""),
        )
    num_blocks = min(a // p for a, p in zip(avail, pages, strict=True))
    if e.num_gpu_blocks_override is not None:
        if e.num_gpu_blocks_override > num_blocks:
            raise ConfigError(
                f"{name}: num_gpu_blocks_override={e.num_gpu_blocks_override} needs "
                f"more than the {num_blocks} blocks that fit",
                f"use num_gpu_blocks_override <= {num_blocks}, or raise gpu_memory_utilization",
            )
        num_blocks = e.num_gpu_blocks_override
    num_tokens = num_blocks * e.block_size
    if e.max_model_len is None and e.enable_chunked_prefill:
        # 90 % of the planned capacity: the plan's activation/overhead figures are estimates,
        # and vLLM refuses to start when one max-length request does not fit the real pool
        # (an 8B pair sharing an H100: 15.59 GiB needed, 15.57 GiB there).
        fit = int(num_tokens * 0.9) // e.block_size * e.block_size
        model_len = min(model.max_position_embeddings, fit)
        why = (
            "the KV capacity"
            if model_len < model.max_position_embeddings
            else f"{model.name}'s max_position_embeddings"
        )
        notes.append(f"{name}: max_model_len {model_len} picked ({why})")
    elif -(-model_len // e.block_size) > num_blocks:
        raise ConfigError(
            f"{name}: max_model_len={model_len} needs {-(-model_len // e.block_size)} KV blocks, "
            f"the engine has {num_blocks} ({num_tokens} tokens)",
            f"use max_model_len <= {num_tokens}, raise gpu_memory_utilization, or use fp8 KV / more tp",
        )
    if chunk < e.block_size:
        raise ConfigError(
            f"{name}: max_num_batched_tokens={chunk} is smaller than block_size={e.block_size}",
            f"use a chunk of at least {e.block_size} tokens (a multiple of block_size)",
        )
    if chunk < e.max_num_seqs:
        raise ConfigError(
            f"{name}: max_num_batched_tokens={chunk} < max_num_seqs={e.max_num_seqs} "
            "(vLLM refuses: config/scheduler.py verify_max_model_len)",
            f"set max_num_seqs <= {chunk}, or a larger chunk",
        )
    if not e.enable_chunked_prefill and chunk < model_len:
        raise ConfigError(
            f"{name}: without chunked prefill a prompt must fit one step, but "
            f"max_num_batched_tokens={chunk} < max_model_len={model_len}",
            f"enable chunked prefill, or set max_model_len <= {chunk}",
        )
    resolved = replace(
        e,
        role=role,
        max_num_batched_tokens=chunk,
        max_model_len=model_len,
        gpu_memory_utilization=util,
        extra_args=list(e.extra_args),
    )
    return EnginePlan(
        name=name,
        role=role,
        config=resolved,
        ranks=ranks,
        gpu_memory_utilization=util,
        max_num_batched_tokens=chunk,
        max_model_len=model_len,
        kv_cache_dtype=kvd,
        kv_bytes_per_token=max(layers) * tok_bytes,
        page_bytes=max(pages),
        weight_bytes=weights,
        activation_bytes=act,
        overhead_bytes=overhead,
        kv_cache_bytes=min(avail),
        num_blocks=num_blocks,
        num_tokens=num_tokens,
        source=e,
    )


def gpu_lines(
    plans: list[EnginePlan], model: ModelShape, gpu: GPUType, num_gpus: int
) -> list[GPUPlan]:
    """Each GPU's memory: one line per engine rank on it, and what is left free."""
    out = [GPUPlan(i, gpu.memory_bytes, [], gpu.memory_bytes) for i in range(num_gpus)]
    for ep in plans:
        layers = model.layers_per_stage(ep.config.pp)
        tok_layer = ep.kv_bytes_per_token // max(layers)
        for r in ep.ranks:
            kv = ep.num_blocks * ep.config.block_size * tok_layer * layers[r.pp_rank]
            line = MemoryLine(
                ep.name,
                ep.weight_bytes[r.pp_rank],
                kv,
                ep.activation_bytes,
                ep.overhead_bytes + CUDA_CONTEXT_BYTES,
                math.ceil(gpu.memory_bytes * ep.gpu_memory_utilization),
            )
            g = out[r.gpu]
            g.lines.append(line)
            g.free -= line.weights + line.kv + line.activation + line.overhead
    for g in out:
        if g.free < 0:
            raise ConfigError(
                f"GPU {g.index} is over-committed by {_gib(-g.free)}",
                "lower gpu_memory_utilization of the engines on it",
            )
    return out
