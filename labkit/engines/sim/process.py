"""SimEngineProcess: a simulated engine as a subprocess, handled like a real `vllm serve`.

The command is `sys.executable -m labkit.engines.sim ...` (an argument list, no shell),
built from a labkit.plan EngineConfig + Plan (the same numbers the planner shows: chunk
size, TP/PP, KV dtype, pool size, connector, link) or from keyword arguments. The process
logs vLLM-style start-up lines, so the same progress parser (telemetry.vllm_log) follows it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.engines.base import LogFollowingEngine

if TYPE_CHECKING:
    from labkit.plan import EngineConfig, EnginePlan, Plan

SIM_MAIN = "labkit.engines.sim"

# keyword -> CLI flag, for the options `sim_options` may carry
_FLAGS = {
    "model": "--model", "served_model_name": "--served-model-name", "role": "--role",
    "connector": "--connector", "kv_storage": "--kv-storage", "kv_link": "--kv-link",
    "kv_storage_link": "--kv-storage-link", "gpu_type": "--gpu-type", "tp": "--tp", "pp": "--pp",
    "kv_cache_dtype": "--kv-cache-dtype", "block_size": "--block-size",
    "max_num_batched_tokens": "--max-num-batched-tokens", "max_num_seqs": "--max-num-seqs",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "num_gpu_blocks_override": "--num-gpu-blocks-override", "num_gpu_blocks": "--num-gpu-blocks",
    "max_model_len": "--max-model-len", "kv_events_topic": "--kv-events-topic",
    "observer_name": "--observer-name", "engine_id": "--engine-id", "speed": "--speed",
    "seed": "--seed", "kv_load_timeout": "--kv-load-timeout",
    "kv_offloading_size": "--kv-offloading-size",
    "kv_transfer_config": "--kv-transfer-config",  # a JSON string (vLLM's flag)
}


def options_from_plan(config: EngineConfig | None, plan: Plan, key: Any) -> dict[str, Any]:
    """The simulator's options for engine `key` of `plan` (name, role, index or config)."""
    ep: EnginePlan = plan.engine(config if config is not None and key is None else key)
    c = ep.config
    opts: dict[str, Any] = {
        "model": c.model, "role": ep.role, "tp": c.tp, "pp": c.pp,
        "kv_cache_dtype": ep.kv_cache_dtype, "block_size": c.block_size,
        "max_num_batched_tokens": ep.max_num_batched_tokens, "max_num_seqs": c.max_num_seqs,
        "gpu_memory_utilization": ep.gpu_memory_utilization, "max_model_len": ep.max_model_len,
        "gpu_type": plan.gpu_type.key, "enable_prefix_caching": c.enable_prefix_caching,
        # The plan turns it off on an ExampleConnector prefill engine (labkit/plan/planner.py);
        # vLLM gets --no-enable-chunked-prefill then (labkit/plan/vllm_args.py), so does the sim.
        "enable_chunked_prefill": c.enable_chunked_prefill,
        "observer_name": ep.name,
    }
    if c.num_gpu_blocks_override is not None:
        opts["num_gpu_blocks_override"] = c.num_gpu_blocks_override
    else:
        opts["num_gpu_blocks"] = ep.num_blocks
    if c.kv_offloading_size_gb is not None:
        opts["kv_offloading_size"] = c.kv_offloading_size_gb
    if plan.connector is not None:
        opts["connector"] = plan.connector
        opts["kv_link"] = plan.link
    return opts


class SimEngineProcess(LogFollowingEngine):
    """A simulated engine subprocess (kind "sim").

    Args:
        name: engine name ("prefill", "decode", ...), also the log file's stem.
        config, plan: build the options from the planner (`options_from_plan`); `plan_key`
            picks the engine in the plan (default: `config`, else `name`).
        run_dir: where ExampleConnector's storage goes (`<run_dir>/kv-store`); default
            $LABKIT_RUN_DIR, else the log's folder.
        fast: step as fast as possible (tests, benchmarks); else paced to the wall clock.
        speed: simulated seconds per wall second when paced.
        python: interpreter to run (default: this one).
        **options: any `python -m labkit.engines.sim` option by its keyword name (model,
            connector, gpu_type, num_gpu_blocks_override, ...); these win over the plan.
            EngineHandle's keywords (role, port, host, log_path, kv_events_endpoint,
            observer_endpoint, env) are passed on.
    """

    def __init__(self, name: str, *, config: EngineConfig | None = None, plan: Plan | None = None,
                 plan_key: Any = None, run_dir: str | Path | None = None, fast: bool = False,
                 speed: float = 1.0, python: str | None = None, **options: Any) -> None:
        handle_kw = {k: options.pop(k) for k in ("port", "host", "gpus", "log_path",
                                                  "kv_events_endpoint", "observer_endpoint",
                                                  "env") if k in options}
        opts: dict[str, Any] = {}
        if plan is not None:
            opts.update(options_from_plan(config, plan, plan_key if plan_key is not None
                                          else (None if config is not None else name)))
        elif config is not None:
            opts.update(_options_from_config(config))
        opts.update({k: v for k, v in options.items() if v is not None})
        role = str(opts.get("role") or "both")
        super().__init__(name, role=role, kind="sim", **handle_kw)
        self.options = opts
        self.fast = fast
        self.speed = speed
        self.python = python or sys.executable
        self.run_dir = Path(run_dir or os.environ.get("LABKIT_RUN_DIR") or self.log_path.parent)
        if opts.get("connector") == "example" and not opts.get("kv_storage"):
            opts["kv_storage"] = str(self.run_dir / "kv-store")

    def command(self) -> list[str]:
        args = [self.python, "-m", SIM_MAIN, "--host", self.host, "--port", str(self.port)]
        for key, value in self.options.items():
            flag = _FLAGS.get(key)
            if flag is not None and value is not None:
                args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        if self.options.get("enable_prefix_caching") is False:
            args.append("--no-enable-prefix-caching")
        if self.options.get("enable_chunked_prefill") is False:
            args.append("--no-enable-chunked-prefill")
        if self.kv_events_endpoint:
            args += ["--kv-events-endpoint", self.kv_events_endpoint]
        if self.observer_endpoint:
            args += ["--observer-endpoint", self.observer_endpoint]
        args += ["--fast"] if self.fast else ["--speed", f"{self.speed:g}"]
        return args

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["LABKIT_RUN_DIR"] = str(self.run_dir)  # the storage check's root
        root = str(Path(__file__).resolve().parents[3])  # labkit importable without install
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            env["PYTHONPATH"] = os.pathsep.join([*paths, root])
        return env

    START_TIMEOUT_S = 60.0  # a simulated engine starts in seconds
    POLL_S = 0.1
    STOP_TIMEOUT_S = 10.0


def _options_from_config(c: EngineConfig) -> dict[str, Any]:
    """Options from an EngineConfig alone (no plan: the simulator sizes the pool itself)."""
    opts = {k: getattr(c, k) for k in ("model", "role", "tp", "pp", "kv_cache_dtype",
                                       "block_size", "max_num_batched_tokens", "max_num_seqs",
                                       "gpu_memory_utilization", "max_model_len",
                                       "num_gpu_blocks_override", "enable_prefix_caching",
                                       "enable_chunked_prefill")
            if getattr(c, k, None) is not None}
    if getattr(c, "kv_offloading_size_gb", None) is not None:
        opts["kv_offloading_size"] = c.kv_offloading_size_gb
    return opts
