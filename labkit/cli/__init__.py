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
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from labkit.cli import lab, replay
from labkit.cli.plan import EXIT_CONFIG_ERROR, error_line, register_plan, report
from labkit.plan import ConfigError

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_plan, *lab.COMMANDS, replay.register_record, replay.register_replay,
]

__all__ = ["COMMANDS", "EXIT_CONFIG_ERROR", "build_parser", "main"]


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one error line (`error: ... / fix: ...`) instead of usage + text."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG_ERROR,
                  error_line(f"{self.prog}: {message}", f"see `{self.prog} --help`") + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="labkit",
        description="PD Lab: prefill/decode "
        "separated vLLM engines (or the simulator), planned and watched",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `labkit` script; returns the exit code.

    Bad input of any subcommand ends here as one `error: ... / fix: ...` line and exit code 2,
    never a traceback; a reader that closes the pipe early (`labkit plan | head`) is fine.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["calibrate"]:  # its own parser takes every flag (REMAINDER cannot)
            from labkit.cli.lab import calibrate

            return calibrate(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except ConfigError as exc:
        return report(exc)
    except BrokenPipeError:
        # stdout's reader went away: point stdout at /dev/null so the exit flush is quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
