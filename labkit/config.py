"""What the learner toggles, checked before anything starts, and turned into a plan.

    EngineConfig x2 + PDConfig --validate(cfg, hardware)--> Plan --vllm_args()/env_for()--> vllm serve

`validate()` is pure arithmetic (well under 10 ms): it raises `ConfigError(problem, fix)` for
what vLLM 0.26 would reject (or silently get wrong), and otherwise returns a `Plan`: which
GPU runs which (pp_rank, tp_rank), each GPU's memory (weights, KV, activation, overhead,
free), each engine's KV capacity in blocks and tokens (vLLM's own formula), the connector.
The simulator reads the same Plan, so the two engine kinds agree on every number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from labkit.hardware import GPU_TYPES, GiB, GPUType, Hardware, nixl_available, vllm_available
from labkit.models import ModelShape, _pad_vocab, get_model, normalize_kv_dtype

Role = Literal["prefill", "decode", "both"]
MAX_TP = 64
SHARED_GPU_MAX_UTIL = 0.9  # the pair's fractions on one GPU: CUDA contexts live outside them
# Estimates of memory vLLM does not report ahead (labelled as such in every view):
CUDA_CONTEXT_BYTES = GiB // 2  # per process, taken before vLLM's budget is measured
NON_TORCH_BYTES = int(0.22 * GiB)  # vLLM's "non-torch memory", one engine alone (H200)
NON_TORCH_DIST_BYTES = GiB // 2  # extra with TP*PP > 1: NCCL and custom all-reduce buffers
CUDAGRAPH_BYTES = GiB // 2  # without --enforce-eager (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS)


class ConfigError(ValueError):
    """A configuration vLLM would refuse (or get wrong): what is wrong and what to do."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem} — {fix}")


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
    """A prefill engine and a decode engine (or one colocated engine, for comparisons)."""

    prefill: EngineConfig = field(default_factory=lambda: EngineConfig(role="prefill"))
    decode: EngineConfig = field(default_factory=lambda: EngineConfig(role="decode"))
    connector: Literal["auto", "example", "nixl"] = "auto"
    num_gpus: int | None = None  # None = detected (2 simulated GPUs where there is none)
    gpu_type: str | None = None  # a GPU_TYPES key; differing from the machine = simulated
    colocated: bool = False  # one engine (the prefill config) doing both phases, no PD


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


@dataclass
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


@dataclass
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


