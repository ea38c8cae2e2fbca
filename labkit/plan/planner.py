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
from dataclasses import replace
from typing import Literal

from labkit.hardware import GPU_TYPES, GPUType, Hardware, nixl_available, vllm_available
from labkit.models import ModelConfigError, ModelShape, get_model, normalize_kv_dtype
from labkit.plan.errors import ConfigError
from labkit.plan.memory import (
    MAX_TP,
    gpu_lines,
    pick_utilization,
    plan_engine,
    valid_tp_sizes,
)
from labkit.plan.types import (
    EngineConfig,
    PDConfig,
    Plan,
)

_INT, _NUM, _BOOL, _STR = "an integer", "a number", "True or False", "a string"
# The type each field must have (None allowed where the planner picks): checked first, so a
# "0.5" or a 2.5 gets a ConfigError naming the keyword, never a TypeError from the arithmetic.
_ENGINE_TYPES: dict[str, tuple[str, bool]] = {
    "model": (_STR, False), "role": (_STR, False), "tp": (_INT, False), "pp": (_INT, False),
    "kv_cache_dtype": (_STR, False), "block_size": (_INT, False),
    "max_num_batched_tokens": (_INT, True), "max_num_seqs": (_INT, False),
    "gpu_memory_utilization": (_NUM, True), "max_model_len": (_INT, True),
    "enable_prefix_caching": (_BOOL, False), "enable_chunked_prefill": (_BOOL, False),
    "kv_offloading_size_gb": (_NUM, True), "enforce_eager": (_BOOL, False),
    "load_format": (_STR, False), "num_gpu_blocks_override": (_INT, True),
}
_CONFIG_TYPES: dict[str, tuple[str, bool]] = {
    "connector": (_STR, False), "num_gpus": (_INT, True), "gpu_type": (_STR, True),
    "colocated": (_BOOL, False), "num_prefill": (_INT, False), "num_decode": (_INT, False),
}


def _type_ok(v: object, kind: str) -> bool:
    if kind == _BOOL:
        return isinstance(v, bool)
    if kind == _STR:
        return isinstance(v, str)
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (kind == _NUM and isinstance(v, float) and math.isfinite(v))


def _check_type(where: str, fld: str, v: object, kind: str, optional: bool) -> None:
    if (v is None and optional) or _type_ok(v, kind):
        return
    got = "None" if v is None else f"a {type(v).__name__}"
    example = {_INT: "4", _NUM: "0.5", _BOOL: "True", _STR: "'auto'"}[kind]
    raise ConfigError(
        f"{where}{fld}={v!r} is {got}, not {kind}",
        f"pass {kind} (e.g. {fld}={example}, without quotes for numbers)"
        + (", or None to let the planner pick" if optional else ""),
    )


def check_config(cfg: PDConfig) -> None:
    """Type checks of every field of `cfg` and its engines (the first thing `validate` does;
    call it before anything else reads the numbers).

    Raises:
        ConfigError: a field of the wrong type, naming the keyword and the type expected.
    """
    if not isinstance(cfg, PDConfig):
        raise ConfigError(f"config is a {type(cfg).__name__}, not a PDConfig",
                          "build it with labkit.plan.PDConfig(...) or labkit.lab.build_config()")
    for fld, (kind, optional) in _CONFIG_TYPES.items():
        _check_type("", fld, getattr(cfg, fld), kind, optional)
    n = cfg.num_gpus
    if n is not None and not 1 <= n <= 64:
        raise ConfigError(
            f"num_gpus={n!r} is out of range", "use 1..64, or leave num_gpus unset for the GPUs present"
        )
    for role in ("prefill", "decode"):
        e = getattr(cfg, role)
        if not isinstance(e, EngineConfig):
            raise ConfigError(f"{role} is a {type(e).__name__}, not an EngineConfig",
                              f"use {role}=labkit.plan.EngineConfig(...)")
        for fld, (kind, optional) in _ENGINE_TYPES.items():
            _check_type(f"{role}: ", fld, getattr(e, fld), kind, optional)
        if not (isinstance(e.extra_args, list) and all(isinstance(x, str) for x in e.extra_args)):
            raise ConfigError(f"{role}: extra_args={e.extra_args!r} is not a list of strings",
                              "pass extra vllm serve arguments as a list, e.g. ['--seed', '1']")


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
    except ModelConfigError as exc:
        raise bad(exc.problem, exc.fix) from None
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
            f"num_gpus={n!r} is out of range", "use 1..64, or leave num_gpus unset for the GPUs present"
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
    probe = plan_engine("prefill", "prefill", e, model, gpu, util, 0, [])
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


def validate(cfg: PDConfig, hardware: Hardware | None = None) -> Plan:
    """Check `cfg` against `hardware` (detected when None) and return the Plan.

    Raises ConfigError naming the problem and the fix. Pure arithmetic: no process starts.
    """
    check_config(cfg)
    if hardware is None:
        from labkit.plan.devices import detect

        hardware = detect()
    if (cfg.num_prefill, cfg.num_decode) != (1, 1):  # xPyD: plans the pair, then repeats it
        from labkit.plan.xpyd import plan_xpyd

        return plan_xpyd(cfg, hardware)
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
            "lower tp and pp (both engines at tp=1 and pp=1 share one GPU), or plan a "
            f"simulated cluster with num_gpus={sum(worlds)}",
        )
    connector = None if cfg.colocated else _pick_connector(cfg, kind, shared, engines)
    utils = pick_utilization([n for n, _, _ in named], engines, shared, notes)
    plans, first = [], 0
    for (n, role, e), model, u in zip(named, models, utils, strict=True):
        if connector == "example" and role == "prefill":
            e = _example_prefill(e, model, gpu, u, notes)
        plans.append(plan_engine(n, role, e, model, gpu, u, 0 if shared else first, notes,
                                 num_gpus=num_gpus, num_engines=len(named)))
        first += e.world_size
    for ep in plans:  # the arithmetic above refuses what cannot fit; this never passes silently
        if ep.num_blocks < 1 or ep.kv_bytes_per_token <= 0:
            raise ConfigError(
                f"{ep.name}: the plan gives {ep.num_blocks} KV blocks "
                f"({ep.kv_bytes_per_token} bytes per token)",
                "check the model's shape (hidden_size, heads, layers) and the memory settings",
            )
    gpus = gpu_lines(plans, models[0], gpu, num_gpus)
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
    return Plan(kind=kind, gpu_type=gpu, num_gpus=num_gpus, connector=connector, link=link,
                model=models[0], engines=plans, gpus=gpus, notes=notes)
