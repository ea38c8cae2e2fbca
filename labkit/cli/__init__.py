"""`labkit ...` on the command line.

Each subcommand is one `register_*` function (adds its parser, sets `func`) listed in
COMMANDS, and one `cmd_*` function that takes the parsed args and returns an exit code.
Adding a subcommand = writing those two and appending the first to COMMANDS.

    plan.py    `labkit plan` and the config flags shared by every command that starts a lab
    lab.py     up, status, down, demo, dashboard, bench, calibrate
    replay.py  record, replay
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from labkit.cli import lab, replay
from labkit.cli.plan import EXIT_CONFIG_ERROR, register_plan

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_plan, *lab.COMMANDS, replay.register_record, replay.register_replay,
]

__all__ = ["COMMANDS", "EXIT_CONFIG_ERROR", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labkit",
        description="PD Lab: prefill/decode "
        "separated vLLM engines (or the simulator), planned and watched",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `labkit` script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:  # its own parser takes every flag (argparse REMAINDER cannot)
        from labkit.bench.calibrate import main as calibrate_main

        return int(calibrate_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args))
