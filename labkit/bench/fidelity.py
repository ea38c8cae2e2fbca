"""How close the calibrated simulator comes to real vLLM: the same seeded workloads on both.

Real side: a `Lab(mode="vllm")` per layout (one colocated engine; a PD pair on one GPU through
ExampleConnector; a PD pair on two GPUs through NIXL), the load generator through `lab.url`,
/metrics of every engine before and after. Simulated side: `SimCluster` in-process with the same plan (same block count, chunk,
connector) and the fitted cost constants; the API latency the calibration measured is the
router hop, paid once per engine call (PD: prefill's call, then decode's); the simulated
engines schedule asynchronously, as vLLM 0.26 does by default, and the PD pair shares its one
GPU as the plan says (their GPU work is serialized there).

Table per layout and workload: TTFT and TPOT median and p90, real vs sim, relative error; and
the engine counters both sides report (prompt tokens by source, prefix-cache queries/hits,
preemptions, generation tokens), compared exactly. PD cases whose real run kept the proxy's
per-request times ("phases") also get `phase_table`: prefill side, decode side and proxy
TTFT medians, real vs simulated (SimCluster's records in the proxy's terms, `sim_phases`).

    python -m labkit.bench.fidelity --costs labkit/data/costs/h200.json --out DIR
    python -m labkit.bench.fidelity --costs ... --real A.json --real B.json   # re-run the sim side
    python -m labkit.bench.fidelity --costs ... --bench bench-8b-h200x2.json     # a bench sweep

Given saved real runs, the simulated side runs every case they hold (layout / workload), and
one table prints with the median error over all cases and per file. A file's model is its
"model" key, else a labkit.models preset named in its file name, else lab-1b (`--model`
overrides). `--bench` re-runs a real `labkit.bench --json` sweep on the simulator (the
command its title records) and prints `bench_table`.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from labkit.bench.loadgen import RequestResult
from labkit.bench.phases import (  # noqa: F401  (re-exported)
    PHASE_EVENTS,
    PHASE_SPANS,
    phase_spans,
    phase_table,
    proxy_phases,
    rel_error,
    sim_phases,
)
from labkit.bench.workloads import Workload, decode_heavy, prefill_heavy


class Layout(Mapping[str, Any]):
    """A measured layout: `build_config` knobs (a mapping: `Lab(**layout)` passes them) and the
    number of GPUs its Lab takes (`num_gpus`, not a knob)."""

    def __init__(self, knobs: dict[str, Any], num_gpus: int = 1) -> None:
        self.knobs = dict(knobs)
        self.num_gpus = num_gpus

    def __getitem__(self, key: str) -> Any:
        return self.knobs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.knobs)

    def __len__(self) -> int:
        return len(self.knobs)

    def __repr__(self) -> str:
        return f"Layout({self.knobs!r}, num_gpus={self.num_gpus})"


LAYOUTS: dict[str, Layout] = {
    "colocated": Layout({"colocated": True, "num_gpu_blocks": 16384}),
    "pd-example": Layout({"connector": "example", "num_gpu_blocks": 16384}),  # one GPU, /dev/shm
    "pd-nixl": Layout({"connector": "nixl", "num_gpu_blocks": 16384}, num_gpus=2),  # GPU 0 -> 1
}
SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
COUNTERS = {  # key -> (vLLM metric, labels)
    **{f"prompt_{s}": ("vllm:prompt_tokens_by_source_total", {"source": s}) for s in SOURCES},
    "prefix_queries": ("vllm:prefix_cache_queries_total", {}),
    "prefix_hits": ("vllm:prefix_cache_hits_total", {}),
    "preemptions": ("vllm:num_preemptions_total", {}),
    "generation_tokens": ("vllm:generation_tokens_total", {}),
}


def workloads(n: int = 40) -> list[Workload]:
    """Small seeded workloads at fixed Poisson rates: one prefill-heavy, one decode-heavy."""
    return [prefill_heavy(n, rate=8.0, seed=11),
            decode_heavy(n, rate=4.0, seed=12, output=(128, 256))]


# ------------------------------------------------------------------ timing statistics
def timing(records: list[RequestResult]) -> dict[str, float]:
    """TTFT and TPOT median / p90 (seconds) over the finished requests."""
    ok = [r for r in records if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    out = {"num_ok": float(len(ok))}
    for name, xs in (("ttft", ttft), ("tpot", tpot)):
        out[f"{name}_p50"] = float(np.median(xs)) if xs else math.nan
        out[f"{name}_p90"] = float(np.percentile(xs, 90)) if xs else math.nan
    return out


def rows(real: dict[str, Any], sim: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (layout, workload): timings with errors and counter (real, sim) pairs."""
    out = []
    for key, r in real.items():
        s = sim[key]
        row: dict[str, Any] = {"case": key}
        for m in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"):
            row[m] = (r["timing"][m], s["timing"][m], rel_error(s["timing"][m], r["timing"][m]))
        row["counts"] = {f"{eng}.{c}": (r["counts"].get(eng, {}).get(c), s["counts"].get(eng, {}).get(c))
                         for eng in sorted(set(r["counts"]) | set(s["counts"]))
                         for c in COUNTERS}
        out.append(row)
    return out


