"""From a validated Plan to the exact `vllm serve` argument list and environment.

The KV-transfer JSON (ExampleConnector / NixlConnector, wrapped in vLLM's MultiConnector with
labkit's observer connector and, when asked, the CPU offload tier), the KV-event config, and
the per-engine environment (CUDA_VISIBLE_DEVICES, NIXL side channel). Re-exported by
`labkit.plan`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from labkit.plan.devices import engine_gpu_env
from labkit.plan.ports import free_port
from labkit.plan.types import EngineConfig, EnginePlan, Plan, Role
from labkit.vocab import GiB

# ---- from the plan to `vllm serve` ------------------------------------------------------------
_CONNECTOR_CLASS = {"example": "ExampleConnector", "nixl": "NixlConnector"}
OBSERVER_CLASS, OBSERVER_MODULE = "LabkitObserverConnector", "labkit.pd.observer"


def kv_role(connector: str | None, role: Role) -> str:
    """NIXL wants kv_producer on prefill and kv_consumer on decode (nixl/connector.py warns
    that kv_both is deprecated); ExampleConnector and colocated engines use kv_both."""
    if connector == "nixl" and role in ("prefill", "decode"):
        return "kv_producer" if role == "prefill" else "kv_consumer"
    return "kv_both"


def shared_storage_path(run_dir: str | Path) -> str:
    """Where ExampleConnector's files go: RAM-backed /dev/shm when present (one per run)."""
    run = Path(run_dir)
    if Path("/dev/shm").is_dir():
        return f"/dev/shm/labkit-{run.name or 'run'}-kv"
    return str(run / "kv-store")


