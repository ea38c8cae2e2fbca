"""`labkit replay` (summarize or play a recording) and `labkit record` (record a lab's run)."""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from labkit.cli.plan import add_config_flags, config_from_args
from labkit.plan import ConfigError


def register_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay", help="summarize a recording: a .lkrec file or a shipped name such as "
        "real-h200x2-nixl (labkit.viz.Dashboard(labkit.replay(name)).start() plays it in a notebook)"
    )
    p.add_argument("path", help="a .lkrec file from `labkit record`, or a shipped recording's "
                                "name (`labkit replay --list`)", nargs="?")
    p.add_argument("--list", action="store_true", help="list the shipped recordings")
    p.add_argument("--speed", type=float, default=1.0, help="with --play: replay speed")
    p.add_argument(
        "--play", action="store_true", help="play it through, printing one progress line per second"
    )
    p.add_argument("--json", action="store_true", help="print the header as JSON")
    p.set_defaults(func=replay_main)


def open_replay(path: str, speed: float = 1.0):  # -> labkit.telemetry.replay.Replay
    """The Replay of `path` (a file or a shipped name), or a ConfigError saying what is wrong."""
    from labkit.telemetry.replay import recordings, replay

    if not speed > 0:
        raise ConfigError(f"--speed {speed} is not a replay speed", "use a speed > 0, e.g. 1 or 4")
    try:
        return replay(path, speed=speed)
    except FileNotFoundError:
        raise ConfigError(f"no recording {path!r} (no such file, and no shipped recording "
                          "of that name)",
                          f"give a .lkrec path or one of: {', '.join(recordings())}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory", "give a .lkrec file") from None
    except (ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"{path} cannot be read as a recording ({exc})",
                          "give a .lkrec file written by `labkit record` or labkit.Recorder"
                          ) from None


def replay_main(args: argparse.Namespace) -> int:
    """`labkit replay PATH|NAME [--speed S] [--play] [--json]`, `labkit replay --list`."""
    import json

    from labkit.telemetry.replay import recordings

    if args.list or not args.path:
        if not args.list:
            raise ConfigError("labkit replay needs a recording",
                              f"give a .lkrec path or one of: {', '.join(recordings())}")
        print("\n".join(recordings()))
        return 0
    rp = open_replay(args.path, args.speed)
    if args.json:
        print(json.dumps(rp.header, indent=2, default=str))
        return 0
    print(rp.summary())
    if args.play:
        n = 0
        while not rp.done:
            d = rp.poll()
            n += sum(len(b.events) for b in d.observer)
            print(f"  {rp.position:7.1f}/{rp.duration:.1f} s  {n} observer events", flush=True)
            time.sleep(1.0)
    return 0


def register_record(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "record",
        help="start a lab, drive the demo workload through it and "
        "record what the views see to a file",
    )
    p.add_argument("--out", required=True, help="the .lkrec file to write")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to record")
    p.add_argument(
        "--mode",
        choices=["auto", "sim", "vllm"],
        default="auto",
        help="real vLLM where possible (auto), or force one",
    )
    add_config_flags(p)
    p.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip")
    p.set_defaults(func=record_main)


def record_main(args: argparse.Namespace) -> int:
    """`labkit record --duration S --out PATH [lab options]`: prints the recording's summary.
    Everything that can be checked is checked before the lab starts."""
    from labkit.bench.record_session import record_demo_session
    from labkit.telemetry.recording import read_recording
    from labkit.telemetry.replay import summarize

    if args.compression == "zstd" and importlib.util.find_spec("zstandard") is None:
        raise ConfigError("--compression zstd needs the zstandard package, which is not "
                          "installed", "pip install zstandard, or use --compression gzip")
    if not args.duration > 0:
        raise ConfigError(f"--duration {args.duration} is not a length of time",
                          "use a number of seconds > 0, e.g. --duration 30")
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise ConfigError(f"--out {args.out} cannot be written (a directory, or its folder "
                          "does not exist)", "give a file path in an existing folder")
    from labkit.lab import Lab

    cfg = config_from_args(args)
    Lab(cfg, mode=args.mode)  # plans only: a bad config fails here, before anything starts
    path = record_demo_session(args.out, args.mode, args.duration, progress=True,
                               compression=args.compression, config=cfg, owner="labkit record")
    print(summarize(read_recording(path)))
    return 0
