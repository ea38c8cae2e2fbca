"""Side-by-side runs of one workload on several configurations: PD vs colocated, chunk size,
TP, KV-cache dtype.

Two engines run the same variants:
- "http": for each variant a `Lab` starts (real vLLM or the simulated engine processes, on
  the same GPUs / the same simulated machine), the load generator replays the workload
  through its OpenAI endpoint, /metrics is read before and after, the Lab stops.
- "cluster": the same variants in-process on `SimCluster` (simulated clock, no HTTP):
  seconds for thousands of requests, for the notebooks and for large sweeps.

Both build every engine from the planner's `Plan` (labkit.plan.validate), so pool sizes,
chunk sizes and links are the numbers `labkit plan` prints. Every result says whether it is
REAL vLLM (and on which device) or SIMULATED.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit.bench.loadgen import RequestResult, run_load
from labkit.bench.report import DEFAULT_SLO, SLO, BenchResult, engine_delta, summarize
from labkit.bench.workloads import Workload

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Variant:
    """One configuration: `knobs` are `labkit.lab.build_config` keywords.

    `replicas` > 1 (cluster engine only): that many colocated engines behind a round-robin
    router, to compare PD with colocated serving on the same number of GPUs.
    """

    name: str
    knobs: dict[str, Any] = field(default_factory=dict)
    replicas: int = 1

    @property
    def gpus(self) -> int:
        """GPUs the variant needs at least (a PD pair at tp=pp=1 can share one)."""
        return self.replicas * self.knobs.get("tp", 1) * self.knobs.get("pp", 1)

    @property
    def http_ok(self) -> bool:
        return self.replicas == 1


COMPARISONS: dict[str, tuple[int, list[Variant]]] = {  # name -> (GPUs, variants)
    "pd-vs-colocated": (2, [
        Variant("PD 1P+1D", {}),
        Variant("colocated x1", {"colocated": True}),
        Variant("colocated x2 (DP)", {"colocated": True}, replicas=2),
        Variant("colocated TP2", {"colocated": True, "tp": 2}),
    ]),
    # Colocated, the chunk bounds how long a prefill stalls the decodes batched with it
    # (TTFT vs ITL); in PD it only paces the prefill engine.
    "chunk": (2, [Variant(f"{'colocated' if colo else 'PD'} chunk {c}",
                          {"chunk": c, "colocated": colo} if colo else {"chunk": c})
                  for colo in (True, False) for c in (512, 8192)]),
    "tp": (4, [Variant("PD TP1", {"tp": 1}), Variant("PD TP2", {"tp": 2})]),
    "kv-dtype": (2, [Variant("PD kv auto", {"kv_cache_dtype": "auto"}),
                     Variant("PD kv fp8", {"kv_cache_dtype": "fp8"})]),
}


def variants(compare: str, engine: str = "cluster") -> tuple[int, list[Variant]]:
    """(number of GPUs, variants) of a comparison; the HTTP engine skips replicas > 1."""
    try:
        num_gpus, vs = COMPARISONS[compare]
    except KeyError:
        raise ValueError(f"unknown comparison {compare!r}; one of {list(COMPARISONS)}") from None
    return num_gpus, [v for v in vs if engine == "cluster" or v.http_ok]


def _plan(model: str, variant: Variant, num_gpus: int, gpu_type: str, simulated: bool) -> Any:
    from labkit import hardware
    from labkit.lab import build_config
    from labkit.plan import validate

    cfg = build_config(model, num_gpus=num_gpus, gpu_type=gpu_type if simulated else None,
                       **variant.knobs)
    hw = hardware.simulated(num_gpus, gpu_type) if simulated else None
    return validate(cfg, hw)


def _engine_kwargs(ep: Any) -> dict[str, Any]:
    """SimEngine keywords for one planned engine (what SimEngineProcess passes as flags)."""
    c = ep.config
    return {"tp": c.tp, "pp": c.pp, "kv_cache_dtype": ep.kv_cache_dtype,
            "block_size": c.block_size, "max_num_batched_tokens": ep.max_num_batched_tokens,
            "max_num_seqs": c.max_num_seqs, "max_model_len": ep.max_model_len,
            "num_gpu_blocks": ep.num_blocks, "enable_prefix_caching": c.enable_prefix_caching,
            "enable_chunked_prefill": c.enable_chunked_prefill}


# ------------------------------------------------------------------ in-process (SimCluster)
def run_cluster(variant: Variant, workload: Workload, *, model: str = "lab-1b",
                gpu_type: str = "h100", num_gpus: int = 2, slo: SLO = DEFAULT_SLO,
                seed: int = 0, router_latency_s: float | None = None) -> BenchResult:
    """One variant on SimCluster: the same plan as a simulated Lab, no processes, no HTTP.

    Engines the plan puts on one GPU (a PD pair with num_gpus=1) share it; each engine call
    costs `router_latency_s` (default: the API latency calibrated for `gpu_type`, as a real
    client through HTTP pays it).
    """
    from labkit.engines.sim.cluster import SimCluster
    from labkit.engines.sim.cost_model import load_api_latency

    plan = _plan(model, variant, num_gpus, gpu_type, simulated=True)
    eps = plan.engines
    hop = load_api_latency(plan.gpu_type.key) if router_latency_s is None else router_latency_s
    if plan.connector is None:
        cluster = SimCluster(model, gpu_type, num_prefill=variant.replicas, num_decode=0,
                             prefill_kwargs=_engine_kwargs(eps[0]), seed=seed,
                             router_latency_s=hop)
    else:
        cluster = SimCluster(model, gpu_type, num_prefill=1, num_decode=1,
                             connector=plan.connector, link=plan.link,
                             prefill_kwargs=_engine_kwargs(plan.engine("prefill")),
                             decode_kwargs=_engine_kwargs(plan.engine("decode")), seed=seed,
                             router_latency_s=hop,
                             gpus=[plan.engine("prefill").gpus, plan.engine("decode").gpus])
    # The client sees tokens from the engine that finishes the request: decode, or the
    # colocated engine, when they leave its engine core (StepResult.emitted).
    final = {id(e) for e in (cluster.decode_engines or cluster.prefill_engines)}
    token_times: dict[str, list[float]] = {}

    def on_step(engine: Any, res: Any) -> None:
        if id(engine) in final:
            for request, _, t in res.emitted:
                token_times.setdefault(request.request_id, []).append(t)

    cpu0 = time.process_time()
    records = cluster.run(workload.items(), on_step=on_step)
    cpu = time.process_time() - cpu0
    results = [RequestResult(int(r.req_id), r.arrival, r.prompt_len, r.output_len, sent=r.arrival,
                             first_token=r.first_token, token_times=token_times.get(r.req_id, []),
                             finish=r.finish, num_output_tokens=r.num_output_tokens,
                             error=None if r.finish is not None else "not finished")
               for r in records]
    engines = cluster.engines
    side = {
        "kv_transfer_tokens": float(sum(e.stats.prompt_tokens_by_source["external_kv_transfer"]
                                        for e in engines)),
        "kv_transfer_bytes": float(sum(r.transfer_bytes for r in records)),
        "preemptions": float(sum(e.num_preemptions for e in engines)),
        "prefix_hit_tokens": float(sum(e.prefix_cache_stats[1] for e in engines)),
        "prefix_query_tokens": float(sum(e.prefix_cache_stats[0] for e in engines)),
        "cpu_s": cpu,
    }
    used = len({g for ep in eps for g in ep.gpus}) * (variant.replicas if plan.connector is None else 1)
    return BenchResult(variant.name, "sim", f"{num_gpus}x {plan.gpu_type.name}", "cluster",
                       workload.name, used, summarize(results, slo), side,
                       {"knobs": variant.knobs, "replicas": variant.replicas,
                        "connector": plan.connector, "link": plan.link, "model": model}, results)


# ------------------------------------------------------------------ over HTTP (Lab)
def _scrape_all(lab: Any) -> dict[str, Any]:
    from labkit.telemetry.metrics import scrape

    return {name: scrape(e.base_url) for name, e in lab.engines.items()}


def run_http(variant: Variant, workloads: Sequence[Workload], *, mode: str = "sim",
             model: str = "lab-1b", gpu_type: str = "h100", num_gpus: int = 2,
             slo: SLO = DEFAULT_SLO, speed: float = 1.0, max_duration_s: float | None = None,
             run_dir: str | Path | None = None,
             progress: Progress | None = None) -> list[BenchResult]:
    """Start a Lab for `variant`, replay each workload through its OpenAI endpoint (one after
    the other, each to completion: a rate sweep starts the Lab once), stop it; one
    BenchResult per workload, in order."""
    from labkit.lab import Lab, build_config

    gpu = gpu_type if mode == "sim" else None
    cfg = build_config(model, num_gpus=num_gpus, gpu_type=gpu, **variant.knobs)
    lab = Lab(cfg, mode=mode, run_dir=run_dir, speed=speed, observe=False)
    say = progress or (lambda s: None)
    say(f"{variant.name}: {lab.describe()}")
    runs = []
    with lab:
        for wl in workloads:
            before = _scrape_all(lab)
            load = run_load(lab.url, wl, model=lab.plan.model.name,
                            vocab_size=lab.plan.model.vocab_size, max_duration_s=max_duration_s,
                            time_scale=speed if lab.kind == "sim" else 1.0)
            runs.append((wl, load, engine_delta(before, _scrape_all(lab))))
            if len(workloads) > 1:
                say(f"{variant.name}: {_rate_label(wl)} done")
    plan = lab.plan
    used = len({g for ep in plan.engines for g in ep.gpus})
    device = (f"{plan.num_gpus}x {plan.gpu_type.name}" if lab.kind == "sim"
              else _real_device_name(plan))
    return [BenchResult(variant.name, lab.kind, device, "http", wl.name, used,
                        summarize(load.records, slo), delta,
                        {"knobs": variant.knobs, "connector": plan.connector, "link": plan.link,
                         "model": plan.model.name,
                         "url_kind": "proxy" if lab.plan.connector else "engine",
                         "speed": speed}, load.records)
            for wl, load, delta in runs]


def _rate_label(wl: Workload) -> str:
    rate = wl.params.get("rate")
    return "all at once" if rate is None or rate == float("inf") else f"{rate:g}/s"


def _real_device_name(plan: Any) -> str:
    from labkit.plan import detect

    hw = detect()
    name = hw.gpus[0].name if hw.gpus else plan.gpu_type.name
    return f"{len(hw.gpus)}x {name}"


# ------------------------------------------------------------------ one comparison
def compare(compare: str, workload: Workload | Sequence[Workload], *, engine: str = "cluster",
            mode: str = "sim", model: str = "lab-1b", gpu_type: str = "h100",
            slo: SLO = DEFAULT_SLO, seed: int = 0, speed: float = 1.0,
            max_duration_s: float | None = None, run_dir: str | Path | None = None,
            progress: Progress | None = None, num_gpus: int | None = None) -> list[BenchResult]:
    """Run every variant of `compare` on `workload`; one BenchResult per variant.

    Args:
        compare: "pd-vs-colocated" | "chunk" | "tp" | "kv-dtype".
        workload: one workload, or several (a rate sweep, `workloads.rate_sweep`): then one
            result per (variant, workload), rate by rate, named "<variant> @ <rate>/s"; over
            HTTP each variant's Lab starts once for the whole sweep.
        engine: "cluster" (in-process SimCluster) or "http" (a Lab per variant).
        mode: HTTP engine only: "sim" | "vllm" | "auto" (as Lab).
        speed: simulated Labs: simulated seconds per wall second.
        num_gpus: the machine every variant gets (default: the comparison's, 2 or 4); 1
            puts a PD pair on one GPU (ExampleConnector through /dev/shm).
    """
    if engine not in ("cluster", "http"):
        raise ValueError(f"engine must be 'cluster' or 'http', got {engine!r}")
    if engine == "cluster" and mode == "vllm":
        raise ValueError("the cluster engine is the simulator; use engine='http' for real vLLM")
    many = not isinstance(workload, Workload)
    wls = list(workload) if many else [workload]
    default_gpus, vs = variants(compare, engine)
    num_gpus = num_gpus or default_gpus
    vs = [v for v in vs if v.gpus <= num_gpus]  # e.g. no DP/TP2 colocated on one GPU
    per_variant: list[list[BenchResult]] = []
    for v in vs:
        if engine == "cluster":
            rs = [run_cluster(v, wl, model=model, gpu_type=gpu_type, num_gpus=num_gpus,
                              slo=slo, seed=seed) for wl in wls]
        else:
            sub = Path(run_dir) / v.name.replace(" ", "_") if run_dir else None
            rs = run_http(v, wls, mode=mode, model=model, gpu_type=gpu_type, num_gpus=num_gpus,
                          slo=slo, speed=speed, max_duration_s=max_duration_s, run_dir=sub,
                          progress=progress)
        if many:
            for r, wl in zip(rs, wls, strict=True):
                r.variant = f"{v.name} @ {_rate_label(wl)}"
                r.config["rate"] = wl.params.get("rate")
        per_variant.append(rs)
    # rate by rate: the variants of one rate side by side
    return [rs[i] for i in range(len(wls)) for rs in per_variant]
