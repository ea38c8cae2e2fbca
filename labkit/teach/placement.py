"""Where weights and KV go: planner tables for TP/PP choices and the 4-GPU claim check.

Everything here is labkit.plan.validate() on a simulated machine of the GPU type you
name: vLLM's own placement and memory arithmetic (weights exact, KV exact, activations
and CUDA context estimated); no process starts, so it runs the same on a laptop.
"""

from __future__ import annotations

from typing import Any

from labkit.teach.result import Result
from labkit.vocab import GiB  # noqa: F401


def simulated_plan(
    model: str = "lab-1b",
    *,
    tp: int = 1,
    pp: int = 1,
    num_gpus: int = 2,
    gpu_type: str = "h100",
    colocated: bool = False,
    **knobs: Any,
) -> Any:
    """The Plan of a prefill + decode pair (or, `colocated`, of ONE engine) on a simulated
    machine of `num_gpus` x `gpu_type`. `knobs` go to labkit.lab.build_config
    (kv_cache_dtype, gpu_memory_utilization, kv_offloading_size_gb, chunk, connector, ...)."""
    from labkit import hardware
    from labkit.lab import build_config
    from labkit.plan import validate

    cfg = build_config(model, tp=tp, pp=pp, num_gpus=num_gpus, gpu_type=gpu_type,
                       colocated=colocated, **knobs)
    return validate(cfg, hardware.simulated(num_gpus, gpu_type))


def colocated_plan(model: str = "lab-1b", **kw: Any) -> Any:
    """The Plan of ONE engine (no PD) on a simulated machine (see `simulated_plan`)."""
    return simulated_plan(model, colocated=True, **kw)


def pd_plan(model: str = "lab-1b", **kw: Any) -> Any:
    """The Plan of a prefill + decode pair on a simulated machine (see `simulated_plan`)."""
    return simulated_plan(model, colocated=False, **kw)


def placement_table(
    model: str = "llama-3.1-8b",
    layouts: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (2, 2)),
    num_gpus: int = 8,
    gpu_type: str = "h100",
    kv_cache_dtype: str = "auto",
) -> Result:
    """One row per (tp, pp): the GPUs used, weights and KV per GPU, KV capacity in tokens,
    or the planner's error (what vLLM would refuse, and why)."""
    from labkit.plan import ConfigError

    rows = []
    for tp, pp in layouts:
        row: dict[str, Any] = {"tp": tp, "pp": pp}
        try:
            plan = colocated_plan(
                model,
                tp=tp,
                pp=pp,
                num_gpus=num_gpus,
                gpu_type=gpu_type,
                kv_cache_dtype=kv_cache_dtype,
            )
        except ConfigError as e:
            rows.append({**row, "gpus": "-", "error": e.problem})
            continue
        ep = plan.engines[0]
        row.update(
            {
                "gpus": str(ep.gpus),
                "weights_GiB_per_gpu": max(ep.weight_bytes) / GiB,
                "kv_GiB_per_gpu": ep.num_blocks * ep.page_bytes / GiB,
                "kv_bytes_per_token_per_gpu": ep.kv_bytes_per_token,
                "kv_tokens": ep.num_tokens,
                "error": "",
            }
        )
        rows.append(row)
    return Result(
        f"placing {model} on {num_gpus} x {gpu_type.upper()} (one engine)",
        "planned",
        rows,
        note="kv_tokens: vLLM's 'GPU KV cache size' (num_gpu_blocks x block_size);"
        " gpu_memory_utilization 0.9",
    )


def gpu_memory(plan: Any) -> Result:
    """One row per (GPU, engine on it): weights, KV, activations, overhead, free (GiB)."""
    rows = []
    for g in plan.gpus:
        lines = g.lines or [None]
        for line in lines:
            rows.append(
                {
                    "gpu": g.index,
                    "engine": line.engine if line else "(none)",
                    "weights_GiB": line.weights / GiB if line else 0.0,
                    "kv_GiB": line.kv / GiB if line else 0.0,
                    "activation_GiB": line.activation / GiB if line else 0.0,
                    "overhead_GiB": line.overhead / GiB if line else 0.0,
                    "gpu_free_GiB": g.free / GiB,
                }
            )
    return Result(
        f"memory per GPU: {plan.model.name}, {plan.num_gpus} x {plan.gpu_type.name}",
        "planned",
        rows,
        note="; ".join(plan.notes[-1:]),
        extra={"plan": plan},
    )


