"""`python -m labkit.engines.sim`: a SIMULATED engine that serves what `vllm serve` serves.

    python -m labkit.engines.sim --model lab-1b --port 8100 --role prefill \\
        --connector nixl --kv-events-endpoint tcp://127.0.0.1:5557 --fast

Flags follow `vllm serve` where vLLM has one (--tensor-parallel-size / --tp, ...); the
simulator adds --role, --connector, --kv-storage, --kv-link, --gpu-type, --speed, --fast.
Start-up lines go to stderr in vLLM's format, each saying SIMULATED.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from labkit.engines.sim.runner import EngineRunner, SimServerArgs


def _opt_int(text: str) -> int | None:
    return None if text.lower() in ("", "none") else int(text)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {type(value).__name__}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labkit.engines.sim",
                                description="A SIMULATED vLLM 0.26 engine (no GPU, no weights).")
    p.add_argument("model_tag", nargs="?", help="model (positional, as `vllm serve MODEL`)")
    p.add_argument("--model", help="a labkit.models preset (lab-1b, ...) or a model directory")
    p.add_argument("--served-model-name", help="name in /v1/models (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--role", choices=("prefill", "decode", "both"), default="both")
    p.add_argument("--connector", choices=("none", "example", "nixl"), default="none")
    p.add_argument("--kv-storage", help="ExampleConnector folder (must be inside the run dir)")
    p.add_argument("--kv-link", help="link between engines for NIXL reads (hardware.LINKS key; "
                   "default nvlink)")
    p.add_argument("--kv-storage-link", default="same-gpu",
                   help="link to ExampleConnector's storage (hardware.LINKS key)")
    p.add_argument("--gpu-type", default="h100", help="hardware.GPU_TYPES key")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=_opt_int, default=None)
    p.add_argument("--max-num-seqs", type=_opt_int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    p.add_argument("--num-gpu-blocks-override", type=_opt_int, default=None)
    p.add_argument("--num-gpu-blocks", type=_opt_int, default=None,
                   help="pool size from labkit's planner (default: from --gpu-memory-utilization)")
    p.add_argument("--observer-name", help="engine name on observer events (default: --role)")
    p.add_argument("--max-model-len", type=_opt_int, default=None)
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false")
    p.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true")
    # vLLM's BooleanOptionalAction pair (vllm/engine/arg_utils.py); off: a prompt is never
    # split over steps, it waits for a step with room (v1/core/sched/scheduler.py).
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--kv-events-endpoint", help="ZMQ PUB address to bind, e.g. tcp://127.0.0.1:5557")
    p.add_argument("--kv-events-topic", default="kv")
    p.add_argument("--observer-endpoint", help="ZMQ address of the lab's observer SUB (connect)")
    p.add_argument("--kv-load-timeout", type=float, default=5.0, metavar="S",
                   help="nixl decode: seconds to reach the prefill engine holding a request's "
                   "KV before the request fails (vLLM's handshake waits 5 s)")
    p.add_argument("--kv-transfer-config", type=_json_object, metavar="JSON",
                   help="vLLM's flag; the simulator reads kv_connector_extra_config from it "
                   "(nixl: kv_lease_duration, seconds prefill holds a finished request's blocks "
                   "for decode, default 30); the connector itself comes from --connector")
    p.add_argument("--engine-id", help="the engine id (NIXL's remote_engine_id); default random")
    p.add_argument("--kv-offloading-size", type=float, default=None, metavar="GiB",
                   help="host memory for the CPU tier of KV (vLLM's OffloadingConnector)")
    p.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second")
    p.add_argument("--fast", action="store_true", help="as fast as possible (tests, benchmarks)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(enable_prefix_caching=True)
    return p


def parse_args(argv: Sequence[str] | None = None) -> SimServerArgs:
    from labkit.engines.sim.runner import SimServerArgs

    ns = build_parser().parse_args(argv)
    model = ns.model or ns.model_tag or "lab-1b"
    fields = {k: v for k, v in vars(ns).items() if k not in ("model_tag", "model")}
    fields["connector"] = None if ns.connector == "none" else ns.connector
    if fields["speed"] <= 0:
        raise SystemExit("--speed must be > 0")
    if fields["kv_offloading_size"] is not None and not fields["kv_offloading_size"] > 0:
        raise SystemExit("--kv-offloading-size must be > 0")
    if not fields["kv_load_timeout"] > 0:
        raise SystemExit("--kv-load-timeout must be > 0")
    if fields["kv_transfer_config"] is not None:
        from labkit.engines.sim.connector import nixl_extra_config

        try:
            nixl_extra_config(fields["kv_transfer_config"].get("kv_connector_extra_config"))
        except ValueError as exc:
            raise SystemExit(f"--kv-transfer-config: {exc}") from None
    return SimServerArgs(model=model, **fields)


def log_startup(runner: EngineRunner) -> None:
    """vLLM-like start-up lines (labkit.telemetry.vllm_log reads them), each marked SIMULATED."""
    import labkit

    e, a = runner.engine, runner.args
    kv_gib = e.num_gpu_blocks * e.block_size * e.cost_model.kv_bytes_per_token / 2**30
    weights = max(runner.shape.weight_bytes(a.tp, a.pp)) / 2**30
    tokens = e.num_gpu_blocks * e.block_size
    mode = "fast" if a.fast else f"paced x{a.speed:g}"
    log = logging.getLogger("labkit.sim.server")
    for line in (
        f"SIMULATED vLLM engine: labkit {labkit.__version__} speaking vLLM version 0.26.0-sim, "
        f"model {a.model} on a simulated {a.gpu_type} (no GPU, no weights)",
        f"non-default args: {json.dumps({k: v for k, v in asdict(a).items() if v})}",
        f"Initializing a V1 LLM engine (v0.26.0-sim) with config: model='{a.model}', "
        f"tensor_parallel_size={a.tp}, pipeline_parallel_size={a.pp}, "
        f"kv_cache_dtype={a.kv_cache_dtype}, enable_prefix_caching={a.enable_prefix_caching}, "
        f"enable_chunked_prefill={a.enable_chunked_prefill}, "
        f"max_seq_len={e.max_model_len}, enforce_eager=True (SIMULATED)",
        "Loading model from scratch... (SIMULATED: weights are not allocated)",
        f"Model loading took {weights:.2f} GiB and 0.000000 seconds (SIMULATED)",
        f"Available KV cache memory: {kv_gib:.2f} GiB (SIMULATED)",
        f"GPU KV cache size: {tokens:,} tokens",
        f"Maximum concurrency for {e.max_model_len:,} tokens per request: "
        f"{tokens / e.max_model_len:.2f}x",
        "Cudagraph is disabled under eager mode",
        f"init engine (profile, create kv cache, warmup model) took 0.00 s (SIMULATED, "
        f"engine_id {runner.engine_id}, connector {a.connector or 'none'}, {mode})",
    ):
        log.info(line)


class _VLLMStyle(logging.Formatter):
    """`(APIServer pid=N) INFO 11-21 08:37:06 [sim] message`, as vLLM's log lines look."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%m-%d %H:%M:%S")
        return (f"(APIServer pid={os.getpid()}) {record.levelname} {stamp} "
                f"[{record.module}.py:{record.lineno}] {record.getMessage()}")


def main(argv: Sequence[str] | None = None) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_VLLMStyle())
    root = logging.getLogger("labkit")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    args = parse_args(argv)
    from labkit.engines.sim.server import serve

    try:
        serve(args, on_ready=log_startup)
    except ValueError as exc:  # bad configuration: say it the way vLLM does, exit non-zero
        logging.getLogger("labkit.sim.server").error("ValueError: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
