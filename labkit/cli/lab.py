"""The `labkit` subcommands that start things: up, status, down, demo, dashboard.

Registered into `labkit.cli` (its COMMANDS table). Every value reaches a subprocess as an
argument list; every server binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from labkit.cli.plan import EXIT_CONFIG_ERROR, add_config_flags, config_from_args
from labkit.plan import ConfigError


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sim", dest="mode", action="store_const", const="sim",
                      help="simulated engines (no GPU needed)")
    mode.add_argument("--vllm", dest="mode", action="store_const", const="vllm",
                      help="real vLLM engines on this machine's GPUs")
    mode.add_argument("--auto", dest="mode", action="store_const", const="auto",
                      help="real vLLM where GPUs and vLLM are present, else simulated (default)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="simulated seconds per wall second (simulator only; 0 = as fast as possible)")
    p.add_argument("--num-gpu-blocks", type=int,
                   help="KV-cache size in blocks (smaller = a block map you can read)")
    p.add_argument("--run-dir", type=Path, help="where logs and connector storage go")


def make_lab(a: argparse.Namespace):  # -> labkit.lab.Lab
    from labkit.lab import Lab

    cfg = config_from_args(a)
    if getattr(a, "num_gpu_blocks", None):
        for e in (cfg.prefill, cfg.decode):
            e.num_gpu_blocks_override = a.num_gpu_blocks
    return Lab(cfg, mode=a.mode or None, run_dir=a.run_dir, speed=a.speed)


# ---- labkit up / status / down -------------------------------------------------------------
def register_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a prefill/decode pair and the PD proxy")
    add_config_flags(p)
    _add_mode_flags(p)
    p.add_argument("--detach", action="store_true",
                   help="return once ready; `labkit down` stops it")
    p.add_argument("--foreground", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_up, mode=None)


def cmd_up(a: argparse.Namespace) -> int:
    from labkit import service

    try:
        lab = make_lab(a)
    except ConfigError as exc:
        print(f"labkit up: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if a.detach and not a.foreground:
        argv = [x for x in sys.argv[2:] if x != "--detach"] if sys.argv[1:2] == ["up"] else []
        argv = [x for i, x in enumerate(argv)
                if x != "--run-dir" and (i == 0 or argv[i - 1] != "--run-dir")]
        try:
            st = service.up_detached(argv, lab.run_dir)
        except (RuntimeError, TimeoutError) as exc:
            print(f"labkit up: {exc}", file=sys.stderr)
            return 1
        print(service.format_state(st))
        print("`labkit status` shows it; `labkit down` stops it.")
        return 0
    if not a.quiet:
        print(lab.describe(), flush=True)
    return service.run_foreground(lab, quiet=a.quiet)


def register_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="the labs running on this machine, with their health")
    p.set_defaults(func=cmd_status)


def cmd_status(a: argparse.Namespace) -> int:
    from labkit import service

    labs = service.running_labs()
    if not labs:
        print("no lab is running")
        return 0
    for st in labs:
        print(service.format_state(st, with_health=True))
    return 0


def register_down(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("down", help="stop every lab started with `labkit up --detach`")
    p.set_defaults(func=cmd_down)


def cmd_down(a: argparse.Namespace) -> int:
    from labkit import service

    n = service.down()
    print(f"stopped {n} lab(s)" if n else "no lab was running")
    return 0


# ---- labkit demo ----------------------------------------------------------------------------
def register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the lab's main job in a terminal: start a PD pair, send "
                                    "requests, show blocks, KV transfer and latency, stop")
    add_config_flags(p)
    _add_mode_flags(p)
    p.add_argument("--requests", type=int, default=12, help="requests after the first one")
    p.set_defaults(func=cmd_demo, mode=None)


def cmd_demo(a: argparse.Namespace) -> int:
    from labkit.demo import run_demo

    try:
        lab = make_lab(a)
    except ConfigError as exc:
        print(f"labkit demo: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return run_demo(lab, num_requests=a.requests)


# ---- labkit dashboard -----------------------------------------------------------------------
def register_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="serve the live dashboard notebook with Voila "
                                         "(http://127.0.0.1:PORT)")
    p.add_argument("--port", type=int, default=8866)
    p.add_argument("--no-browser", action="store_true")
    p.set_defaults(func=cmd_dashboard)


def dashboard_notebook() -> Path:
    here = Path(__file__).resolve().parents[1] / "notebooks"
    found = sorted(here.glob("*dashboard*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no dashboard notebook under {here}")
    return found[0]


def voila_args(notebook: str | Path, port: int) -> list[str]:
    """The Voila command line that serves `notebook` on 127.0.0.1:`port` (this interpreter's
    Voila, so its kernel sees the same packages); `labkit dashboard` and the e2e test use it."""
    return [sys.executable, "-m", "voila", str(notebook), f"--port={port}",
            "--Voila.ip=127.0.0.1", "--theme=light"]


def cmd_dashboard(a: argparse.Namespace) -> int:
    if importlib.util.find_spec("voila") is None:
        print("labkit dashboard: Voila is not installed (pip install 'labkit[lab]')",
              file=sys.stderr)
        return 1
    args = voila_args(dashboard_notebook(), a.port)
    if a.no_browser:
        args.append("--no-browser")
    proc = subprocess.Popen(args)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        time.sleep(0.5)
        return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_up, register_status, register_down, register_demo, register_dashboard]


# ---- labkit bench ---------------------------------------------------------------------------
def register_bench(sub: argparse._SubParsersAction) -> None:
    from labkit.bench.__main__ import add_arguments

    p = sub.add_parser("bench", help="run a workload against PD vs colocated, chunk sizes, TP or "
                                     "KV dtype and print a table (real or SIMULATED, labelled)")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(a: argparse.Namespace) -> int:
    from labkit.bench.__main__ import run

    return int(run(a) or 0)


COMMANDS.append(register_bench)


# ---- labkit calibrate -----------------------------------------------------------------------
def register_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="on a GPU machine: probe a real vLLM engine and write "
                                         "the simulator's cost constants for this GPU type",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="see `python -m labkit.bench.calibrate --help`")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(a: argparse.Namespace) -> int:
    from labkit.bench.calibrate import main as calibrate_main

    return int(calibrate_main(a.args) or 0)


COMMANDS.append(register_calibrate)
