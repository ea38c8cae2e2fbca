"""xPyD placement: several prefill and decode engines over the visible GPUs, and their ports.

    PDConfig(num_prefill=2, num_decode=2, prefill=EngineConfig(tp=2), decode=EngineConfig(tp=2))
      --validate--> prefill-0: GPUs 0,1 | prefill-1: GPUs 2,3 | decode-0: GPUs 4,5 | decode-1: GPUs 6,7

Each role has one EngineConfig (its TP/PP, chunk, dtype); every engine of a role is a copy
of it on GPUs of its own, prefill engines first, each engine's ranks on consecutive GPUs
(vLLM takes an engine's GPUs from its own CUDA_VISIBLE_DEVICES, rank order). The checks of a
pair (fields, models, connector, memory per engine) are the planner's own: the pair is
planned once by `labkit.plan.validate`, then its prefill and decode plans are repeated and
the per-GPU memory recounted. Engines do not share GPUs here; one PD pair on one GPU stays
the 1P1D plan's case.

`engine_ports` gives every engine its own ports on this host: HTTP, the NIXL side channel
(VLLM_NIXL_SIDE_CHANNEL_PORT; a block of `tp` ports, as vLLM versions that add the TP rank
need), the KV-event publisher and the observer endpoint.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from labkit.plan.errors import ConfigError
from labkit.plan.memory import gpu_lines
from labkit.plan.types import EnginePlan, PDConfig, Plan, RankPlacement

if TYPE_CHECKING:
    from labkit.hardware import Hardware

MAX_ENGINES_PER_ROLE = 32


def is_xpyd(cfg: PDConfig) -> bool:
    """More than one prefill or decode engine (the 1P1D plan handles everything else)."""
    return (cfg.num_prefill, cfg.num_decode) != (1, 1)


def _count(name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_ENGINES_PER_ROLE:
        raise ConfigError(f"{name}={v!r} is out of range",
                          f"use an integer in 1..{MAX_ENGINES_PER_ROLE}")
    return v


def _world(v: object) -> int | None:
    """An engine's tp * pp, or None where a field is not a positive int (the planner says so)."""
    tp, pp = getattr(v, "tp", None), getattr(v, "pp", None)
    if all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (tp, pp)):
        return tp * pp  # type: ignore[operator]
    return None


def _gpus_available(cfg: PDConfig, hw: Hardware, need: int) -> int:
    """The GPU count the plan is made for (as the planner's _machine picks it); a simulated
    machine with num_gpus unset gets as many GPUs as the engines need."""
    simulated = hw.simulated or hw.num_gpus == 0 or (
        cfg.gpu_type is not None and cfg.gpu_type != hw.gpu_type.key)
    if cfg.num_gpus is not None:
        return cfg.num_gpus
    return max(need, 2) if simulated else hw.num_gpus