def valid_tp_sizes(model: ModelShape, limit: int = MAX_TP) -> list[int]:
    """TP sizes vLLM can shard `model` over: heads, KV heads, MLP and padded vocab divide."""
    kv, out = model.num_kv_heads, []
    for tp in range(1, limit + 1):
        if (
            model.num_heads % tp == 0
            and (kv % tp == 0 or tp % kv == 0)
            and model.intermediate_size % tp == 0
            and _pad_vocab(model.vocab_size) % tp == 0
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


def _check_engine(name: str, e: EngineConfig) -> ModelShape:
    """Field-level checks of one engine; returns its model."""

    def bad(problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{name}: {problem}", fix)

    for fld, lo, hi in (("tp", 1, MAX_TP), ("pp", 1, 64), ("max_num_seqs", 1, 65536)):
        v = getattr(e, fld)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise bad(f"{fld}={v!r} is out of range", f"use an integer in {lo}..{hi}")
    if e.role not in ("prefill", "decode", "both"):
        raise bad(f"role={e.role!r} is unknown", "use 'prefill', 'decode' or 'both'")
    if (
        not isinstance(e.block_size, int)
        or e.block_size <= 0
        or e.block_size % 16
        or e.block_size > 1024
    ):
        raise bad(
            f"block_size={e.block_size!r} is not allowed",
            "use a multiple of 16 up to 1024 (16, 32, 64, 128): vLLM 0.26's FlashAttention "
            "and Triton kernels take multiples of 16 (v1/attention/backends/flash_attn.py)",
        )
    for fld in ("max_num_batched_tokens", "max_model_len", "num_gpu_blocks_override"):
        v = getattr(e, fld)
        if v is not None and (
            not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v > 1 << 24
        ):
            raise bad(
                f"{fld}={v!r} is out of range",
                "use a positive integer (or None: the planner picks)",
            )
    u = e.gpu_memory_utilization
    if u is not None and not 0 < u <= 1:
        raise bad(
            f"gpu_memory_utilization={u!r} is outside (0, 1]",
            "use a fraction of the whole GPU such as 0.4, or None to let the planner pick",
        )
    if e.kv_offloading_size_gb is not None and not 0 < e.kv_offloading_size_gb <= 4096:
        raise bad(
            f"kv_offloading_size_gb={e.kv_offloading_size_gb!r} is out of range",
            "use a positive size in GiB of host memory, or None for no CPU offload",
        )
    try:
        normalize_kv_dtype(e.kv_cache_dtype)
    except ValueError:
        raise bad(
            f"kv_cache_dtype={e.kv_cache_dtype!r} is unknown",
            "use 'auto' (the model dtype), 'bfloat16', 'float16', 'fp8', 'fp8_e4m3' or 'fp8_e5m2'",
        ) from None
    try:
        model = get_model(e.model)
    except (KeyError, ValueError, OSError) as exc:
        from labkit.models import PRESETS

        raise bad(
            f"model {e.model!r} is unknown ({exc.__class__.__name__})",
            f"use a preset ({', '.join(PRESETS)}) or a path to a config.json",
        ) from None
    if e.load_format not in ("dummy", "auto"):
        raise bad(f"load_format={e.load_format!r} is unknown", "use 'dummy' or 'auto'")
    if model.synthetic and e.load_format != "dummy":
        raise bad(
            f"{model.name} is synthetic: there are no weights to load",
            "use load_format='dummy' (random weights; memory and timing stay real)",
        )
    tps = valid_tp_sizes(model)
    if e.tp not in tps:
        raise bad(
            f"tp={e.tp} cannot shard {model.name} ({model.num_heads} heads, "
            f"{model.num_kv_heads} KV heads, MLP {model.intermediate_size})",
            f"use tp in {tps}",
        )
    if e.pp > model.num_layers:
        raise bad(
            f"pp={e.pp} exceeds the {model.num_layers} layers of {model.name}",
            f"use pp <= {model.num_layers}",
        )
    if e.max_model_len is not None and e.max_model_len > model.max_position_embeddings:
        raise bad(
            f"max_model_len={e.max_model_len} exceeds {model.name}'s "
            f"max_position_embeddings {model.max_position_embeddings}",
            f"use max_model_len <= {model.max_position_embeddings}",
        )
    return model


def _machine(cfg: PDConfig, hw: Hardware) -> tuple[GPUType, int, bool, list[str]]:
    """(gpu type, GPU count, simulated?, notes) the plan is made for."""
    if cfg.gpu_type is not None and cfg.gpu_type not in GPU_TYPES:
        raise ConfigError(f"gpu_type={cfg.gpu_type!r} is unknown", f"use one of {list(GPU_TYPES)}")
    n = cfg.num_gpus
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64):
        raise ConfigError(
            f"num_gpus={n!r} is out of range", "use 1..64, or None for the GPUs present"
        )
    if hw.simulated or hw.num_gpus == 0 or (cfg.gpu_type and cfg.gpu_type != hw.gpu_type.key):
        key = cfg.gpu_type or (hw.gpu_type.key if hw.gpu_type.key in GPU_TYPES else "h100")
        count = n or hw.num_gpus or 2
        if not hw.simulated and hw.num_gpus:
            why = f"this machine has {hw.num_gpus} x {hw.gpu_type.name}"
        else:
            why = hw.note if hw.note.startswith("no GPU") else "no GPU here"
        return (
            GPU_TYPES[key],
            count,
            True,
            [f"simulated cluster: {count} x {GPU_TYPES[key].name} ({why})"],
        )
    if n is not None and n > hw.num_gpus:
        import os

        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f" visible (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else ""
        raise ConfigError(
            f"num_gpus={n} but this machine has {hw.num_gpus} GPU(s){seen}",
            f"use num_gpus <= {hw.num_gpus}, or set gpu_type to plan a simulated cluster",
        )
    return hw.gpu_type, n or hw.num_gpus, False, []


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def _pick_connector(cfg: PDConfig, kind: str, shared: bool, engines: list[EngineConfig]) -> str:
    if cfg.connector not in ("auto", "example", "nixl"):
        raise ConfigError(
            f"connector={cfg.connector!r} is unknown", "use 'auto', 'example' or 'nixl'"
        )
    any_pp = any(e.pp > 1 for e in engines)
    conn = cfg.connector
    if conn == "auto":
        has_nixl = kind == "sim" or nixl_available()
        # A chunk asked for on a shared GPU: ExampleConnector cannot carry a chunked prompt
        # (`_example_prefill`), NIXL can (through the host, ~0.25 GB/s on one H100).
        chunked = engines[0].max_num_batched_tokens is not None and engines[0].enable_chunked_prefill
        if any_pp or (shared and not (chunked and has_nixl)):
            conn = "example"
        else:
            conn = "nixl" if has_nixl else "example"
    if conn == "nixl" and any_pp:
        raise ConfigError(
            "NixlConnector cannot move KV with pp > 1 in vLLM 0.26 (the pull connector "
            "handshakes with PP rank 0 only; NixlPushConnector refuses PP on decode: "
            "kv_connector/v1/nixl/base_worker.py)",
            "use pp=1 on both engines with nixl, or connector='example' (PP works there, with tp=1)",
        )
    if conn == "nixl" and kind == "vllm" and not nixl_available():
        raise ConfigError(
            "connector='nixl' but the nixl package is not importable",
            "pip install nixl==1.5.1 nixl-cu13==1.5.1, or use connector='example'",
        )
    if conn == "example" and any(e.tp > 1 for e in engines):
        raise ConfigError(
            "ExampleConnector with tp > 1 corrupts KV: it names its files by layer only, so TP "
            "ranks overwrite each other's shards (kv_connector/v1/example_connector.py)",
            "use tp=1 on both engines with connector='example', or connector='nixl' (pp=1)",
        )
    return conn


def _example_prefill(
    e: EngineConfig, model: ModelShape, gpu: GPUType, util: float, notes: list[str]
) -> EngineConfig:
    """The prefill engine of an ExampleConnector pair must never split a prompt.

    ExampleConnector stores a request's KV only in the step that first schedules it
    (`build_connector_meta` adds store entries for `scheduled_new_reqs` only, with the blocks
    allocated so far: kv_connector/v1/example_connector.py). A prompt split over steps (a
    chunk smaller than the prompt, or a budget partly used by other prompts) is saved with
    its first chunk's tokens only, and decode's load then fails on a shape mismatch, which
    kills the decode engine. So: chunked prefill off on prefill (a prompt that does not fit
    the step's budget waits a step, v1/core/sched/scheduler.py) and prompts capped at the chunk.
    """
    if not e.enable_chunked_prefill:
        return e
    probe = _plan_engine("prefill", "prefill", e, model, gpu, util, 0, [])
    chunk, model_len = probe.max_num_batched_tokens, probe.max_model_len
    if e.max_model_len is not None and e.max_model_len > chunk:
        raise ConfigError(
            f"prefill: chunk (max_num_batched_tokens) {chunk} < max_model_len "
            f"{e.max_model_len} with connector='example': ExampleConnector saves a prompt's KV "
            "in its first step only, so a prompt longer than the chunk would reach decode with "
            "part of its KV and decode would fail loading it",
            f"use connector='nixl' (chunked prefill works there), or max_model_len <= {chunk}, "
            f"or a chunk >= {e.max_model_len}",
        )
    capped = min(model_len, chunk)
    notes.append(
        f"prefill: chunked prefill off and max_model_len {capped} (= the chunk at most): "
        "ExampleConnector saves a prompt's KV in its first step only; use connector='nixl' "
        "to see chunked prefill in a PD pair"
    )
    return replace(e, enable_chunked_prefill=False, max_num_batched_tokens=chunk,
                   max_model_len=capped)


def _pick_utilization(
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


def _plan_engine(
    name: str,
    role: Role,
    e: EngineConfig,
    model: ModelShape,
    gpu: GPUType,
    util: float,
    first_gpu: int,
    notes: list[str],
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
        more = (
            f"use tp={fits[0]} ({fits[0] * e.pp} GPUs per engine)"
            if fits
            else "use a larger pp or a smaller model"
        )
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
        name,
        role,
        resolved,
        ranks,
        util,
        chunk,
        model_len,
        kvd,
        max(layers) * tok_bytes,
        max(pages),
        weights,
        act,
        overhead,
        min(avail),
        num_blocks,
        num_tokens,
        source=e,
    )


def validate(cfg: PDConfig, hardware: Hardware | None = None) -> Plan:
    """Check `cfg` against `hardware` (detected when None) and return the Plan.

    Raises ConfigError naming the problem and the fix. Pure arithmetic: no process starts.
    """
    if hardware is None:
        from labkit.hardware import detect

        hardware = detect()
    if cfg.colocated:
        named = [("colocated", "both", cfg.prefill)]
    else:
        named = [("prefill", "prefill", cfg.prefill), ("decode", "decode", cfg.decode)]
    models = [_check_engine(n, e) for n, _, e in named]
    engines = [e for _, _, e in named]
    if len(models) == 2:
        p, d = engines
        if replace(models[0], name="") != replace(models[1], name=""):
            raise ConfigError(
                f"prefill runs {p.model!r} but decode runs {d.model!r}: KV moves "
                "between engines only for the same model",
                "use the same model on both",
            )
        if normalize_kv_dtype(p.kv_cache_dtype) != normalize_kv_dtype(d.kv_cache_dtype):
            raise ConfigError(
                f"kv_cache_dtype differs (prefill {p.kv_cache_dtype!r}, decode "
                f"{d.kv_cache_dtype!r}): connectors move raw KV bytes and NIXL "
                "checks it in its handshake",
                "use the same kv_cache_dtype on both",
            )
        if p.block_size != d.block_size:
            raise ConfigError(
                f"block_size differs (prefill {p.block_size}, decode {d.block_size}): "
                "the transferred blocks would not line up",
                "use the same block_size on both engines",
            )
    gpu, num_gpus, simulated, notes = _machine(cfg, hardware)
    kind: Literal["vllm", "sim"] = "sim" if simulated or not vllm_available() else "vllm"
    if not simulated and kind == "sim":
        notes.append("vLLM is not installed: simulated engines on this machine's GPU shapes")
    for n, _, e in named:
        if normalize_kv_dtype(e.kv_cache_dtype).startswith("fp8") and not gpu.supports_fp8_kv:
            raise ConfigError(
                f"{n}: fp8 KV cache needs compute capability >= 8.9, the {gpu.name} "
                f"has {gpu.compute_capability[0]}.{gpu.compute_capability[1]}",
                "use kv_cache_dtype='auto' here, or an L4/H100/H200",
            )
    worlds = [e.world_size for e in engines]
    shared = len(engines) == 2 and worlds == [1, 1] and num_gpus == 1
    if not shared and sum(worlds) > num_gpus:
        split = " + ".join(f"{n} {e.tp}x{e.pp}" for n, _, e in named)
        raise ConfigError(
            f"{split} (tp x pp) needs {sum(worlds)} GPUs, there are {num_gpus}",
            "lower tp/pp (both engines at tp=pp=1 share one GPU), or plan a "
            f"simulated cluster with num_gpus={sum(worlds)}",
        )
    connector = None if cfg.colocated else _pick_connector(cfg, kind, shared, engines)
    utils = _pick_utilization([n for n, _, _ in named], engines, shared, notes)
    plans, first = [], 0
    for (n, role, e), model, u in zip(named, models, utils, strict=True):
        if connector == "example" and role == "prefill":
            e = _example_prefill(e, model, gpu, u, notes)
        plans.append(_plan_engine(n, role, e, model, gpu, u, 0 if shared else first, notes))
        first += e.world_size
    gpus = _gpu_lines(plans, models[0], gpu, num_gpus)
    if shared:
        notes.append(
            "two engines on one GPU: start them one after the other, or each counts "
            "the other's start-up allocations as its own and gets less KV"
        )
    if connector == "example" or shared:
        link = "same-gpu"
    elif connector == "nixl":
        link = "nvlink" if gpu.nvlink_bw else "pcie"
    else:
        link = "same-gpu"
    notes.append(
        "activation, non-torch and CUDA-context memory are estimates; weights and KV "
        "follow vLLM's arithmetic exactly"
    )
    return Plan(kind, gpu, num_gpus, connector, link, models[0], plans, gpus, notes)


def _gpu_lines(
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


# The plan -> `vllm serve` arguments live in labkit/vllm_args.py; imported here so
# `labkit.config.vllm_args` and friends keep working.
from labkit.vllm_args import (  # noqa: E402
    OBSERVER_CLASS,
    OBSERVER_MODULE,
    env_for,
    kv_role,
    kv_transfer_config,
    observer_children,
    serve_command,
    shared_storage_path,
    vllm_args,
)

__all__ = [
    "ConfigError", "EngineConfig", "PDConfig", "Plan", "EnginePlan", "GPUPlan", "MemoryLine",
    "RankPlacement", "validate", "valid_tp_sizes", "default_max_num_batched_tokens",
    "activation_bytes", "OBSERVER_CLASS", "OBSERVER_MODULE", "env_for", "kv_role",
    "kv_transfer_config", "observer_children", "serve_command", "shared_storage_path",
    "vllm_args",
]
