"""ClusterLab: a Lab whose engines run on Ray nodes; the proxy and telemetry stay on the driver.

    Lab(num_prefill=2, num_decode=2, cluster="auto")      # `Lab(cluster=...)` makes one
      plan (labkit.plan)  ->  placement group, one bundle per engine ({"GPU": tp*pp}, PACK)
      EngineActor per engine, in its bundle  ->  the engine as a subprocess on that node
      PD proxy + LiveTelemetry on the driver  ->  the engines' URLs on their nodes

What changes against a one-host Lab, and why:
- Every endpoint binds a node's address (named in `cluster_plan`), not 127.0.0.1, so the lab
  makes a random bearer token (labkit.auth) that the engines, the proxy and the lab's own
  clients use; `lab.token` is what a user's client sends. Real vLLM gets it as VLLM_API_KEY.
- No ZMQ telemetry (observer events, KV events): those sockets carry no token, so a cluster
  lab keeps them off (observe=False) and the views get /metrics and the proxy's timeline;
  routing is round-robin or least-loaded (kv-aware needs the KV events).
- The connector is NixlConnector: decode reads prefill's blocks over the network; the
  simulated engines time a cross-node read by `cross_node_link` (hardware.achieved_link).
- Real vLLM engines get `--distributed-executor-backend ray`; the model directory must exist
  at the same path on every node (a shared file system, or an HF name with
  LABKIT_REAL_WEIGHTS=1). Not yet run on real nodes (docs/xpyd.md, "Ray").
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from labkit.cluster.actor import PYTHON, EngineActor
from labkit.cluster.placement import ClusterPlan, bundles, check_fits, nodes_from_ray, place
from labkit.lab import Lab, Progress, ProxyProcess, _progress
from labkit.plan import ConfigError


class RayEngine:
    """The driver's handle of one engine on a Ray node (what Lab uses of an EngineHandle)."""

    def __init__(self, name: str, role: str, kind: str, actor: Any, host: str, port: int,
                 node: dict[str, Any]) -> None:
        self.name, self.role, self.kind = name, role, kind
        self.actor, self.host, self.port, self.node = actor, host, port, node
        self.kv_events_endpoint: str | None = None  # no ZMQ across nodes (no token there)
        self.observer_endpoint: str | None = None
        self.pgid: int | None = None  # on another node: the actor owns the process group
        self.log_path = Path(node["run_dir"]) / f"{name}.log"  # on the engine's node
        self.startup = None
        self.gpus: list[int] = []

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _call(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
        import ray

        return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout)

    def is_alive(self) -> bool:
        try:
            return bool(self._call("is_alive", timeout=10.0))
        except Exception:  # noqa: BLE001 - a dead actor or node: not alive
            return False

    def pids(self) -> list[int]:
        """The engine's process group on its node."""
        return self._call("pids")

    def group_pids(self) -> list[int]:
        return []  # pids of another node mean nothing to the driver's psutil

    def log_tail(self, num_lines: int = 50) -> list[str]:
        return self._call("log_tail", num_lines)

    def nvml_samples(self) -> list[dict[str, Any]] | None:
        """The engine node's GPUs as NVML sees them; None where the node has no NVML."""
        return self._call("nvml_samples")

    def stop(self, timeout: float = 20.0) -> int | None:
        import ray

        try:
            return self._call("stop", timeout=timeout)
        except Exception:  # noqa: BLE001 - actor already gone: its engine died with it
            return None
        finally:
            ray.kill(self.actor)

    def __repr__(self) -> str:
        return f"<RayEngine {self.name} {self.role} {self.base_url} node={self.node['node_id'][:8]}>"


