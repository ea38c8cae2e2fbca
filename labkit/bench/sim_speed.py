"""How fast the simulator runs: simulated tokens per CPU-second and a 1,000-request PD run.

    python -m labkit.bench.sim_speed [--requests 1000] [--connector nixl] [--seed 0]

CPU time is `time.process_time()` of this process. The goal: a 1,000-request run on a
4-GPU PD cluster (2 prefill + 2 decode engines of llama-3.1-8b on H100, prompts 512-2048,
outputs 64-256 tokens) in under 1 s of CPU.
"""
from __future__ import annotations

import argparse
import random
import time


def pd_workload(num_requests: int, rate: float = 20.0, seed: int = 0) -> list[tuple[float, int, int]]:
    """Poisson arrivals at `rate` req/s, prompts 512-2048 tokens, outputs 64-256 tokens."""
    rng = random.Random(seed)
    t, items = 0.0, []
    for _ in range(num_requests):
        t += rng.expovariate(rate)
        items.append((t, rng.randint(512, 2048), rng.randint(64, 256)))
    return items


def bench_single_engine(model: str, gpu: str, prompt_len: int, output_len: int, num_requests: int) -> tuple[int, float]:
    """All requests at t=0 on one engine; returns (simulated tokens, CPU seconds)."""
    from labkit.engines.sim.engine import SimEngine

    engine = SimEngine(model, gpu)
    tokens = list(range(1, prompt_len + 1))
    t0 = time.process_time()
    for i in range(num_requests):
        engine.add_request(str(i), [i] + tokens[1:], output_len, arrival_time=0.0)
    while engine.has_unfinished():
        engine.step()
    cpu = time.process_time() - t0
    return num_requests * (prompt_len + output_len), cpu


def bench_pd_cluster(num_requests: int, connector: str, seed: int) -> dict[str, float]:
    """The 1,000-request 2P+2D run; CPU for building the engines and for the run."""
    from labkit.engines.sim.cluster import SimCluster

    workload = pd_workload(num_requests, seed=seed)
    t0 = time.process_time()
    cluster = SimCluster("llama-3.1-8b", "h100", num_prefill=2, num_decode=2, connector=connector,
                         seed=seed)
    t1 = time.process_time()
    records = cluster.run(workload)
    t2 = time.process_time()
    summary = cluster.summary(records)
    tokens = sum(r.prompt_len + r.num_output_tokens for r in records)
    return {"build_cpu_s": t1 - t0, "run_cpu_s": t2 - t1, "tokens": float(tokens), **summary}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--connector", default="nixl", choices=["nixl", "example"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rows = []
    for name, (p, o, n) in {"decode-heavy (128 in, 512 out) x256": (128, 512, 256),
                            "prefill-heavy (2048 in, 16 out) x256": (2048, 16, 256)}.items():
        tokens, cpu = bench_single_engine("llama-3.1-8b", "h100", p, o, n)
        rows.append((f"1 engine, {name}", tokens, cpu))
    pd = bench_pd_cluster(args.requests, args.connector, args.seed)
    rows.append((f"2P+2D {args.connector}, {args.requests} requests (run)", int(pd["tokens"]), pd["run_cpu_s"]))

    print(f"{'simulation':<52} {'sim tokens':>11} {'CPU s':>7} {'tokens/CPU-s':>13}")
    for name, tokens, cpu in rows:
        print(f"{name:<52} {tokens:>11,} {cpu:>7.3f} {tokens / cpu:>13,.0f}")
    total = pd["build_cpu_s"] + pd["run_cpu_s"]
    print(f"\n{args.requests}-request PD run: {pd['finished']:.0f}/{pd['requests']:.0f} finished, "
          f"CPU {pd['run_cpu_s']:.3f} s run + {pd['build_cpu_s']:.3f} s building engines "
          f"= {total:.3f} s (goal < 1 s): {'OK' if total < 1.0 else 'OVER'}")
    print(f"simulated: makespan {pd.get('makespan', 0):.1f} s, TTFT mean {pd.get('ttft_mean', 0) * 1e3:.1f} ms "
          f"p99 {pd.get('ttft_p99', 0) * 1e3:.1f} ms, ITL mean {pd.get('itl_mean', 0) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