def median_abs_error(table: list[dict[str, Any]]) -> float:
    """The median over cases of |error| of the two medians (TTFT p50, TPOT p50)."""
    errs = [abs(row[m][2]) for row in table for m in ("ttft_p50", "tpot_p50")
            if not math.isnan(row[m][2])]
    return float(np.median(errs)) if errs else math.nan


def format_table(table: list[dict[str, Any]]) -> str:
    """Markdown: timings real/sim/error, then counters that differ or match."""
    head = ["| case | TTFT p50 real / sim (err) | TTFT p90 | TPOT p50 | TPOT p90 |",
            "| --- | --- | --- | --- | --- |"]
    for row in table:
        cells = [f"{row[m][0] * 1e3:.1f} / {row[m][1] * 1e3:.1f} ms ({row[m][2]:+.0%})"
                 for m in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")]
        head.append(f"| {row['case']} | " + " | ".join(cells) + " |")
    head += ["", "| case | counter | real | sim | equal |", "| --- | --- | --- | --- | --- |"]
    for row in table:
        for name, (a, b) in row["counts"].items():
            if a is None and b is None:
                continue
            head.append(f"| {row['case']} | {name} | {_n(a)} | {_n(b)} | {'yes' if a == b else 'no'} |")
    return "\n".join(head)


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


# ------------------------------------------------------------------ the two sides
def _role(name: str) -> str:
    """Engine names of both sides onto one key: 'prefill', 'decode' or 'colocated'."""
    for role in ("prefill", "decode"):
        if name.startswith(role):
            return role
    return "colocated"


def run_real(layout: str, wls: list[Workload], run_dir: str | Path | None = None,
             progress: Any = print) -> dict[str, Any]:
    """One real Lab of `layout` (on its `num_gpus`), every workload through `lab.url`."""
    from labkit.lab import Lab

    lay = LAYOUTS[layout]
    with Lab(mode="vllm", num_gpus=lay.num_gpus, observe=False, run_dir=run_dir, **lay) as lab:
        return measure_lab(lab, layout, wls, progress)


def measure_lab(lab: Any, layout: str, wls: list[Workload], progress: Any = print) -> dict[str, Any]:
    """Every workload through a running Lab's `lab.url`, with /metrics before and after."""
    from labkit.bench.loadgen import run_load
    from labkit.telemetry.metrics import scrape

    out: dict[str, Any] = {}
    colocated = lab.plan.connector is None
    for wl in wls:
        before = {n: scrape(e.base_url) for n, e in lab.engines.items()}
        res = run_load(lab.url, wl, model=lab.plan.model.name, vocab_size=lab.plan.model.vocab_size)
        after = {n: scrape(e.base_url) for n, e in lab.engines.items()}
        counts = {("colocated" if colocated else _role(n)): {
            k: after[n].sum(m, **lb) - before[n].sum(m, **lb) for k, (m, lb) in COUNTERS.items()}
            for n in lab.engines}
        key = f"{layout}/{wl.name}"
        out[key] = {"timing": timing(res.records), "counts": counts,
                    "records": [asdict(r) for r in res.records]}
        if not colocated:
            out[key]["phases"] = proxy_phases(lab.url, len(wl))
        progress(f"real {key}: {out[key]['timing']}")
    return out


def run_sim(layout: str, wls: list[Workload], costs: dict[str, Any], gpu_type: str = "h200",
            model: str = "lab-1b") -> dict[str, Any]:
    """The same layout and workloads on SimCluster with the costs file's constants."""
    from labkit.bench.compare import Variant, _engine_kwargs, _plan
    from labkit.engines.sim.cluster import SimCluster
    from labkit.engines.sim.cost_model import CostParams

    params = CostParams(**{k: v for k, v in costs.items() if k in CostParams.__dataclass_fields__})
    hop = float(costs.get("calibration", {}).get("api_latency_s", 0.0))
    lay = LAYOUTS[layout]
    plan = _plan(model, Variant(layout, dict(lay)), lay.num_gpus, gpu_type, simulated=True)
    out: dict[str, Any] = {}
    for wl in wls:
        if plan.connector is None:
            kw = {**_engine_kwargs(plan.engines[0]), "cost_params": params}
            cluster = SimCluster(model, gpu_type, num_prefill=1, num_decode=0, prefill_kwargs=kw,
                                 router_latency_s=hop, seed=wl.seed)
        else:
            cluster = SimCluster(model, gpu_type, num_prefill=1, num_decode=1,
                                 connector=plan.connector, link=plan.link, router_latency_s=hop,
                                 prefill_kwargs={**_engine_kwargs(plan.engine("prefill")),
                                                 "cost_params": params},
                                 decode_kwargs={**_engine_kwargs(plan.engine("decode")),
                                                "cost_params": params}, seed=wl.seed,
                                 gpus=[plan.engine("prefill").gpus, plan.engine("decode").gpus])
        final = {id(e) for e in (cluster.decode_engines or cluster.prefill_engines)}
        times: dict[str, list[float]] = {}

        def on_step(engine: Any, res: Any, final: set[int] = final,
                    times: dict[str, list[float]] = times) -> None:
            if id(engine) in final:  # a token reaches the client when it leaves the engine
                for request, _, t in res.emitted:
                    times.setdefault(request.request_id, []).append(t)

        recs = cluster.run(wl.items(), on_step=on_step)
        results = [RequestResult(int(r.req_id), r.arrival, r.prompt_len, r.output_len, sent=r.arrival,
                                 first_token=r.first_token, token_times=times.get(r.req_id, []),
                                 finish=r.finish, num_output_tokens=r.num_output_tokens,
                                 error=None if r.finish is not None else "not finished")
                   for r in recs]
        counts = {}
        for e in cluster.engines:
            by = e.stats.prompt_tokens_by_source
            q, h = e.prefix_cache_stats
            counts["colocated" if plan.connector is None else _role(e.engine_id)] = {
                **{f"prompt_{s}": float(by[s]) for s in SOURCES}, "prefix_queries": float(q),
                "prefix_hits": float(h), "preemptions": float(e.num_preemptions),
                "generation_tokens": float(e.stats.generation_tokens)}
        out[f"{layout}/{wl.name}"] = {"timing": timing(results), "counts": counts}
        if plan.connector is not None:
            out[f"{layout}/{wl.name}"]["phases"] = sim_phases(recs)
    return out


def split_case(key: str) -> tuple[str, str]:
    """'layout/workload' -> (layout, workload)."""
    layout, _, workload = key.partition("/")
    return layout, workload


def sim_for(real: dict[str, Any], costs: dict[str, Any], gpu_type: str, n: int = 40,
            model: str = "lab-1b") -> dict[str, Any]:
    """The simulated side of every case (layout / workload) a real run holds."""
    by_name = {wl.name: wl for wl in workloads(n)}
    wanted: dict[str, list[str]] = {}
    for key in real:
        layout, wl = split_case(key)
        if layout not in LAYOUTS or wl not in by_name:
            raise ValueError(f"unknown fidelity case {key!r} (layouts {list(LAYOUTS)}, "
                             f"workloads {list(by_name)})")
        wanted.setdefault(layout, []).append(wl)
    sim: dict[str, Any] = {}
    for layout, names in wanted.items():
        sim.update(run_sim(layout, [by_name[w] for w in names], costs, gpu_type, model))
    return sim


def file_model(path: str | Path, doc: dict[str, Any]) -> str:
    """The model a saved real run used: its "model" key, else the longest labkit.models
    preset its file name contains, else lab-1b."""
    from labkit.models import PRESETS

    if doc.get("model"):
        return str(doc["model"])
    named = [m for m in PRESETS if m in Path(path).name]
    return max(named, key=len) if named else "lab-1b"


def sim_bench(real: dict[str, Any], gpu_type: str) -> dict[str, Any]:
    """The simulator's run of the `labkit.bench` command a real sweep's title records
    ("labkit bench --compare C: MODEL, WORKLOAD xN (...), rates R1,R2/s, seed S"), on the
    same number of GPUs; in-process (`--engine cluster`), costs from labkit/data/costs."""
    import re

    from labkit.bench.compare import compare
    from labkit.bench.workloads import rate_sweep

    m = re.match(r"labkit bench --compare (\S+): (\S+), (\S+) x(\d+) .*rates ([\d.,]+)/s, seed (\d+)",
                 real["title"])
    if m is None:
        raise ValueError(f"not a rate sweep title: {real['title']!r}")
    cmp_, model, wl, n, rates, seed = m.groups()
    num_gpus = max(r["num_gpus"] for r in real["results"])
    wls = rate_sweep(wl, int(n), [float(r) for r in rates.split(",")], seed=int(seed))
    results = compare(cmp_, wls, engine="cluster", mode="sim", model=model, gpu_type=gpu_type,
                      seed=int(seed), num_gpus=num_gpus)
    return {"results": [{"variant": r.variant, "summary": r.summary} for r in results]}


def _summary(tables: dict[str, list[dict[str, Any]]]) -> str:
    """Median |error| over all cases, then per file."""
    rows_all = [row for t in tables.values() for row in t]
    lines = [f"median |error| of the medians: {median_abs_error(rows_all):.1%} "
             f"({len(rows_all)} cases)"]
    if len(tables) > 1:
        lines += [f"  {name}: {median_abs_error(t):.1%} ({len(t)} cases)" for name, t in tables.items()]
    return "\n".join(lines)


def bench_table(real: dict[str, Any], sim: dict[str, Any]) -> str:
    """Out-of-sample check: a real `labkit.bench --json` file against the simulator's run of the
    same command (`--engine cluster`); TTFT / ITL p50 and p99 per variant, in ms, with errors.
    Variants are matched by name ("PD 1P+1D @ 2/s"); those only one side has are left out."""
    sims = {r["variant"]: r["summary"] for r in sim["results"]}
    head = ["| variant | TTFT p50 real / sim (err) | TTFT p99 | ITL p50 | ITL p99 |",
            "| --- | --- | --- | --- | --- |"]
    for r in real["results"]:
        s = sims.get(r["variant"])
        if s is None:
            continue
        cells = []
        for m in ("ttft", "itl"):
            for q in ("p50", "p99"):
                a, b = r["summary"][m][q], s[m][q]
                cells.append(f"{a * 1e3:.1f} / {b * 1e3:.1f} ({rel_error(b, a):+.0%})")
        head.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(head)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="labkit fidelity", description=__doc__.split("\n")[0])
    ap.add_argument("--costs", required=True, help="a costs JSON (labkit.bench.calibrate's output)")
    ap.add_argument("--gpu-type", help="simulated GPU (default: the costs file's 'gpu')")
    ap.add_argument("--out", default=".", help="folder for fidelity.json and fidelity.md")
    ap.add_argument("--real", action="append", default=[],
                    help="a saved real run ({'real': ...}; repeat for several): only run the sim")
    ap.add_argument("--layouts", default="colocated,pd-example",
                    help="layouts to run for real when no --real is given")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--model", help="the model of every --real file (default: per file, file_model)")
    ap.add_argument("--bench", action="append", default=[],
                    help="a real `labkit.bench --json` rate sweep: print real vs simulated rows")
    a = ap.parse_args(argv)
    costs = json.loads(Path(a.costs).read_text())
    gpu_type = a.gpu_type or costs.get("gpu", "h200")
    out = Path(a.out)
    if a.bench:
        for path in a.bench:
            real = json.loads(Path(path).read_text())
            sim = sim_bench(real, gpu_type)
            print(f"{Path(path).stem} (simulated {gpu_type})\n{bench_table(real, sim)}\n")
        return 0
    reals: dict[str, dict[str, Any]] = {}
    models: dict[str, str] = {}
    if a.real:
        for path in a.real:
            doc = json.loads(Path(path).read_text())
            reals[Path(path).stem] = doc["real"]
            models[Path(path).stem] = a.model or file_model(path, doc)
    else:
        wls = workloads(a.requests)
        real: dict[str, Any] = {}
        for lay in a.layouts.split(","):
            real.update(run_real(lay, wls, run_dir=out / f"run-{lay}"))
        reals["real"] = real
    sims = {name: sim_for(real, costs, gpu_type, a.requests, models.get(name, a.model or "lab-1b"))
            for name, real in reals.items()}
    tables = {name: rows(real, sims[name]) for name, real in reals.items()}
    if len(tables) > 1:  # case names say which file they come from
        for name, t in tables.items():
            for row in t:
                row["case"] = f"{name}: {row['case']}"
    table = [row for t in tables.values() for row in t]
    text = format_table(table) + "\n\n" + _summary(tables) + "\n"
    for name, real in reals.items():
        phases = phase_table(real, sims[name])
        if phases:
            text += f"\nPD phases, medians ({name}):\n{phases}\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.md").write_text(text)
    doc: dict[str, Any] = {"table": table, "costs": costs, "gpu_type": gpu_type,
                           "files": {n: {"real": reals[n], "sim": sims[n]} for n in reals}}
    if len(reals) == 1:  # the format --real reads back
        (only,) = reals
        doc.update(real=reals[only], sim=sims[only])
    (out / "fidelity.json").write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
