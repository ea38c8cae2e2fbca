"""Two simulated engines on one GPU take turns for their GPU work (labkit/engines/sim/shared_gpu.py)."""
from __future__ import annotations

import pytest

from labkit.engines.sim.cluster import SimCluster
from labkit.engines.sim.engine import SimEngine
from labkit.engines.sim.shared_gpu import SharedGPU


def replicas(gpus: list[list[int]] | None) -> SimCluster:
    """Two colocated lab-1b engines (round-robin), on the given GPUs."""
    return SimCluster("lab-1b", "h200", num_prefill=2, num_decode=0, gpus=gpus,
                      prefill_kwargs={"num_gpu_blocks": 4000, "max_num_batched_tokens": 8192})


def timings(cluster: SimCluster, work: list[tuple[float, int, int]]) -> list[tuple[float, float]]:
    recs = cluster.run(work)
    assert all(r.finish is not None for r in recs)
    return [(r.first_token, r.finish) for r in recs]


def test_overlapping_gpu_work_takes_longer_on_one_gpu() -> None:
    work = [(0.0, 6000, 4), (0.0, 6000, 4)]  # two long prefills at once, one per engine
    alone = timings(replicas([[0], [1]]), work)
    shared_cluster = replicas([[0], [0]])
    shared = timings(shared_cluster, work)
    gpu_s = shared_cluster.engines[0].cost_model.step_parts(6000, 1, 6000, 6000 * 6001 / 2)[1]
    assert alone[0] == pytest.approx(alone[1])  # the same work on two GPUs: the same times
    # On one GPU the second prefill's GPU part waits for the first one's: one GPU part later.
    assert shared[0][0] == pytest.approx(alone[0][0])
    assert shared[1][0] == pytest.approx(alone[1][0] + gpu_s, rel=1e-6)
    assert shared_cluster.shared_gpu.waited_s[id(shared_cluster.engines[1])] == pytest.approx(gpu_s)


def test_no_overlap_means_identical_timing() -> None:
    work = [(0.0, 2000, 8), (0.5, 2000, 8), (1.0, 300, 16), (1.5, 300, 16)]  # far apart
    assert timings(replicas([[0], [0]]), work) == timings(replicas(None), work)
    assert timings(replicas([[0], [1]]), work) == timings(replicas(None), work)


def test_launch_parts_are_not_serialized() -> None:
    a, b = SimEngine("lab-1b", "h200", num_gpu_blocks=100), SimEngine("lab-1b", "h200", num_gpu_blocks=100)
    share = SharedGPU()
    assert share.attach([a, b], [[0], [0]]) == 2
    # a: launch 0-5 ms, GPU 5-9 ms. b starts at 1 ms: its launch runs meanwhile (CPU), its GPU
    # part waits for a's (9-12 ms), not for a's launch.
    assert share.reserve(a, 0.0, 0.005, 0.004) == pytest.approx(0.009)
    assert share.reserve(b, 0.001, 0.005, 0.003) == pytest.approx(0.012)
    # GPU work that fits before another engine's placed work goes first.
    assert share.reserve(a, 0.0095, 0.0, 0.001) == pytest.approx(0.013)  # after b's 9-12 ms
    assert share.attach([a, b], [[0], [1]]) == 0


def test_pd_pair_on_one_gpu_is_slower_than_on_two() -> None:
    work = [(i * 0.02, 3000, 16) for i in range(12)]  # prefills overlap decode's steps

    def pd(gpus: list[list[int]]) -> float:
        c = SimCluster("lab-1b", "h200", num_prefill=1, num_decode=1, connector="nixl", gpus=gpus,
                       prefill_kwargs={"num_gpu_blocks": 4000}, decode_kwargs={"num_gpu_blocks": 4000})
        recs = c.run(work)
        return sum(r.finish - r.arrival for r in recs)

    assert pd([[0], [0]]) > pd([[0], [1]])
