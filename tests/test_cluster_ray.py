"""PD across nodes on Ray (labkit/cluster): a local multi-node Ray cluster on this machine.

Three Ray nodes on loopback (a head without GPUs for the driver, two nodes declaring 2 GPUs
each, 80 MB object store and one CPU apiece), a simulated 2P+2D lab across them (prefill on
one node, decode on the other: every KV read crosses "nodes" and is timed as InfiniBand),
200 requests through the proxy with the lab's token, none lost; requests without the token
refused; and after stop no engine, actor or Ray process left (psutil). Skipped where ray is
not installed (`pip install labkit[cluster]`). The placement logic is tested without Ray.
"""

from __future__ import annotations

import importlib.util
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from labkit import hardware, plan
from labkit.cluster.placement import ClusterNode, check_fits, place
from labkit.plan import ConfigError

HAS_RAY = importlib.util.find_spec("ray") is not None
OBJECT_STORE = 80 * 1024 * 1024


def _sim_plan(num_prefill: int = 2, num_decode: int = 2, tp: int = 1) -> plan.Plan:
    from labkit.lab import build_config

    cfg = build_config(num_prefill=num_prefill, num_decode=num_decode, tp=tp, connector="nixl",
                       num_gpus=(num_prefill + num_decode) * tp)
    return plan.validate(cfg, hardware.simulated(cfg.num_gpus, "h100"))


def test_placement_names_nodes_links_and_refuses_what_does_not_fit():
    p = _sim_plan()
    nodes = [ClusterNode("a" * 8, "10.0.0.1", 2), ClusterNode("b" * 8, "10.0.0.2", 2)]
    cp = place(p, nodes, ["a" * 8, "a" * 8, "b" * 8, "b" * 8], proxy_address="10.0.0.9")
    assert [e.address for e in cp.engines] == ["10.0.0.1"] * 2 + ["10.0.0.2"] * 2
    assert cp.cross_node_pairs() == 4 and cp.num_nodes_used == 2
    assert [e.kv_link for e in cp.engines] == [None, None, "rdma", "rdma"]
    # One node holding a prefill and a decode: that decode still reads from the other node.
    mixed = place(p, nodes, ["a" * 8, "b" * 8, "a" * 8, "b" * 8], proxy_address="10.0.0.9",
                  cross_node_link="tcp")
    assert mixed.cross_node_pairs() == 2 and mixed.engine("decode-0").kv_link == "tcp"
    same = place(p, [nodes[0]] * 1 + [ClusterNode("c", "10.0.0.3", 4)], ["c"] * 4,
                 proxy_address="10.0.0.9")
    assert same.cross_node_pairs() == 0 and same.engine("decode-1").kv_link == p.link
    assert any("binds 10.0.0.9" in line and "token" in line for line in cp.lines())
    with pytest.raises(ConfigError, match="needs 2 GPUs on one node"):
        check_fits(_sim_plan(1, 1, tp=2), [ClusterNode("a", "10.0.0.1", 1)] * 4)
    with pytest.raises(ConfigError, match="need 4 GPUs"):
        check_fits(p, [nodes[0]])
    with pytest.raises(ConfigError, match="not a link between nodes"):
        place(p, nodes, ["a" * 8] * 4, proxy_address="x", cross_node_link="nvlink")


def _descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


@pytest.fixture
def ray_cluster(monkeypatch):
    if not HAS_RAY:
        pytest.skip("ray is not installed (pip install labkit[cluster])")
    # Keep every node and the driver on 127.0.0.1 (Ray otherwise swaps loopback for the
    # machine's address); read by Ray at import, so before the first `import ray`.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, num_gpus=0, object_store_memory=OBJECT_STORE, include_dashboard=False))
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=2, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        print(f"Ray cluster of 3 nodes up in {time.monotonic() - t0:.1f} s at {cluster.address}")
        yield cluster
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


