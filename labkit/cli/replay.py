"""`labkit replay` (summarize or play a recording) and `labkit record` (record a lab's run)."""

from __future__ import annotations

import argparse
import sys
import time

from labkit.telemetry.recording import read_recording
from labkit.telemetry.replay import Replay, summarize


def register_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay", help="summarize a recording (labkit.replay(path).show() plays it in a notebook)"
    )
    p.add_argument("path", help="a .lkrec file from `labkit record`")
    p.add_argument("--speed", type=float, default=1.0, help="with --play: replay speed")
    p.add_argument(
        "--play", action="store_true", help="play it through, printing one progress line per second"
    )
    p.add_argument("--json", action="store_true", help="print the header as JSON")
    p.set_defaults(func=replay_main)


def replay_main(args: argparse.Namespace) -> int:
    """`labkit replay PATH [--speed S] [--play] [--json]`."""
    import json

    rp = Replay(args.path, speed=args.speed)
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
    p.add_argument("--model", default="lab-1b")
    p.add_argument("--chunk", type=int, help="max_num_batched_tokens")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--kv-dtype", default="auto")
    p.add_argument("--connector", choices=["auto", "example", "nixl"], default="auto")
    p.add_argument("--gpus", type=int, help="number of GPUs (simulated: default 2)")
    p.add_argument("--gpu-type", help="simulated GPU type (h100, h200, a100, l4)")
    p.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip")
    p.set_defaults(func=record_main)


def record_main(args: argparse.Namespace) -> int:
    """`labkit record --duration S --out PATH [lab options]`: prints the recording's summary."""
    from labkit.bench.record_session import record_demo_session
    from labkit.plan import ConfigError

    knobs = {
        "model": args.model,
        "chunk": args.chunk,
        "tp": args.tp,
        "pp": args.pp,
        "kv_cache_dtype": args.kv_dtype,
        "connector": args.connector,
        "num_gpus": args.gpus,
        "gpu_type": args.gpu_type,
    }
    try:
        path = record_demo_session(
            args.out, args.mode, args.duration, progress=True, compression=args.compression, **knobs
        )
    except ConfigError as exc:
        print(f"error: {exc.problem}\n  fix: {exc.fix}", file=sys.stderr)
        return 2
    print(summarize(read_recording(path)))
    return 0