def memory_figure(plan: Any, title: str = "") -> Any:
    """Stacked bars per GPU: weights / KV / activations / overhead / free (GiB)."""
    import plotly.graph_objects as go

    parts = {"weights": [], "KV cache": [], "activations": [], "overhead": [], "free": []}
    for g in plan.gpus:
        parts["weights"].append(sum(x.weights for x in g.lines) / GiB)
        parts["KV cache"].append(sum(x.kv for x in g.lines) / GiB)
        parts["activations"].append(sum(x.activation for x in g.lines) / GiB)
        parts["overhead"].append(sum(x.overhead for x in g.lines) / GiB)
        parts["free"].append(g.free / GiB)
    x = [f"GPU {g.index}" for g in plan.gpus]
    colors = {
        "weights": "#1864ab",
        "KV cache": "#e67700",
        "activations": "#862e9c",
        "overhead": "#868e96",
        "free": "#dee2e6",
    }
    fig = go.Figure([go.Bar(x=x, y=v, name=k, marker_color=colors[k]) for k, v in parts.items()])
    fig.update_layout(
        barmode="stack",
        yaxis_title="GiB",
        height=360,
        title=f"PLANNED: {title or plan.model.name} on {plan.num_gpus} x {plan.gpu_type.name}",
    )
    return fig


CLAIM = "TP=2 on GPUs 0-1, KV cache on GPUs 2-3"


def claim_check(model: str = "llama-3.1-8b", gpu_type: str = "h100") -> Result:
    """The claim "TP=2 on GPUs 0-1, KV cache on GPUs 2-3" (weights on two GPUs, the KV
    cache on the other two) put to vLLM's own placement: one engine,
    --tensor-parallel-size 2, 4 visible GPUs."""
    plan = colocated_plan(model, tp=2, num_gpus=4, gpu_type=gpu_type)
    rows = []
    for g in plan.gpus:
        w = sum(x.weights for x in g.lines)
        kv = sum(x.kv for x in g.lines)
        holds = " + ".join(n for n, b in (("weights", w), ("KV cache", kv)) if b) or "nothing"
        rows.append({"gpu": g.index, "weights_GiB": w / GiB, "kv_GiB": kv / GiB, "holds": holds})
    kv_gpus = [r["gpu"] for r in rows if r["kv_GiB"] > 0]
    w_gpus = [r["gpu"] for r in rows if r["weights_GiB"] > 0]
    verdict = f"KV cache on GPUs {kv_gpus}, weights on GPUs {w_gpus}: " + (
        "the KV lives beside the weights on the same GPUs; the other GPUs hold nothing"
        if kv_gpus == w_gpus
        else "KV and weights are on different GPUs"
    )
    return Result(
        f"the claim '{CLAIM}' planned: {model}, TP=2, 4 visible GPUs",
        "planned",
        rows,
        note=verdict,
        extra={"plan": plan, "kv_gpus": kv_gpus, "weight_gpus": w_gpus},
    )


def engine_command(plan: Any, engine: int | str = 0) -> str:
    """The `vllm serve` line (and CUDA_VISIBLE_DEVICES) the lab would run for one engine."""
    import shlex

    from labkit.plan import env_for, serve_command

    env = env_for(engine, plan)
    cmd = serve_command(None, plan, engine, "<model dir>", 8000)
    return f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} " + shlex.join(cmd)