def plan_xpyd(cfg: PDConfig, hardware: Hardware) -> Plan:
    """num_prefill x prefill + num_decode x decode engines, each on GPUs of its own.

    Raises ConfigError when the engines do not fit the GPUs, or for anything the 1P1D plan of
    the same configs refuses.
    """
    num_p, num_d = _count("num_prefill", cfg.num_prefill), _count("num_decode", cfg.num_decode)
    if cfg.colocated:
        raise ConfigError(
            f"colocated=True is one engine doing both phases, but num_prefill={num_p} and "
            f"num_decode={num_d} ask for PD engines",
            "use colocated=False for xPyD, or num_prefill=num_decode=1 with colocated=True",
        )
    wp, wd = _world(cfg.prefill), _world(cfg.decode)
    count = None
    if wp is not None and wd is not None and (cfg.num_gpus is None or isinstance(cfg.num_gpus, int)):
        need = num_p * wp + num_d * wd
        count = _gpus_available(cfg, hardware, need)
        if need > count:
            raise ConfigError(
                f"{num_p} prefill x {wp} GPU(s) (tp {cfg.prefill.tp} x pp {cfg.prefill.pp}) + "
                f"{num_d} decode x {wd} GPU(s) (tp {cfg.decode.tp} x pp {cfg.decode.pp}) needs "
                f"{need} GPUs, there are {count}",
                _fit_hint(num_p, num_d, wp, wd, count) + f", or plan a simulated cluster with "
                f"num_gpus={need}",
            )
    from labkit.plan.planner import validate

    pair = validate(replace(cfg, num_prefill=1, num_decode=1, num_gpus=count), hardware)
    p_plan, d_plan = pair.engines
    engines: list[EnginePlan] = []
    first = 0
    for role, template, n in (("prefill", p_plan, num_p), ("decode", d_plan, num_d)):
        base = min(r.gpu for r in template.ranks)
        for i in range(n):
            ranks = [RankPlacement(r.pp_rank, r.tp_rank, first + r.gpu - base) for r in template.ranks]
            engines.append(replace(template, name=f"{role}-{i}", ranks=ranks))
            first += template.config.world_size
    gpus = gpu_lines(engines, pair.model, pair.gpu_type, pair.num_gpus)
    where = "; ".join(f"{e.name}: GPU{'s' if len(e.gpus) > 1 else ''} "
                      f"{','.join(map(str, e.gpus))}" for e in engines)
    notes = [*pair.notes, f"xPyD {num_p}P+{num_d}D on {pair.num_gpus} GPUs: {where}"]
    if first < pair.num_gpus:
        notes.append(f"GPUs {first}..{pair.num_gpus - 1} are left unused")
    return replace(pair, engines=engines, gpus=gpus, notes=notes)


def _fit_hint(num_p: int, num_d: int, wp: int, wd: int, count: int) -> str:
    """A fix that fits: fewer decode engines, fewer prefill engines, or tp=pp=1."""
    hints = []
    if count - num_p * wp >= wd:
        hints.append(f"num_decode={(count - num_p * wp) // wd}")
    if count - num_d * wd >= wp:
        hints.append(f"num_prefill={(count - num_d * wd) // wp}")
    if num_p + num_d <= count and (wp > 1 or wd > 1):
        hints.append("tp=pp=1 on both roles")
    return "use " + " or ".join(hints) if hints else f"use fewer engines (at most {count} GPUs)"


# ---------------------------------------------------------------- ports
@dataclass(frozen=True)
class EnginePorts:
    """One engine's ports on this host (all distinct across the plan's engines)."""

    http: int
    side_channel: int  # VLLM_NIXL_SIDE_CHANNEL_PORT: side_channel .. side_channel + tp - 1 are free
    kv_events: int  # --kv-events-config endpoint tcp://host:kv_events
    observer: int  # the observer connector's ZMQ endpoint

    def kv_events_endpoint(self, host: str = "127.0.0.1") -> str:
        return f"tcp://{host}:{self.kv_events}"

    def observer_endpoint(self, host: str = "127.0.0.1") -> str:
        return f"tcp://{host}:{self.observer}"


def _hold(stack: ExitStack, host: str, port: int) -> bool:
    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    try:
        s.bind((host, port))
    except OSError:
        return False
    return True


def _take(stack: ExitStack, host: str, width: int = 1, tries: int = 64) -> int:
    """A free port with `width - 1` free ports after it, held until the stack closes."""
    for _ in range(tries):
        s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        s.bind((host, 0))
        port = s.getsockname()[1]
        if port + width - 1 <= 65535 and all(_hold(stack, host, port + k) for k in range(1, width)):
            return port
    raise OSError(f"no {width} consecutive free ports on {host}")


def engine_ports(plan: Plan, host: str = "127.0.0.1") -> dict[str, EnginePorts]:
    """Ports for every engine of `plan`, by engine name; free a moment ago, none shared
    (every socket stays bound until all are picked, so no port is handed out twice)."""
    out: dict[str, EnginePorts] = {}
    with ExitStack() as stack:
        for e in plan.engines:
            out[e.name] = EnginePorts(_take(stack, host), _take(stack, host, e.config.tp),
                                      _take(stack, host), _take(stack, host))
    return out