class ClusterLab(Lab):
    """A Lab across the nodes of a Ray cluster (`labkit[cluster]`).

    Args:
        cluster: "auto" (the running cluster: $RAY_ADDRESS or `ray start`'s), "ray://host:port"
            (Ray Client) or a GCS address "host:port"; the driver joins it.
        cross_node_link: what KV crosses nodes over: "rdma" (InfiniBand NDR 400 Gb/s per GPU),
            "roce" (200 GbE) or "tcp" (25 GbE); simulated engines time their reads by it.
        proxy_address: where the proxy binds (default: the driver's Ray node address).
        **kwargs: Lab's keywords (num_prefill, num_decode, mode, speed, routing_policy, ...).
    """

    def __init__(self, config: Any = None, *, cluster: str = "auto",
                 cross_node_link: str = "rdma", proxy_address: str | None = None,
                 **kwargs: Any) -> None:
        from labkit.auth import new_token

        if kwargs.get("observe"):
            raise ConfigError("observe=True needs ZMQ sockets that carry no token",
                              "leave observe off on a cluster lab (the views use /metrics "
                              "and the proxy's timeline)")
        kwargs["observe"] = False
        if kwargs.get("routing_policy") == "kv-aware":
            raise ConfigError("kv-aware routing needs the engines' KV events (ZMQ, no token)",
                              "use routing_policy='round-robin' or 'least-loaded'")
        kwargs.setdefault("connector", "nixl")
        super().__init__(config, **kwargs)
        if self.plan.connector != "nixl":
            raise ConfigError(f"connector {self.plan.connector!r} cannot move KV between nodes",
                              "use connector='nixl' on a cluster lab")
        if cross_node_link not in ("rdma", "roce", "tcp"):
            raise ConfigError(f"cross_node_link={cross_node_link!r} is not a link between nodes",
                              "use 'rdma', 'roce' or 'tcp'")
        self.cluster, self.cross_node_link = cluster, cross_node_link
        self.proxy_address = proxy_address
        self.token = new_token()
        self.cluster_plan: ClusterPlan | None = None
        self._pg: Any = None
        self._ray_started = False
        self._old_token: str | None = None

    def describe(self) -> str:
        return super().describe() + f"; on Ray cluster {self.cluster!r}, KV across nodes over " \
                                    f"{self.cross_node_link}"

    # ------------------------------------------------------------------ start / stop
    def _connect(self) -> None:
        import ray

        if not ray.is_initialized():
            address = None if self.cluster == "auto" and not os.environ.get("RAY_ADDRESS") \
                else self.cluster
            ray.init(address=address or "auto", logging_level="WARNING",
                     log_to_driver=False, include_dashboard=False)
            self._ray_started = True

    def start(self, progress: Progress | bool = True, timeout: float = 300.0) -> ClusterLab:
        """Reserve the GPUs, start every engine on its node, then the proxy on the driver."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from labkit.auth import TOKEN_ENV

        report = _progress(progress, self.describe())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            report("joining the Ray cluster", 0.05)
            self._connect()
            nodes = nodes_from_ray(ray.nodes())
            check_fits(self.plan, nodes)
            report("reserving GPUs (placement group)", 0.1)
            self._pg = placement_group(bundles(self.plan), strategy="PACK",
                                       name=f"labkit-{self.run_dir.name}")
            ray.get(self._pg.ready(), timeout=min(timeout, 60.0))
            table = placement_group_table(self._pg)["bundles_to_node_id"]
            proxy_address = self.proxy_address or ray.util.get_node_ip_address()
            self.cluster_plan = place(self.plan, nodes, [table[i] for i in range(len(table))],
                                      proxy_address=proxy_address,
                                      cross_node_link=self.cross_node_link)
            (self.run_dir / "cluster-plan.txt").write_text("\n".join(self.cluster_plan.lines()))
            report("starting engines on their nodes", 0.2)
            remote = ray.remote(EngineActor)
            model_dir = self._model_path = self._model_dir()
            for ep in self.cluster_plan.engines:
                actor = remote.options(
                    num_cpus=0, num_gpus=ep.num_gpus, name=f"labkit-{self.run_dir.name}-{ep.name}",
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self._pg, placement_group_bundle_index=ep.bundle_index),
                ).remote(ep.name)
                node, port = ray.get([actor.node.remote(), actor.free_port.remote(ep.address)])
                argv, env = self._command(ep.name, model_dir, ep.address, port, ep.kv_link)
                ray.get(actor.start.remote(argv, {**env, TOKEN_ENV: self.token}, ep.address,
                                           port))
                self.engines[ep.name] = RayEngine(ep.name, ep.role, self.kind, actor,
                                                  ep.address, port, node)
            with ThreadPoolExecutor(len(self.engines)) as pool:
                list(pool.map(lambda e: ray.get(e.actor.wait_ready.remote(timeout)),
                              self.engines.values()))
            report("engines ready", 0.85)
            self._old_token = os.environ.get(TOKEN_ENV)
            os.environ[TOKEN_ENV] = self.token  # the proxy inherits it; the lab's clients send it
            self._start_proxy(self.port)
            self._write_state()
            report("ready", 1.0)
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self, name: str, model_dir: str, host: str, port: int,
                 kv_link: str | None) -> tuple[list[str], dict[str, str]]:
        """Engine `name`'s argument list (PYTHON for the node's interpreter) and env."""
        if self.kind == "vllm":
            from labkit.plan import vllm_args

            args = vllm_args(None, self.plan, name, model_dir, port,
                             {"run_dir": str(self.run_dir), "host": host,
                              "distributed_executor_backend": "ray",
                              "served_model_name": self.plan.model.name})
            # vLLM reads its API key from the environment too (not in `ps`); NIXL's side
            # channel listens on the node's address.
            return ["vllm", "serve", *args], {"VLLM_API_KEY": self.token,
                                              "VLLM_NIXL_SIDE_CHANNEL_HOST": host}
        from labkit.engines.sim.process import SimEngineProcess

        proc = SimEngineProcess(
            name, plan=self.plan, plan_key=name, run_dir=self.run_dir, speed=self.speed,
            fast=self.speed == 0, host=host, port=port, served_model_name=self.plan.model.name,
            kv_load_timeout=self.kv_load_timeout, kv_link=kv_link)
        return [PYTHON, *proc.command()[1:]], {}

    def _start_proxy(self, port: int | None = None) -> None:
        pre = [e for e in self.engines.values() if e.role == "prefill"]
        dec = [e for e in self.engines.values() if e.role == "decode"]
        assert self.cluster_plan is not None
        self.proxy = ProxyProcess(
            [e.base_url for e in pre], [e.base_url for e in dec], "nixl", self.read_timeout,
            prefill_names=[e.name for e in pre], decode_names=[e.name for e in dec],
            policy=self.routing_policy, block_size=self.plan.engines[0].config.block_size,
            kind=self.kind, port=port, host=self.cluster_plan.proxy_address,  # type: ignore[arg-type]
            log_path=self.run_dir / "proxy.log")
        self.proxy.start()
        self.proxy.wait_ready(60)

    def stop(self) -> None:
        """Stop the proxy and telemetry, every engine and its actor, the placement group,
        and the driver's Ray connection where this lab opened it."""
        from labkit.auth import TOKEN_ENV

        super().stop()  # telemetry, proxy, engines (RayEngine.stop: the actor stops its engine)
        self.engines = {}
        if self._pg is not None:
            import ray
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001 - the cluster is gone already
                pass
            self._pg = None
            if self._ray_started:
                ray.shutdown()
                self._ray_started = False
        if self._old_token is None:
            os.environ.pop(TOKEN_ENV, None)
        elif os.environ.get(TOKEN_ENV) == self.token:
            os.environ[TOKEN_ENV] = self._old_token

    def is_running(self) -> bool:
        return bool(self.engines) and all(e.is_alive() for e in self.engines.values())

    def restart_engine(self, name: str, timeout: float = 120.0) -> Any:
        raise NotImplementedError("restarting one engine of a cluster lab: stop and start it")