@pytest.mark.timeout(240)
def test_2p2d_across_ray_nodes(ray_cluster):
    import labkit
    from labkit.cluster.lab import ClusterLab

    assert ray_cluster.address.startswith("127.0.0.1:")
    lab = labkit.Lab(num_prefill=2, num_decode=2, mode="sim", speed=0, num_gpus=4,
                     cluster=ray_cluster.address)
    assert isinstance(lab, ClusterLab)
    t0 = time.monotonic()
    lab.start(progress=False)
    engine_pids: list[int] = []
    try:
        started = time.monotonic() - t0
        cp = lab.cluster_plan
        print("\n".join(cp.lines()), f"\nstarted in {started:.1f} s")
        # Placed by Ray: each engine's actor runs on the node its bundle names, and
        # prefill and decode sit on different nodes (PACK fills one node's 2 GPUs first).
        assert cp.num_nodes_used == 2 and cp.cross_node_pairs() == 4
        for name, eng in lab.engines.items():
            assert eng.node["node_id"] == cp.engine(name).node_id
            assert eng.base_url.startswith("http://127.0.0.1:") and eng.node["gpu_ids"]
        assert {lab.engines["prefill-0"].node["node_id"]} != {lab.engines["decode-0"].node["node_id"]}
        token = lab.token
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(timeout=30) as c:
            for d in ("decode-0", "decode-1"):
                info = c.get(f"{lab.engines[d].base_url}/labkit/info", headers=auth).json()
                assert info["args"]["kv_link"] == "rdma" and info["connector"] == "nixl"
            # Without the token (or with a wrong one) every endpoint refuses: proxy and engines.
            body = {"model": lab.plan.model.name, "prompt": "hi", "max_tokens": 2}
            for url in (lab.url, lab.engines["prefill-0"].base_url):
                assert c.post(f"{url}/v1/completions", json=body).status_code == 401
                for path in ("/metrics", "/health", "/v1/models"):
                    assert c.get(f"{url}{path}").status_code == 401
                    bad = {"Authorization": "Bearer " + "x" * len(token)}
                    assert c.get(f"{url}{path}", headers=bad).status_code == 401
                assert c.get(f"{url}/v1/models", headers=auth).status_code == 200

        def one(i: int) -> int:
            req = {"model": lab.plan.model.name, "max_tokens": 8, "ignore_eos": True,
                   "prompt": f"request {i}: " + "tell me about disaggregated serving " * (1 + i % 7)}
            with httpx.Client(timeout=60) as c:
                r = c.post(f"{lab.url}/v1/completions", json=req, headers=auth)
                ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
            return int(ok)

        t1 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            num_ok = sum(pool.map(one, range(200)))
        took = time.monotonic() - t1
        print(f"200 requests through the proxy in {took:.1f} s: {num_ok} ok, {200 - num_ok} lost")
        assert num_ok == 200

        # Every decode engine read KV over the simulated cross-node link, no faster than
        # NixlConnector over it can go (min(NIC peak, NVLink as measured) = 12.1 GB/s).
        from labkit.telemetry.metrics import scrape

        link = hardware.achieved_link("nixl", hardware.LINKS["rdma"])
        for d in ("decode-0", "decode-1"):
            snap = scrape(lab.engines[d].base_url)  # sends the token (the lab set it)
            moved = snap.sum("vllm:nixl_bytes_transferred_sum")
            secs = snap.sum("vllm:nixl_xfer_time_seconds_sum")
            external = snap.sum("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
            print(f"{d}: {moved / 1e6:.1f} MB over {secs * 1e3:.2f} ms simulated "
                  f"({moved / secs / 1e9:.2f} GB/s; link: {link.name})")
            assert moved > 0 and external > 0
            assert moved / secs <= link.bandwidth * 1.001

        tail = lab.engines["decode-1"].log_tail(20)
        assert any("Uvicorn running on http://127.0.0.1" in line for line in tail)
        samples = lab.engines["prefill-0"].nvml_samples()
        assert samples is None or all("total_bytes" in s for s in samples)
        for eng in lab.engines.values():
            engine_pids += eng.pids()
        assert len(engine_pids) >= 4 and all(psutil.pid_exists(p) for p in engine_pids)
        proxy_pid = lab.proxy.pid
        engine_ports = [str(e.port) for e in lab.engines.values()]
    finally:
        lab.stop()
    # The lab's stop ended every engine (on its node) and the proxy (on the driver).
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in engine_pids + [proxy_pid]
                                     if psutil.pid_exists(p)], timeout=15)
    assert not alive, [p.cmdline() for p in alive]
    assert not lab.engines and lab.proxy is None
    assert "LABKIT_API_TOKEN" not in os.environ
    # Then the cluster: no Ray process (GCS, raylets, workers) and no engine left behind.
    ray_procs = _descendants()
    assert ray_procs, "the Ray nodes run as children of this test"
    gcs_port = ray_cluster.address.rpartition(":")[2]
    import ray

    ray.shutdown()
    ray_cluster.shutdown()
    gone, alive = psutil.wait_procs(ray_procs, timeout=30)
    assert not alive, [p.cmdline()[:3] for p in alive]
    def ours(cmd: list[str]) -> bool:
        line = " ".join(cmd)
        return gcs_port in line or ("labkit.engines.sim" in line and any(
            cmd[i:i + 2] == ["--port", port] for port in engine_ports for i in range(len(cmd))))

    leftover = [p.info["cmdline"][:3] for p in psutil.process_iter(["cmdline"])
                if ours(p.info["cmdline"] or [])]
    assert not leftover, leftover
