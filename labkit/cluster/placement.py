"""Where each engine of a plan runs in a Ray cluster, and over which link its KV travels.

    plan (labkit.plan)  --bundles()-->  one placement-group bundle per engine: {"GPU": tp*pp}
    Ray reserves them (strategy PACK: fill a node's GPUs before the next node's)
    placement_group_table: bundle i -> node id  --place()-->  ClusterPlan

A ClusterPlan names every engine's node, its bind address (the node's address, never
0.0.0.0), and the link each decode engine reads KV over: the intra-node link of the plan
where every prefill engine shares its node, else the cross-node link (hardware.LINKS key,
e.g. "rdma" for InfiniBand NDR 400 Gb/s, one NIC per GPU). The simulated engines time their
reads by it (hardware.achieved_link: min(NIC peak, NIXL as measured on NVLink)).

No Ray import here: the plan is data, testable without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labkit.plan.errors import ConfigError

if TYPE_CHECKING:
    from labkit.plan import Plan

CROSS_NODE_LINKS = ("rdma", "roce", "tcp")


@dataclass(frozen=True)
class ClusterNode:
    """One alive Ray node that has GPUs (real, or declared with num_gpus)."""

    node_id: str
    address: str  # the node's IP as Ray knows it: where its engines bind
    num_gpus: int


@dataclass(frozen=True)
class EnginePlacement:
    """One engine on one node."""

    name: str
    role: str
    node_id: str
    address: str  # bind address (the node's), named in the plan
    num_gpus: int  # GPUs reserved for it on that node (its tp * pp)
    bundle_index: int
    kv_link: str | None  # decode: the link its KV reads take; prefill: None


@dataclass(frozen=True)
class ClusterPlan:
    """The engines on the cluster's nodes, the proxy's bind address, and the links."""

    engines: list[EnginePlacement]
    nodes: list[ClusterNode]
    proxy_address: str
    intra_node_link: str
    cross_node_link: str
    token_required: bool = True
    notes: list[str] = field(default_factory=list)

    def engine(self, name: str) -> EnginePlacement:
        return next(e for e in self.engines if e.name == name)

    @property
    def num_nodes_used(self) -> int:
        return len({e.node_id for e in self.engines})

    def cross_node_pairs(self) -> int:
        """Prefill -> decode pairs whose KV crosses nodes."""
        pre = [e for e in self.engines if e.role == "prefill"]
        dec = [e for e in self.engines if e.role == "decode"]
        return sum(p.node_id != d.node_id for p in pre for d in dec)

    def lines(self) -> list[str]:
        """The plan in words, one line per engine, then the links and the notes."""
        short = {n.node_id: f"node {i} ({n.address}, {n.num_gpus} GPUs)"
                 for i, n in enumerate(self.nodes)}
        out = [f"{e.name}: {short.get(e.node_id, e.node_id[:8])}, {e.num_gpus} GPU(s), "
               f"binds {e.address}" + (f", reads KV over {e.kv_link}" if e.kv_link else "")
               for e in self.engines]
        out.append(f"proxy: binds {self.proxy_address} (the driver); every endpoint needs "
                   "the lab's bearer token" if self.token_required else "")
        out.append(f"{self.cross_node_pairs()} of the P->D pairs cross nodes "
                   f"({self.cross_node_link}); the others stay on {self.intra_node_link}")
        return [*(x for x in out if x), *self.notes]


def bundles(plan: Plan, cpus_per_engine: float = 0.0) -> list[dict[str, float]]:
    """One placement-group bundle per engine, in the plan's order: {"GPU": tp * pp}.

    Raises ConfigError for an engine that has no GPU to reserve (a plan with world 0)."""
    out = []
    for e in plan.engines:
        world = e.config.tp * e.config.pp
        if world < 1:
            raise ConfigError(f"{e.name} has no GPU to reserve", "plan engines with tp, pp >= 1")
        b: dict[str, float] = {"GPU": float(world)}
        if cpus_per_engine:
            b["CPU"] = cpus_per_engine
        out.append(b)
    return out


def check_fits(plan: Plan, nodes: list[ClusterNode]) -> None:
    """Raise ConfigError where an engine needs more GPUs than any node has (a multi-node
    engine: real vLLM's Ray executor only, not planned here yet) or the cluster is too small."""
    if not nodes:
        raise ConfigError("the Ray cluster has no node with GPUs",
                          "start nodes with GPUs (or num_gpus=N for simulated engines)")
    biggest = max(n.num_gpus for n in nodes)
    for e in plan.engines:
        world = e.config.tp * e.config.pp
        if world > biggest:
            raise ConfigError(
                f"{e.name} needs {world} GPUs on one node, the largest node has {biggest}",
                "use tp * pp <= GPUs per node; an engine spanning nodes (vLLM's Ray executor, "
                "--distributed-executor-backend ray) is on paper only (docs/xpyd.md)")
    need = sum(e.config.tp * e.config.pp for e in plan.engines)
    have = sum(n.num_gpus for n in nodes)
    if need > have:
        raise ConfigError(f"the engines need {need} GPUs, the Ray cluster has {have}",
                          "add nodes, or plan fewer engines")


def place(plan: Plan, nodes: list[ClusterNode], bundle_nodes: list[str], *,
          proxy_address: str, cross_node_link: str = "rdma") -> ClusterPlan:
    """The ClusterPlan for `plan` once Ray has put bundle i on node `bundle_nodes[i]`."""
    if cross_node_link not in CROSS_NODE_LINKS:
        raise ConfigError(f"cross_node_link={cross_node_link!r} is not a link between nodes",
                          f"use one of {', '.join(CROSS_NODE_LINKS)}")
    by_id = {n.node_id: n for n in nodes}
    where = dict(zip((e.name for e in plan.engines), bundle_nodes, strict=True))
    prefill_nodes = {where[e.name] for e in plan.engines if e.role == "prefill"}
    placed = []
    for i, e in enumerate(plan.engines):
        node = by_id[where[e.name]]
        link = None
        if e.role == "decode":
            link = plan.link if prefill_nodes <= {node.node_id} else cross_node_link
        placed.append(EnginePlacement(e.name, e.role, node.node_id, node.address,
                                      e.config.tp * e.config.pp, i, link))
    used = [n for n in nodes if n.node_id in set(bundle_nodes)]
    notes = [f"{len(plan.engines)} engines on {len(used)} Ray node(s); KV between nodes: "
             f"NixlConnector over {cross_node_link} (simulated engines: "
             "min(NIC peak, NIXL as measured on NVLink), see labkit/hardware.py)"]
    return ClusterPlan(placed, used, proxy_address, plan.link or "nvlink", cross_node_link,
                       notes=notes)


def nodes_from_ray(ray_nodes: list[dict[str, Any]]) -> list[ClusterNode]:
    """ClusterNodes from `ray.nodes()`: alive nodes with at least one GPU."""
    out = []
    for n in ray_nodes:
        gpus = int(n.get("Resources", {}).get("GPU", 0))
        if n.get("Alive") and gpus > 0:
            out.append(ClusterNode(n["NodeID"], n["NodeManagerAddress"], gpus))
    return out
