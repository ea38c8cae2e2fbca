"""PD across nodes on Ray (`pip install labkit[cluster]`): engines on Ray nodes, each run by
an actor as a subprocess; the proxy and telemetry on the driver.

    with labkit.Lab(num_prefill=2, num_decode=2, cluster="auto") as lab:   # a ClusterLab
        print("\\n".join(lab.cluster_plan.lines()))
        lab.complete("Hello")

placement.py: the plan on the cluster (no Ray import); actor.py: EngineActor, one engine
on its node; lab.py: ClusterLab. Importing this package imports no Ray.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ClusterLab"]


def __getattr__(name: str) -> Any:
    if name == "ClusterLab":
        from labkit.cluster.lab import ClusterLab

        return ClusterLab
    raise AttributeError(name)