def observer_children(
    endpoint: str, name: str | None, role: str, kr: str, bracketed: str | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """labkit's observer as MultiConnector children: (close-or-solo child, open child or None).

    `bracketed` names the connector the observer brackets: an "open" child goes before it
    and a "close" child after it, so per-layer timings are that connector's own wall time
    (labkit/pd/observer.py, "What the times measure"). Only the close (or solo) child
    publishes; both carry the engine's name so its batches say "prefill" / "decode".
    With LABKIT_OBSERVER_TRACE=1 in the lab's environment the publishing child also sends
    each request's prompt token ids (`observer_trace`: RequestAdded), what a recording needs
    to be replayed by the conformance harness (docs/conformance.md).
    """
    extra: dict[str, Any] = {"observer_endpoint": endpoint, "observer_role": role}
    if name:
        extra["observer_name"] = name
    if os.environ.get("LABKIT_OBSERVER_TRACE") == "1":
        extra["observer_trace"] = True
    opener = None
    if bracketed:
        extra.update(observer_bracket="close", transfer_connector=bracketed)
        open_extra = {"observer_bracket": "open", **({"observer_name": name} if name else {})}
        opener = {
            "kv_connector": OBSERVER_CLASS,
            "kv_connector_module_path": OBSERVER_MODULE,
            "kv_role": kr,
            "kv_connector_extra_config": open_extra,
        }
    closer = {
        "kv_connector": OBSERVER_CLASS,
        "kv_connector_module_path": OBSERVER_MODULE,
        "kv_role": kr,
        "kv_connector_extra_config": extra,
    }
    return closer, opener


def kv_transfer_config(
    connector: str | None,
    role: Role,
    run_dir: str | Path,
    observer_endpoint: str | None = None,
    *,
    connector_extra: dict[str, Any] | None = None,
    offload_gib: float | None = None,
    observer_name: str | None = None,
) -> dict[str, Any] | None:
    """The --kv-transfer-config JSON for one engine (None: no connector at all).

    With an observer endpoint (or CPU offload beside a PD connector) the connectors are
    wrapped in vLLM's MultiConnector: kv_connector_extra_config.connectors is a list of
    child configs, each with its own kv_role and no engine_id (multi_connector.py passes
    engine_id itself). Order: [observer open, transfer connector, observer close, offload]:
    the observer brackets the transfer connector (or the offload connector when there is no
    transfer connector) in every hook, and returns no tokens, so MultiConnector still loads
    KV from the transfer connector first. `observer_name` (the engine's name) labels the
    observer's batches.
    """
    kr = kv_role(connector, role)
    transfer: dict[str, Any] | None = None
    if connector is not None:
        extra: dict[str, Any] = {}
        if connector == "example":
            extra["shared_storage_path"] = shared_storage_path(run_dir)
        extra.update(connector_extra or {})
        transfer = {
            "kv_connector": _CONNECTOR_CLASS[connector],
            "kv_role": kr,
            "kv_connector_extra_config": extra,
        }
    offload: dict[str, Any] | None = None
    if offload_gib is not None:
        offload = {
            "kv_connector": "OffloadingConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"cpu_bytes_to_use": int(offload_gib * GiB)},
        }
    inner = transfer or offload
    children: list[dict[str, Any]] = [c for c in (transfer, offload) if c is not None]
    if observer_endpoint is not None:
        closer, opener = observer_children(
            observer_endpoint, observer_name, role, kr, inner["kv_connector"] if inner else None
        )
        at = children.index(inner) if inner is not None else 0
        children[at + 1:at + 1] = [closer]
        if opener is not None:
            children.insert(at, opener)
    if not children:
        return None
    if len(children) == 1:
        return children[0]
    return {
        "kv_connector": "MultiConnector",
        "kv_role": kr,
        "kv_connector_extra_config": {"connectors": children},
    }


def vllm_args(
    engine: EngineConfig | None,
    plan: Plan,
    role_index: int | str,
    model_dir: str,
    port: int,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """The argument list after `vllm serve` for engine `role_index` of `plan`.

    `extra` keys (all optional): run_dir (ExampleConnector storage; default $LABKIT_RUN_DIR),
    observer_endpoint (wraps the connector with labkit's observer in MultiConnector),
    connector_extra (merged into the transfer connector's kv_connector_extra_config),
    kv_events_endpoint (e.g. "tcp://127.0.0.1:5557") and kv_events_topic ("kv"),
    served_model_name, host (the bind address; default 127.0.0.1: a cluster plan names the
    node's), distributed_executor_backend ("ray" for a cluster plan: TP/PP across nodes
    through vLLM's Ray executor). `engine` may be None: the plan's resolved config is used; when
    given, its extra_args are appended.
    """
    x = dict(extra or {})
    ep = plan.engine(role_index)
    c = ep.config
    args = [
        str(model_dir),
        "--host",
        str(x.get("host") or "127.0.0.1"),
        "--port",
        str(int(port)),
        "--tensor-parallel-size",
        str(c.tp),
        "--pipeline-parallel-size",
        str(c.pp),
        "--kv-cache-dtype",
        ep.kv_cache_dtype,
        "--block-size",
        str(c.block_size),
        "--max-num-batched-tokens",
        str(ep.max_num_batched_tokens),
        "--max-num-seqs",
        str(c.max_num_seqs),
        "--gpu-memory-utilization",
        f"{ep.gpu_memory_utilization:g}",
        "--max-model-len",
        str(ep.max_model_len),
        "--enable-prefix-caching" if c.enable_prefix_caching else "--no-enable-prefix-caching",
        "--enable-chunked-prefill" if c.enable_chunked_prefill else "--no-enable-chunked-prefill",
    ]
    if c.load_format == "dummy":
        args += ["--load-format", "dummy"]
    if x.get("distributed_executor_backend"):
        args += ["--distributed-executor-backend", str(x["distributed_executor_backend"])]
    if c.enforce_eager:
        args.append("--enforce-eager")
    if c.num_gpu_blocks_override is not None:
        args += ["--num-gpu-blocks-override", str(c.num_gpu_blocks_override)]
    if x.get("served_model_name"):
        args += ["--served-model-name", str(x["served_model_name"])]
    # --kv-offloading-size REPLACES any kv_connector (config/vllm.py
    # _post_init_kv_transfer_config): beside a connector, offload joins the MultiConnector.
    offload = c.kv_offloading_size_gb
    observer = x.get("observer_endpoint")
    if offload is not None and plan.connector is None and observer is None:
        args += ["--kv-offloading-size", f"{offload:g}"]
        offload = None
    run_dir = x.get("run_dir") or os.environ.get("LABKIT_RUN_DIR") or "default"
    ktc = kv_transfer_config(
        plan.connector,
        ep.role,
        run_dir,
        observer,
        connector_extra=x.get("connector_extra"),
        offload_gib=offload,
        observer_name=ep.name,
    )
    if ktc is not None:
        args += ["--kv-transfer-config", json.dumps(ktc, separators=(",", ":"))]
    if x.get("kv_events_endpoint"):
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": x["kv_events_endpoint"],
            "topic": x.get("kv_events_topic", "kv"),
        }
        args += ["--kv-events-config", json.dumps(events, separators=(",", ":"))]
    args += list((engine.extra_args if engine is not None else c.extra_args) or [])
    return args


def serve_command(
    engine: EngineConfig | None,
    plan: Plan,
    role_index: int | str,
    model_dir: str,
    port: int,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """["vllm", "serve", *vllm_args(...)]."""
    return ["vllm", "serve", *vllm_args(engine, plan, role_index, model_dir, port, extra)]


def env_for(
    engine: EngineConfig | EnginePlan | int | str, plan: Plan, side_channel_port: int | None = None
) -> dict[str, str]:
    """Environment variables one engine's process needs on top of the parent's:
    CUDA_VISIBLE_DEVICES (its GPUs, rank order) and, with NIXL, its own side-channel port.

    On a real plan the plan's (logical) GPUs become the parent's CUDA_VISIBLE_DEVICES entries
    (logical 0 under CUDA_VISIBLE_DEVICES=2,3 is "2") and CUDA_DEVICE_ORDER=PCI_BUS_ID is set
    (labkit.plan.devices.engine_gpu_env); a simulated plan's GPUs are no GPUs of this machine.
    """
    ep = plan.engine(engine)
    order: list[int] = []
    for r in ep.ranks:
        if r.gpu not in order:
            order.append(r.gpu)
    if plan.kind == "vllm":
        env = engine_gpu_env(order)
    else:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, order))}
    if plan.connector == "nixl":
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_channel_port or free_port())
    alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if plan.connector and "expandable_segments:True" in alloc:
        # vLLM refuses a KV connector with expandable segments (config/vllm.py)
        kept = [p for p in alloc.split(",") if p and p != "expandable_segments:True"]
        env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(kept)
    return env