def separation_options(
    model: str = "llama-3.1-8b", gpu_type: str = "h100", offload_gib: float = 64.0
) -> Result:
    """What vLLM really offers to move KV away from the weights, side by side, each planned
    on 4 GPUs: the claimed layout, PD disaggregation, a CPU KV tier, fp8 KV, a smaller
    memory fraction."""
    options = [
        (
            "one engine, TP=2 (the claimed layout)",
            "--tensor-parallel-size 2",
            colocated_plan(model, tp=2, num_gpus=4, gpu_type=gpu_type),
            0.0,
        ),
        (
            "PD disaggregation: prefill TP=2, decode TP=2",
            "--kv-transfer-config NixlConnector",
            pd_plan(model, tp=2, num_gpus=4, gpu_type=gpu_type, connector="nixl"),
            0.0,
        ),
        (
            f"CPU KV tier of {offload_gib:g} GiB",
            f"--kv-offloading-size {offload_gib:g}",
            colocated_plan(
                model, tp=2, num_gpus=4, gpu_type=gpu_type, kv_offloading_size_gb=offload_gib
            ),
            offload_gib,
        ),
        (
            "fp8 KV cache",
            "--kv-cache-dtype fp8",
            colocated_plan(model, tp=2, num_gpus=4, gpu_type=gpu_type, kv_cache_dtype="fp8"),
            0.0,
        ),
        (
            "memory fraction 0.5",
            "--gpu-memory-utilization 0.5",
            colocated_plan(model, tp=2, num_gpus=4, gpu_type=gpu_type, gpu_memory_utilization=0.5),
            0.0,
        ),
    ]
    rows = []
    for name, flag, plan, cpu_gib in options:
        kv = {g.index for g in plan.gpus if any(x.kv for x in g.lines)}
        w = {g.index for g in plan.gpus if any(x.weights for x in g.lines)}
        ep = plan.engines[-1]  # the engine that decodes (decode, or the one colocated)
        # --kv-offloading-size is the total over all TP ranks (vllm/config/cache.py)
        per_token_all_ranks = ep.kv_bytes_per_token * ep.config.tp
        rows.append(
            {
                "option": name,
                "vllm_flag": flag,
                "weights_on_gpus": str(sorted(w)),
                "kv_on_gpus": str(sorted(kv)),
                "decode_kv_tokens_gpu": ep.num_tokens,
                "kv_tokens_cpu_tier": int(cpu_gib * GiB // per_token_all_ranks),
                "kv_GiB_per_gpu": ep.num_blocks * ep.page_bytes / GiB,
            }
        )
    return Result(
        f"ways to separate KV from weights: {model} on 4 x {gpu_type.upper()}",
        "planned",
        rows,
        note="decode_kv_tokens_gpu: the decoding engine's GPU KV "
        "capacity; kv_tokens_cpu_tier: what the host buffer holds on top",
        extra={"plans": {name: plan for name, _, plan, _ in options}},
    )


def preset_table(names: tuple[str, ...] | None = None) -> Result:
    """The model presets: size, weights and KV cost per token (vLLM's arithmetic)."""
    from labkit.models import PRESETS

    rows = []
    for name in names or tuple(PRESETS):
        m = PRESETS[name]
        rows.append(
            {
                "model": name,
                "params_B": m.num_params() / 1e9,
                "weights_GiB": sum(m.weight_bytes()) / GiB,
                "layers": m.num_layers,
                "kv_heads": m.num_kv_heads,
                "head_dim": m.head_dim,
                "kv_bytes_per_token": m.kv_bytes_per_token(),
                "synthetic": m.synthetic,
            }
        )
    return Result(
        "model presets",
        "planned",
        rows,
        note="synthetic: labkit writes the model directory and vLLM runs it with "
        "random weights (--load-format dummy): no download",
    )


def kv_per_request(
    models: tuple[str, ...] = ("lab-tiny", "lab-1b", "llama-3.1-8b", "llama-3.1-70b"),
    context_len: int = 8192,
    dtypes: tuple[str, ...] = ("auto", "fp8"),
) -> Result:
    """KV bytes per token and per request of `context_len` tokens, per KV dtype."""
    from labkit.models import get_model

    rows = []
    for name in models:
        m = get_model(name)
        for dt in dtypes:
            per_token = m.kv_bytes_per_token(dt)
            rows.append(
                {
                    "model": name,
                    "kv_cache_dtype": dt,
                    "kv_bytes_per_token": per_token,
                    f"GiB_per_{context_len}_tokens": per_token * context_len / GiB,
                    "weights_GiB": sum(m.weight_bytes()) / GiB,
                }
            )
    return Result(
        f"KV cache cost per token and per {context_len}-token request",
        "planned",
        rows,
        note="2 (K,V) x layers x KV heads x head_dim x bytes per element",
    )
