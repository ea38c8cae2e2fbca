"""`labkit plan`, and the lab's config flags every subcommand that starts a lab shares
(`add_config_flags` / `config_from_args`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from labkit.hardware import GPU_TYPES
from labkit.plan import (
    ConfigError,
    EngineConfig,
    PDConfig,
    Plan,
    env_for,
    serve_command,
    validate,
)
from labkit.vocab import GiB

EXIT_CONFIG_ERROR = 2  # a bad config or bad input: `error: ... / fix: ...` on stderr
DEFAULT_PORTS = (8100, 8200)  # prefill, decode (as in the fixtures)
NIXL_SIDE_CHANNEL_PORTS = (5600, 5610)


# ---- labkit plan ----------------------------------------------------------------------------
def register_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="check a PD configuration and print its placement, memory "
        "and vllm serve commands (starts nothing)",
    )
    add_config_flags(p)
    p.add_argument(
        "--sim", action="store_true", help="plan a simulated cluster even on a GPU machine"
    )
    p.add_argument(
        "--model-dir",
        help="directory or HF name vllm serve gets (default: "
        "~/.cache/labkit/models/<model> for dummy weights, the HF name otherwise)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """The flags that describe a PD configuration (plan, up, demo, bench share them)."""
    p.add_argument("--model", default="lab-1b", help="preset, HF name or config.json path")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size of both engines")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size of both engines")
    for role in ("prefill", "decode"):
        p.add_argument(f"--{role}-tp", type=int, help=f"tensor parallel size of {role} only")
        p.add_argument(f"--{role}-pp", type=int, help=f"pipeline parallel size of {role} only")
        p.add_argument(f"--{role}-util", type=float, help=f"gpu_memory_utilization of {role}")
    p.add_argument("--kv-dtype", default="auto", help="auto | bfloat16 | float16 | fp8 | ...")
    p.add_argument(
        "--gpus", type=int, help="number of GPUs (default: those present, or 2 simulated)"
    )
    p.add_argument(
        "--gpu-type",
        choices=sorted(GPU_TYPES),
        help="plan for this GPU (simulated where it differs from the machine's)",
    )
    p.add_argument("--chunk", type=int, help="max_num_batched_tokens (default: vLLM's)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, help="default 256, or the chunk when smaller")
    p.add_argument("--connector", choices=["auto", "example", "nixl"], default="auto")
    p.add_argument("--colocated", action="store_true", help="one engine for both phases (no PD)")
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--load-format", choices=["dummy", "auto"], default="dummy")


def config_from_args(a: argparse.Namespace) -> PDConfig:
    """The PDConfig the `plan` flags describe."""
    seqs = a.max_num_seqs or (min(256, a.chunk) if a.chunk and a.chunk > 0 else 256)

    def engine(role: str) -> EngineConfig:
        return EngineConfig(
            model=a.model,
            role=role,  # type: ignore[arg-type]
            tp=getattr(a, f"{role}_tp") or a.tp,
            pp=getattr(a, f"{role}_pp") or a.pp,
            kv_cache_dtype=a.kv_dtype,
            block_size=a.block_size,
            max_num_batched_tokens=a.chunk,
            max_num_seqs=seqs,
            gpu_memory_utilization=getattr(a, f"{role}_util"),
            max_model_len=a.max_model_len,
            enable_chunked_prefill=not a.no_chunked_prefill,
            load_format=a.load_format,
        )

    return PDConfig(
        prefill=engine("prefill"),
        decode=engine("decode"),
        connector=a.connector,
        num_gpus=a.gpus,
        gpu_type=a.gpu_type,
        colocated=a.colocated,
    )


def _model_dir(a: argparse.Namespace, plan: Plan) -> str:
    if a.model_dir:
        return a.model_dir
    if a.load_format == "auto" and plan.model.hf_name:
        return plan.model.hf_name
    if Path(a.model).expanduser().exists():
        p = Path(a.model).expanduser()
        return str(p.parent if p.is_file() else p)
    return str(Path("~/.cache/labkit/models").expanduser() / plan.model.name)


def commands_for(plan: Plan, model_dir: str) -> list[dict]:
    """Per engine: its environment and its `vllm serve` argv (fixed example ports)."""
    out = []
    for i, ep in enumerate(plan.engines):
        env = env_for(ep, plan, side_channel_port=NIXL_SIDE_CHANNEL_PORTS[i])
        argv = serve_command(None, plan, i, model_dir, DEFAULT_PORTS[i])
        out.append({"engine": ep.name, "env": env, "argv": argv})
    return out


def _gb(n: float) -> str:
    return f"{n / GiB:8.2f}"


def format_plan(plan: Plan, commands: list[dict]) -> str:
    """The plan as a readable text report."""
    sim = "simulated " if plan.kind == "sim" else ""
    via = (
        f"{plan.connector} connector over {plan.link}"
        if plan.connector
        else "no connector (colocated)"
    )
    lines = [
        f"PD plan ({plan.kind}): {plan.model.name} on {plan.num_gpus} x {sim}{plan.gpu_type.name}, {via}",
        "",
        "Placement",
    ]
    for ep in plan.engines:
        ranks = ", ".join(f"GPU {r.gpu} (pp{r.pp_rank}/tp{r.tp_rank})" for r in ep.ranks)
        lines.append(f"  {ep.name:<10} tp={ep.config.tp} pp={ep.config.pp}  {ranks}")
    lines += ["", "Memory per GPU (GiB)      weights        KV  activation  overhead    budget"]
    for g in plan.gpus:
        lines.append(f"  GPU {g.index}  total {g.total / GiB:.2f}")
        for m in g.lines:
            lines.append(
                f"    {m.engine:<18}{_gb(m.weights)}  {_gb(m.kv)}    {_gb(m.activation)}  "
                f"{_gb(m.overhead)}  {_gb(m.budget)}"
            )
        lines.append(f"    {'free':<18}{_gb(g.free)}")
    lines += ["", "KV capacity"]
    for ep in plan.engines:
        lines.append(
            f"  {ep.name:<10} {ep.num_blocks:,} blocks x {ep.config.block_size} = "
            f"{ep.num_tokens:,} tokens ({ep.kv_bytes_per_token:,} B/token/GPU, "
            f"{ep.kv_cache_dtype}); max_model_len {ep.max_model_len:,} -> "
            f"{ep.max_concurrency:.1f}x; chunk {ep.max_num_batched_tokens:,}"
        )
    lines += ["", "Commands"]
    for c in commands:
        env = " ".join(f"{k}={v}" for k, v in c["env"].items())
        lines.append(f"  # {c['engine']}\n  {env} {shlex.join(c['argv'])}")
    if plan.notes:
        lines += ["", "Notes"] + [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)


def cmd_plan(a: argparse.Namespace) -> int:
    from labkit.hardware import simulated
    from labkit.plan import detect

    try:
        hardware = simulated(0) if a.sim else detect()  # a bad CUDA_VISIBLE_DEVICES raises here
        plan = validate(config_from_args(a), hardware)
    except ConfigError as exc:
        print(f"error: {exc.problem}\n  fix: {exc.fix}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    commands = commands_for(plan, _model_dir(a, plan))
    if a.json:
        print(json.dumps({**plan.to_dict(), "commands": commands}, indent=2))
    else:
        print(format_plan(plan, commands))
    return 0
