"""`python -m labkit.bench` (and `labkit bench`): one workload, several configurations, one table.

    python -m labkit.bench --compare pd-vs-colocated --workload prefill-heavy --rate 8
    python -m labkit.bench --engine cluster --model llama-3.1-8b --num-requests 2000 --json out.json
    python -m labkit.bench --mode vllm --compare chunk --workload sharegpt      # on a GPU machine

`--engine http` (default) starts a Lab per variant (real vLLM with --mode vllm, or auto where
GPUs and vLLM exist; the simulated engine processes with --mode sim) and drives it over
HTTP; `--engine cluster` runs the simulator in-process. The table's first line says which.
`labkit.cli` can register the same flags with `add_arguments(parser)` and call `run(args)`.
"""
from __future__ import annotations

import argparse
import math
import sys

from labkit.bench.compare import COMPARISONS
from labkit.bench.workloads import GENERATORS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench flags (shared by `python -m labkit.bench` and `labkit bench`)."""
    p.add_argument("--mode", choices=["auto", "sim", "vllm"], default="auto",
                   help="HTTP engine: real vLLM, the simulator, or real where possible")
    p.add_argument("--engine", choices=["http", "cluster"], default="http",
                   help="http: a Lab per variant + load generator; cluster: in-process simulator")
    p.add_argument("--compare", choices=list(COMPARISONS), default="pd-vs-colocated")
    p.add_argument("--model", default="lab-1b", help="a labkit.models preset")
    p.add_argument("--num-gpus", type=int, default=None,
                   help="GPUs every variant gets (default: 2, or 4 for --compare tp)")
    p.add_argument("--gpu-type", default="h100", help="simulated GPU (GPU_TYPES key)")
    p.add_argument("--workload", choices=["fixed", *GENERATORS], default="sharegpt")
    p.add_argument("--prompt-len", type=int, default=512, help="--workload fixed only")
    p.add_argument("--output-len", type=int, default=64, help="--workload fixed only")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--rates", type=str, default=None, metavar="R1,R2,...",
                   help="a rate sweep (Poisson, per second) instead of --rate: each variant "
                        "serves the same lengths at every rate (over HTTP its Lab starts once)")
    p.add_argument("--burst", type=str, default=None, metavar="SIZE,INTERVAL_S",
                   help="bursts of SIZE requests every INTERVAL_S seconds instead of Poisson")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    p.add_argument("--itl-slo-ms", type=float, default=50.0, help="SLO on each request's TPOT")
    p.add_argument("--speed", type=float, default=1.0,
                   help="simulated Labs: simulated seconds per wall second")
    p.add_argument("--max-duration-s", type=float, default=None,
                   help="stop sending after this many seconds (HTTP)")
    p.add_argument("--run-dir", default=None, help="where the Labs put logs (default: a new run dir)")
    p.add_argument("--json", metavar="PATH", default=None, help="write results (and per-request timings)")


def run(a: argparse.Namespace) -> int:
    """Run the comparison the flags describe; print the table; return an exit code."""
    from labkit.bench.compare import compare
    from labkit.bench.report import SLO, format_table, write_json
    from labkit.bench.workloads import make, rate_sweep
    from labkit.plan import ConfigError

    kw = {"prompt_len": a.prompt_len, "output_len": a.output_len} if a.workload == "fixed" else {}
    burst = None
    if a.burst:
        size, interval = a.burst.split(",")
        burst = (int(size), float(interval))
    rate = math.inf if a.rate <= 0 else a.rate
    if a.rates and burst:
        print("error: --rates and --burst exclude each other", file=sys.stderr)
        return 2
    try:
        rates = [float(r) for r in a.rates.split(",")] if a.rates else []
    except ValueError:
        print(f"error: --rates {a.rates!r}: give numbers, e.g. 2,4,8", file=sys.stderr)
        return 2
    if any(r <= 0 or math.isnan(r) for r in rates):
        print(f"error: --rates {a.rates!r}: every rate must be > 0", file=sys.stderr)
        return 2
    workload = make(a.workload, a.num_requests, rate=rate, seed=a.seed, burst=burst, **kw)
    if rates:
        workload = rate_sweep(a.workload, a.num_requests, rates, seed=a.seed, **kw)
    slo = SLO(a.ttft_slo_ms / 1e3, a.itl_slo_ms / 1e3)
    st = (workload[0] if rates else workload).stats()
    title = (f"labkit bench --compare {a.compare}: {a.model}, {a.workload} x{a.num_requests} "
             f"(prompt mean {st['prompt_mean']:.0f}, output mean {st['output_mean']:.0f} tokens), "
             + (f"bursts {a.burst}" if burst else f"rates {a.rates}/s" if rates
                else f"rate {a.rate:g}/s") + f", seed {a.seed}")
    try:
        results = compare(a.compare, workload, engine=a.engine, mode=a.mode, model=a.model,
                          gpu_type=a.gpu_type, slo=slo, seed=a.seed, speed=a.speed,
                          max_duration_s=a.max_duration_s, run_dir=a.run_dir,
                          num_gpus=a.num_gpus,
                          progress=lambda s: print(s, file=sys.stderr, flush=True))
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(results, title))
    if a.json:
        print(f"wrote {write_json(results, a.json, title=title, with_records=True)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
