"""The simulated engine: vLLM V1's scheduling and KV-cache rules plus a roofline cost model.

What a learner sees here is what vLLM 0.26 does on a GPU: the same block pool (free queue,
prefix-cache hashes, null block 0), the same scheduler (token budget, chunked prefill,
max_num_seqs, preemption by recompute), the same KV-connector hooks (ExampleConnector and
NixlConnector behaviour); only the time each step takes comes from a model, not a GPU.

Modules are imported lazily so `import labkit.engines.sim` stays cheap.
"""
from __future__ import annotations

__all__ = ["SimEngine", "SimCluster", "SimClock", "StepResult", "RequestOutput"]


def __getattr__(name: str):
    if name in ("SimEngine", "StepResult", "RequestOutput"):
        from labkit.engines.sim import engine

        return getattr(engine, name)
    if name == "SimCluster":
        from labkit.engines.sim.cluster import SimCluster

        return SimCluster
    if name == "SimClock":
        from labkit.engines.sim.clock import SimClock

        return SimClock
    raise AttributeError(f"module 'labkit.engines.sim' has no attribute {name!r}")
