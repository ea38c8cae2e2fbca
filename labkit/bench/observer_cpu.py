"""The observer's own CPU time per engine step, without a GPU.

    python -m labkit.bench.observer_cpu [--requests 32] [--layers 16] [--steps 3000]

Drives labkit.pd.observer's hooks the way vLLM 0.26 calls them for one decode step of
`--requests` running requests (scheduler side: build_connector_meta with their cached-request
data, a new block for each every 16th step, update_connector_output; worker side:
bind_connector_metadata, start_load_kv, wait_for_layer_load + save_kv_layer per layer,
wait_for_save, get_finished, clear_connector_metadata), publishing to a live subscriber, and
prints microseconds per step. With vLLM installed its real connector base class is used;
without it (a laptop, CI), a stand-in with the few attributes the observer reads.

What it tells: the observer's share of the per-step cost that `observer_overhead` measures on
a GPU (the rest is vLLM's own path for any KV connector).
"""
from __future__ import annotations

import argparse
import enum
import importlib
import sys
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

_BASE = "vllm.distributed.kv_transfer.kv_connector.v1.base"


@contextmanager
def observer_module(stand_in: bool = False) -> Iterator[types.ModuleType]:
    """labkit.pd.observer, against vLLM's base module if importable (and not `stand_in`),
    else against a stand-in with the few attributes the observer reads (the stand-in and that
    import of the observer are taken out of sys.modules afterwards). The observer's unit tests
    use it with `stand_in=True`."""
    if not stand_in:
        try:
            importlib.import_module(_BASE)
        except ImportError:
            pass
        else:
            yield importlib.import_module("labkit.pd.observer")
            return

    class KVConnectorRole(enum.Enum):
        SCHEDULER = 0
        WORKER = 1

    class KVConnectorBase_V1:  # noqa: N801 - vLLM's name
        def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._kv_cache_config = kv_cache_config
            self._connector_metadata = None

        def bind_connector_metadata(self, metadata: Any) -> None:
            self._connector_metadata = metadata

        def clear_connector_metadata(self) -> None:
            self._connector_metadata = None

    base = types.ModuleType(_BASE)
    base.KVConnectorBase_V1 = KVConnectorBase_V1  # type: ignore[attr-defined]
    base.KVConnectorMetadata = type("KVConnectorMetadata", (), {})  # type: ignore[attr-defined]
    base.KVConnectorRole = KVConnectorRole  # type: ignore[attr-defined]
    base.SupportsHMA = type("SupportsHMA", (), {})  # type: ignore[attr-defined]
    parts = _BASE.split(".")
    added = [".".join(parts[:i]) for i in range(1, len(parts))]
    saved = {n: sys.modules.get(n) for n in [*added, _BASE, "labkit.pd.observer"]}
    for n in added:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[_BASE] = base
    sys.modules.pop("labkit.pd.observer", None)
    try:
        yield importlib.import_module("labkit.pd.observer")
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _config(endpoint: str, role: str) -> Any:
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config={"observer_name": "bench", "observer_endpoint": endpoint,
                                       "observer_role": role},
            engine_id="bench", kv_role="kv_both", kv_connector="LabkitObserverConnector"),
        cache_config=SimpleNamespace(block_size=16),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=2048),
        parallel_config=SimpleNamespace(world_size=1))


def run(requests: int = 32, layers: int = 16, steps: int = 3000) -> dict[str, Any]:
    from labkit.telemetry.subscriber import ObserverSubscriber

    got = [0]
    out: dict[str, Any] = {"requests": requests, "layers": layers, "steps": steps}
    with observer_module() as obs, ObserverSubscriber(
            "tcp://127.0.0.1:*", bind=True, callback=lambda b: got.__setitem__(0, got[0] + 1)) as sub:
        role = obs.KVConnectorRole
        sched = obs.LabkitObserverConnector(_config(sub.endpoint, "both"), role.SCHEDULER)
        work = obs.LabkitObserverConnector(_config(sub.endpoint, "both"), role.WORKER)
        emitted = [0]
        emit = sched._emit

        def counting_emit(ev: Any) -> None:
            emitted[0] += type(ev).__name__ == "StepScheduled"
            emit(ev)

        sched._emit = counting_emit
        rids = [f"cmpl-{i:04d}-0-abcdef12" for i in range(requests)]
        none_new: list[Any] = [None] * requests
        output = SimpleNamespace(finished_recving=None, finished_sending=None,
                                 kv_connector_stats=None)

        def scheduler_output(k: int) -> Any:
            new = [([100_000 + k * requests + i],) for i in range(requests)] if k % 16 == 0 else none_new
            return SimpleNamespace(
                scheduled_new_reqs=[], num_scheduled_tokens=dict.fromkeys(rids, 1),
                total_num_scheduled_tokens=requests,
                scheduled_cached_reqs=SimpleNamespace(
                    req_ids=rids, num_computed_tokens=[600 + k] * requests, new_block_ids=new,
                    resumed_req_ids=set()),
                preempted_req_ids=set(), finished_req_ids=set())

        names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
        metas = []
        t0 = time.perf_counter()
        for k in range(steps):
            metas.append(sched.build_connector_meta(scheduler_output(k)))
            sched.update_connector_output(output)
        out["scheduler_us"] = (time.perf_counter() - t0) / steps * 1e6
        t0 = time.perf_counter()
        for meta in metas:
            work.bind_connector_metadata(meta)
            work.start_load_kv(None)
            for name in names:
                work.wait_for_layer_load(name)
                work.save_kv_layer(name, None, None)
            work.wait_for_save()
            work.get_finished(set())
            work.clear_connector_metadata()
        out["worker_us"] = (time.perf_counter() - t0) / steps * 1e6
        deadline = time.monotonic() + 5
        while got[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        out["step_events"] = emitted[0]
        out["batches_received"] = got[0]
        out["num_drops"] = sched.num_drops + work.num_drops
        sched.shutdown()
        work.shutdown()
    return out


def format_table(r: dict[str, Any]) -> str:
    total = r["scheduler_us"] + r["worker_us"]
    return "\n".join([
        f"observer CPU per decode step: {r['requests']} running requests, {r['layers']} layers, "
        f"{r['steps']} steps",
        f"  scheduler side (build_connector_meta, update_connector_output)  {r['scheduler_us']:8.1f} us",
        f"  worker side (per-layer hooks, wait_for_save, get_finished)      {r['worker_us']:8.1f} us",
        f"  together                                                        {total:8.1f} us",
        f"  StepScheduled events {r['step_events']}, batches received {r['batches_received']}, "
        f"drops {r['num_drops']}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.bench.observer_cpu",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    a = p.parse_args(argv)
    print(format_table(run(a.requests, a.layers, a.steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
