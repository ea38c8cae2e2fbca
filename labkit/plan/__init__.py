"""The plan: what a learner asks for, checked before anything starts, and what each engine gets.

    EngineConfig x2 + PDConfig --validate(cfg, hardware)--> Plan --vllm_args()/env_for()--> vllm serve

One module per concept, no import of engines, telemetry or views:

    errors.py    ConfigError(problem, fix): the one error the planner raises (a leaf)
    types.py     the config and plan dataclasses (EngineConfig, PDConfig, Plan, EnginePlan, ...)
    memory.py    per-GPU memory as vLLM counts it: budget, activation, KV blocks per engine
    devices.py   device visibility: NVML detection under CUDA_VISIBLE_DEVICES, an engine's GPU env
    planner.py   validate(): field checks, the machine, placement, the connector -> Plan
    vllm_args.py Plan -> the `vllm serve` argument list and environment of each engine
    ports.py     free ports on this host (the planner and the engines share it)

The facts it reads sit beside it: labkit.models (shapes, weight/KV arithmetic) and
labkit.hardware (GPU datasheets, link peaks).
"""

from __future__ import annotations

from labkit.plan.devices import detect, engine_gpu_env
from labkit.plan.errors import ConfigError
from labkit.plan.memory import activation_bytes, default_max_num_batched_tokens, valid_tp_sizes
from labkit.plan.planner import validate
from labkit.plan.ports import free_port, port_is_free
from labkit.plan.types import (
    EngineConfig,
    EnginePlan,
    GPUPlan,
    MemoryLine,
    PDConfig,
    Plan,
    RankPlacement,
    Role,
)
from labkit.plan.vllm_args import (
    OBSERVER_CLASS,
    OBSERVER_MODULE,
    env_for,
    kv_role,
    kv_transfer_config,
    observer_children,
    serve_command,
    shared_storage_path,
    vllm_args,
)

__all__ = [
    "ConfigError", "EngineConfig", "PDConfig", "Plan", "EnginePlan", "GPUPlan", "MemoryLine",
    "RankPlacement", "Role", "validate", "valid_tp_sizes", "default_max_num_batched_tokens",
    "activation_bytes", "detect", "engine_gpu_env", "free_port", "port_is_free",
    "OBSERVER_CLASS", "OBSERVER_MODULE", "env_for", "kv_role", "kv_transfer_config",
    "observer_children", "serve_command", "shared_storage_path", "vllm_args",
]
