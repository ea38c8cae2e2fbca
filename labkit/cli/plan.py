"""`labkit plan`, and the lab's config flags every subcommand that starts a lab shares
(`add_config_flags` / `config_from_args`)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from labkit.hardware import GPU_TYPES
from labkit.plan import (
    ConfigError,
    PDConfig,
    Plan,
    env_for,
    serve_command,
    validate,
)
from labkit.vocab import GiB

EXIT_CONFIG_ERROR = 2  # a bad config or bad input: `error: ... / fix: ...` on stderr
DEFAULT_PORTS = (8100, 8200)  # prefill, decode (as in the fixtures)
NIXL_SIDE_CHANNEL_PORTS = (5600, 5610)  # engine i: 5600 + 10 i


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


def _alias(p: argparse.ArgumentParser, *names: str, dest: str, **kw) -> None:
    """An old spelling of a flag: still accepted, not shown in --help."""
    p.add_argument(*names, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def parse_bytes(text: str) -> int:
    """A byte count as vLLM's --kv-cache-memory takes it, with an optional K/M/G/KiB/MiB/GiB."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "kib": 1 << 10, "mib": 1 << 20,
             "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 8M, 64MiB, 2G, 1048576)")
    return int(float(m.group(1)) * units[m.group(2).lower()])


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """The flags that describe a PD configuration (plan, up, demo, record share them).

    They carry vLLM's own names (`vllm serve --help`) where vLLM has one; `labkit.Lab` takes
    the same names as keywords (`--kv-cache-dtype fp8` = `Lab(kv_cache_dtype="fp8")`). Older
    spellings (`--kv-dtype`, `--gpus`, `--prefill-util`, `--no-chunked-prefill`) still work.
    """
    p.add_argument("--model", default="lab-1b", help="preset, HF name or config.json path")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                   help="tensor parallel size of both engines")
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=1,
                   help="pipeline parallel size of both engines")
    for role in ("prefill", "decode"):
        p.add_argument(f"--{role}-tp", type=int, help=f"tensor parallel size of {role} only")
        p.add_argument(f"--{role}-pp", type=int, help=f"pipeline parallel size of {role} only")
        p.add_argument(f"--{role}-gpu-memory-utilization", dest=f"{role}_util", type=float,
                       help=f"gpu_memory_utilization of {role} only")
        _alias(p, f"--{role}-util", dest=f"{role}_util", type=float)
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="fraction of each GPU's whole memory an engine may use (default: picked)")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="auto (the model's dtype) | bfloat16 | float16 | fp8 | fp8_e4m3 | fp8_e5m2")
    _alias(p, "--kv-dtype", dest="kv_cache_dtype")
    p.add_argument("--num-gpus", type=int,
                   help="number of GPUs (default: those present, or 2 simulated)")
    _alias(p, "--gpus", dest="num_gpus", type=int)
    p.add_argument("--gpu-type", choices=sorted(GPU_TYPES),
                   help="plan for this GPU (simulated where it differs from the machine's)")
    p.add_argument("--max-num-batched-tokens", "--chunk", dest="chunk", type=int,
                   help="the step's token budget = the prefill chunk size (default: vLLM's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (16, 32, ...)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, help="default 256, or the chunk when smaller")
    p.add_argument("--num-gpu-blocks", "--num-gpu-blocks-override", dest="num_gpu_blocks",
                   type=int, help="KV blocks per engine, whatever the dtype (a small pool is a "
                                  "block map you can read)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, metavar="BYTES",
                   help="KV cache per GPU in bytes (8M, 64MiB, 2G): the block count follows "
                        "the KV dtype and block size, as in vLLM")
    p.add_argument("--connector", choices=["auto", "example", "nixl"], default="auto")
    p.add_argument("--colocated", action="store_true", help="one engine for both phases (no PD)")
    p.add_argument("--num-prefill", "--prefill", dest="num_prefill", type=int, default=1,
                   metavar="N", help="xPyD: prefill engines, each on GPUs of its own (default 1)")
    p.add_argument("--num-decode", "--decode", dest="num_decode", type=int, default=1,
                   metavar="M", help="xPyD: decode engines, each on GPUs of its own (default 1)")
    p.add_argument("--no-enable-chunked-prefill", dest="no_chunked_prefill",
                   action="store_true", help="a prompt must fit one step")
    _alias(p, "--no-chunked-prefill", dest="no_chunked_prefill", action="store_true")
    p.add_argument("--load-format", choices=["dummy", "auto"], default="dummy")
    p.add_argument("--kv-offloading-size", type=float, metavar="GiB",
                   help="host memory for a CPU tier of KV per engine (vLLM's KV offload)")


def config_from_args(a: argparse.Namespace) -> PDConfig:
    """The PDConfig the config flags describe (`Lab`'s own `build_config`, so the CLI and
    the Python API cannot drift apart)."""
    from labkit.lab import build_config

    seqs = a.max_num_seqs or (min(256, a.chunk) if a.chunk and a.chunk > 0 else 256)
    cfg = build_config(
        a.model, max_num_batched_tokens=a.chunk, tp=a.tp, pp=a.pp,
        prefill_tp=a.prefill_tp, decode_tp=a.decode_tp,
        prefill_pp=a.prefill_pp, decode_pp=a.decode_pp,
        kv_cache_dtype=a.kv_cache_dtype, block_size=a.block_size, max_num_seqs=seqs,
        max_model_len=a.max_model_len, gpu_memory_utilization=a.gpu_memory_utilization,
        num_gpu_blocks=a.num_gpu_blocks, kv_cache_memory=a.kv_cache_memory,
        connector=a.connector, num_gpus=a.num_gpus, gpu_type=a.gpu_type,
        colocated=a.colocated, enable_chunked_prefill=not a.no_chunked_prefill,
        load_format=a.load_format, kv_offloading_size=a.kv_offloading_size,
        num_prefill=a.num_prefill, num_decode=a.num_decode)
    for role in ("prefill", "decode"):
        util = getattr(a, f"{role}_util", None)
        if util is not None:
            getattr(cfg, role).gpu_memory_utilization = util
    return cfg


# ---- errors in the CLI's words ---------------------------------------------------------------
# The planner and Lab speak Python keywords (ConfigError is shared with the Python API); the
# CLI says the same thing with its flags.
FLAGS = {
    "tp": "--tp", "pp": "--pp", "num_gpus": "--num-gpus", "gpu_type": "--gpu-type",
    "kv_cache_dtype": "--kv-cache-dtype", "max_num_batched_tokens": "--max-num-batched-tokens",
    "max_num_seqs": "--max-num-seqs", "max_model_len": "--max-model-len",
    "block_size": "--block-size", "gpu_memory_utilization": "--gpu-memory-utilization",
    "num_gpu_blocks_override": "--num-gpu-blocks", "num_gpu_blocks": "--num-gpu-blocks",
    "kv_cache_memory": "--kv-cache-memory", "connector": "--connector",
    "load_format": "--load-format", "colocated": "--colocated",
    "kv_offloading_size_gb": "--kv-offloading-size", "kv_offloading_size": "--kv-offloading-size",
    "enable_chunked_prefill": "--enable-chunked-prefill", "speed": "--speed", "port": "--port",
    "prefill_tp": "--prefill-tp", "decode_tp": "--decode-tp", "prefill_pp": "--prefill-pp",
    "decode_pp": "--decode-pp", "read_timeout": "--read-timeout",
    "num_prefill": "--num-prefill", "num_decode": "--num-decode",
    "routing_policy": "--routing-policy",
}
_NAMES = "|".join(sorted(FLAGS, key=len, reverse=True))
_ASSIGN = re.compile(r"(?<![\w.-])(mode|" + _NAMES + r")=('[^']*'|\"[^\"]*\"|[\w.]+)")
_BARE = re.compile(r"(?<![\w.'\"-])(tp|pp|"
                   + "|".join(sorted((k for k in FLAGS if "_" in k), key=len, reverse=True))
                   + r")(?![\w'\"])")


def cli_words(text: str) -> str:
    """`num_gpus=4` -> `--num-gpus 4`, `mode='auto'` -> `--auto`, `kv_cache_dtype` ->
    `--kv-cache-dtype`: a Python-keyword message said with the CLI's flags."""

    def assign(m: re.Match) -> str:
        name, value = m.group(1), m.group(2).strip("'\"")
        if name == "mode":
            return f"--{value}"
        if value == "True":
            return FLAGS[name]
        if value == "None":
            return f"no {FLAGS[name]}"
        return f"{FLAGS[name]} {value}"

    text = _ASSIGN.sub(assign, text)
    return _BARE.sub(lambda m: FLAGS[m.group(1)], text)


def error_line(problem: str, fix: str) -> str:
    """The one line every CLI failure prints: `error: ... / fix: ...`."""
    one = " ".join(f"error: {cli_words(problem)} / fix: {cli_words(fix)}".split())
    return one


def report(exc: ConfigError | None = None, *, problem: str = "", fix: str = "") -> int:
    """Print `exc` (or problem/fix) as the CLI's one error line; return exit code 2."""
    if exc is not None:
        problem, fix = exc.problem, exc.fix
    print(error_line(problem, fix), file=sys.stderr)
    return EXIT_CONFIG_ERROR


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
    """Per engine: its environment and its `vllm serve` argv (fixed example ports; xPyD: the
    j-th engine of a role gets its role's HTTP port + j, engine i the side channel 5600 + 10 i,
    room for a TP block)."""
    out = []
    seen = {"prefill": 0, "decode": 0}
    for i, ep in enumerate(plan.engines):
        j = seen.get(ep.role, 0)
        seen[ep.role] = j + 1
        http = DEFAULT_PORTS[1 if ep.role == "decode" else 0] + j
        env = env_for(ep, plan, side_channel_port=NIXL_SIDE_CHANNEL_PORTS[0] + 10 * i)
        argv = serve_command(None, plan, i, model_dir, http)
        out.append({"engine": ep.name, "env": env, "argv": argv})
    return out


def _gb(n: float) -> str:
    return f"{n / GiB:8.2f}"


def changes(plan: Plan, asked: PDConfig | None = None) -> list[str]:
    """What the planner set differently from what was asked, and why (said first)."""
    out = []
    asked = asked or PDConfig()
    asked_connector = asked.connector
    engines = [e.config for e in plan.engines]
    if asked_connector == "auto" and plan.connector is not None:
        if any(e.pp > 1 for e in engines):
            why = "pp > 1: NixlConnector cannot carry pipeline-parallel KV in vLLM 0.26"
        elif plan.connector == "example" and plan.num_gpus == 1:
            why = "both engines share one GPU"
        elif plan.connector == "example":
            why = "the nixl package is not installed"
        else:
            why = "vLLM's main PD path"
        if plan.connector != "nixl" or why != "vLLM's main PD path":
            out.append(f"connector: {plan.connector} ({why})")
    for ep in plan.engines:
        src = asked.prefill if ep.role in ("prefill", "both") else asked.decode
        if src.enable_chunked_prefill and not ep.config.enable_chunked_prefill:
            out.append(f"{ep.name}: chunked prefill off, prompts capped at max_model_len "
                       f"{ep.max_model_len:,} (= the chunk): ExampleConnector saves a prompt's "
                       "KV in its first step only")
        elif src.max_model_len is not None and ep.max_model_len != src.max_model_len:
            out.append(f"{ep.name}: max_model_len {ep.max_model_len:,} "
                       f"(asked {src.max_model_len:,})")
    return out


def format_plan(plan: Plan, commands: list[dict], asked: PDConfig | None = None) -> str:
    """The plan as a readable text report; what the planner changed comes first."""
    sim = "simulated " if plan.kind == "sim" else ""
    via = (
        f"{plan.connector} connector over {plan.link}"
        if plan.connector
        else "no connector (colocated)"
    )
    lines = [
        f"PD plan ({plan.kind}): {plan.model.name} on {plan.num_gpus} x {sim}{plan.gpu_type.name}, {via}",
    ]
    changed = changes(plan, asked)
    if changed:
        lines += ["", "Changed from what was asked"] + [f"  ! {c}" for c in changed]
    lines += ["", "Placement"]
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
    notes = [n for n in plan.notes if "chunked prefill off" not in n]  # said at the top
    if notes:
        lines += ["", "Notes"] + [f"  - {n}" for n in notes]
    return "\n".join(lines)


def cmd_plan(a: argparse.Namespace) -> int:
    from labkit.hardware import simulated
    from labkit.plan import detect

    try:
        hardware = simulated(0) if a.sim else detect()  # a bad CUDA_VISIBLE_DEVICES raises here
        cfg = config_from_args(a)
        plan = validate(cfg, hardware)
    except ConfigError as exc:
        return report(exc)
    commands = commands_for(plan, _model_dir(a, plan))
    if a.json:
        print(json.dumps({**plan.to_dict(), "commands": commands}, indent=2))
    else:
        print(format_plan(plan, commands, cfg))
    return 0
