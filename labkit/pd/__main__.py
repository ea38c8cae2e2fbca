"""Run the PD proxy: `python -m labkit.pd --prefill URL --decode URL [--connector nixl|example]`.

Repeat --prefill / --decode for several engines (xPyD); --policy picks how they are routed
(round-robin, least-loaded, kv-aware; switch live with POST /router). --prefill-name /
--decode-name name the engines (one per URL, in order); --prefill-kv-events gives each
prefill engine's KV-event endpoint (in order), which kv-aware routing reads. Binds 127.0.0.1
unless told.
"""

from __future__ import annotations

import argparse

from labkit.pd.proxy import CONNECTORS, MAX_BODY_BYTES, MAX_IN_FLIGHT, MAX_QUEUED
from labkit.pd.router import POLICIES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m labkit.pd", description="Prefill -> decode proxy with a timeline."
    )
    parser.add_argument(
        "--prefill",
        action="append",
        required=True,
        metavar="URL",
        help="prefill engine base URL, e.g. http://127.0.0.1:8100 (repeatable)",
    )
    parser.add_argument(
        "--decode",
        action="append",
        required=True,
        metavar="URL",
        help="decode engine base URL (repeatable)",
    )
    parser.add_argument(
        "--connector",
        choices=CONNECTORS,
        default="nixl",
        help="nixl: kv_transfer_params handshake; example: shared storage",
    )
    parser.add_argument("--prefill-name", action="append", default=None, metavar="NAME",
                        help="the prefill engines' names, one per --prefill, in order")
    parser.add_argument("--decode-name", action="append", default=None, metavar="NAME",
                        help="the decode engines' names, one per --decode, in order")
    parser.add_argument("--prefill-kv-events", action="append", default=None,
                        metavar="ENDPOINT", help="each prefill engine's KV-event endpoint "
                        "(tcp://127.0.0.1:PORT), one per --prefill, in order")
    parser.add_argument("--policy", choices=POLICIES, default="round-robin",
                        help="routing policy at start (POST /router switches it)")
    parser.add_argument("--block-size", type=int, default=16, metavar="N",
                        help="the engines' KV block size (kv-aware cuts prompts with it)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8192)
    parser.add_argument("--connect-timeout", type=float, default=2.0, metavar="S")
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds to wait for an engine's answer; 0: no limit",
    )
    parser.add_argument("--max-in-flight", type=int, default=MAX_IN_FLIGHT, metavar="N",
                        help="requests carried at once (and connections per engine)")
    parser.add_argument("--max-queued", type=int, default=MAX_QUEUED, metavar="N",
                        help="requests waiting for a slot; past that: 503 + Retry-After")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, metavar="B",
                        help="larger request bodies get 413")
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import uvicorn

    from labkit.pd.proxy import create_app, engine_names

    kv_events = None
    if args.prefill_kv_events:
        if len(args.prefill_kv_events) != len(args.prefill):
            raise SystemExit("--prefill-kv-events: give one endpoint per --prefill")
        names = engine_names("prefill", args.prefill, args.prefill_name)
        kv_events = dict(zip(names, args.prefill_kv_events, strict=True))
    app = create_app(
        args.prefill,
        args.decode,
        connector=args.connector,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout or None,
        max_in_flight=args.max_in_flight,
        max_queued=args.max_queued,
        max_body_bytes=args.max_body_bytes,
        prefill_names=args.prefill_name,
        decode_names=args.decode_name,
        policy=args.policy,
        block_size=args.block_size,
        kv_events=kv_events,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
