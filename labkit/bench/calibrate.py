"""`labkit calibrate`: fit the simulator's cost constants to one real vLLM engine.

Probes go through the engine's OpenAI endpoint (labkit.bench.loadgen):
- prefill probes: one request of P prompt tokens, max_tokens=1; TTFT = API latency + the
  prompt's prefill steps (chunks of max_num_batched_tokens);
- decode probes: B requests at once, ignore_eos; the median inter-token latency is one decode
  step at batch B (context = prompt + half the output).

The cost model (labkit/engines/sim/cost_model.py) predicts each probe as
    sum over steps [max(mm / matmul_eff + attn / attention_eff, mem / memory_eff)
                    + step_overhead_s + per_layer_overhead_s * layers
                    + per_request_overhead_s * reqs] + api_latency_s * prefill
For fixed efficiencies the rest is linear, so the fit searches the three efficiencies on a
log grid (refined around the best) and solves the linear part by non-negative least squares
on relative errors. The per-step and per-layer launch costs separate only with probes of
models of different depths (with --enforce-eager vLLM launches every layer's kernels each
step): `fit(..., models={name: shape})` fits one set of constants to all of them; with one
model the per-layer part stays 0 and its share sits in step_overhead_s. The result is
written as labkit/data/costs/<gpu>.json with "calibrated": true and the probe table.

    python -m labkit.bench.calibrate --gpu-type h200 --out labkit/data/costs/h200.json
    # refit from stored probe sets (no GPU), one file per model (FILE=MODEL overrides its model):
    python -m labkit.bench.calibrate --gpu-type h200 --out labkit/data/costs/h200.json \
        --probes labkit/data/costs/h200.json \
        --probes labkit/data/calibration/h200-llama-3.1-8b-2026-11-21.json=llama-3.1-8b
"""
from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from labkit.engines.sim.cost_model import COSTS_DIR, CostModel, CostParams, load_cost_params

PREFILL_LENS = (128, 512, 1024, 2048, 4096, 8000)
# (batch, prompt_len, output_len): short prompts at growing batch, then long context.
DECODE_SHAPES = ((1, 64, 64), (8, 64, 64), (32, 64, 64), (64, 64, 64), (128, 64, 64),
                 (64, 2048, 32))
EFFS = ("matmul_efficiency", "attention_efficiency", "memory_efficiency")
LINEAR = ("step_overhead_s", "per_request_overhead_s", "api_latency_s", "per_layer_overhead_s")


@dataclass
class Probe:
    """One measured probe. `measured_s`: TTFT (prefill) or median ITL (decode)."""

    kind: str  # "prefill" | "decode"
    prompt_len: int
    batch: int = 1
    output_len: int = 1
    measured_s: float = math.nan
    predicted_s: float = math.nan
    model: str = ""  # the labkit.models preset probed ("": the fit's `model` argument)


def probe_steps(p: Probe, chunk: int) -> list[tuple[int, int, float, float]]:
    """The engine steps (num_tokens, num_reqs, sum_context, attn_pairs) a probe's time spans,
    counted as the simulated scheduler counts them (labkit/engines/sim/scheduler.py)."""
    if p.kind == "prefill":
        steps, done = [], 0
        while done < p.prompt_len:
            n = min(chunk, p.prompt_len - done)
            steps.append((n, 1, float(done + n), float(n * done + n * (n + 1) // 2)))
            done += n
        return steps
    ctx = p.prompt_len + p.output_len // 2
    return [(p.batch, p.batch, float(p.batch * ctx), float(p.batch * (ctx + 1)))]


def _unit_model(model: Any, gpu: Any, base: CostParams) -> CostModel:
    """A cost model with every efficiency 1 and no overheads: its parts scale by 1/eff."""
    unit = replace(base, matmul_efficiency=1.0, attention_efficiency=1.0, memory_efficiency=1.0,
                   step_overhead_s=0.0, per_request_overhead_s=0.0)
    return CostModel(model, gpu, params=unit)


def _shape(p: Probe, model: Any, models: Mapping[str, Any] | None) -> Any:
    """The model shape a probe ran (its `model` in `models`, else the fit's `model`)."""
    return (models or {}).get(p.model, model) if p.model else model


def features(probes: list[Probe], model: Any, gpu: Any, chunk: int, base: CostParams,
             models: Mapping[str, Any] | None = None, chunks: Mapping[str, int] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Per probe and step: (matmul s, attention s, memory s) at efficiency 1 -> array
    [probe, step, 3] (steps padded with zeros), and the linear design [probe, 4] (LINEAR's
    order): (steps, requests over steps, 1 if the probe's time includes the API latency,
    steps x layers). The last column is zero unless the probes span models of different
    depths (with one depth it is a multiple of the first and cannot be told apart)."""
    shapes = [_shape(p, model, models) for p in probes]
    cms = {id(m): _unit_model(m, gpu, base) for m in shapes}
    per = [probe_steps(p, (chunks or {}).get(p.model, chunk)) for p in probes]
    width = max(len(s) for s in per)
    parts = np.zeros((len(probes), width, 3))
    design = np.zeros((len(probes), 4))
    depths = {m.num_layers for m in shapes}
    for i, (p, steps, m) in enumerate(zip(probes, per, shapes, strict=True)):
        cm = cms[id(m)]
        for j, (n, r, ctx, pairs) in enumerate(steps):
            mm = cm.step_cost(n, r, 0.0, 0.0).compute_s
            full = cm.step_cost(n, r, ctx, pairs)
            parts[i, j] = (mm, full.compute_s - mm, full.memory_s)
        design[i] = (len(steps), sum(s[1] for s in steps), 1.0 if p.kind == "prefill" else 0.0,
                     len(steps) * m.num_layers if len(depths) > 1 else 0.0)
    return parts, design


def _roofline(parts: np.ndarray, effs: np.ndarray) -> np.ndarray:
    """[grid, probe]: summed max(compute, memory) over each probe's steps."""
    inv = 1.0 / effs  # [G, 3]
    comp = parts[None, :, :, 0] * inv[:, None, None, 0] + parts[None, :, :, 1] * inv[:, None, None, 1]
    mem = parts[None, :, :, 2] * inv[:, None, None, 2]
    return np.maximum(comp, mem).sum(axis=2)


def _solve(parts: np.ndarray, design: np.ndarray, y: np.ndarray, effs: np.ndarray,
           prior: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """For each grid row of efficiencies: the best non-negative linear constants and the
    objective (mean squared relative error + ridge * squared log distance to the prior)."""
    w = 1.0 / y
    resid0 = (y[None, :] - _roofline(parts, effs)) * w[None, :]  # [G, P]
    best_obj = np.full(len(effs), np.inf)
    best_coef = np.zeros((len(effs), design.shape[1]))
    used = [k for k in range(design.shape[1]) if design[:, k].any()]
    for size in range(len(used) + 1):
        for subset in itertools.combinations(used, size):
            coef = np.zeros((len(effs), design.shape[1]))
            if subset:
                xs = design[:, subset] * w[:, None]
                coef[:, subset] = resid0 @ np.linalg.pinv(xs).T
            ok = (coef >= 0).all(axis=1)
            r = resid0 - coef @ (design * w[:, None]).T
            obj = (r ** 2).mean(axis=1) + ridge * (np.log(effs / prior) ** 2).sum(axis=1)
            better = ok & (obj < best_obj)
            best_obj[better], best_coef[better] = obj[better], coef[better]
    return best_coef, best_obj


@dataclass
class Fit:
    """Fitted constants, the fit's relative error and the probes with predictions."""

    params: CostParams
    api_latency_s: float
    rms_rel_error: float
    probes: list[Probe]
    rms_by_model: dict[str, float] = field(default_factory=dict)


def fit(probes: list[Probe], model: Any, gpu: Any, chunk: int, base: CostParams | None = None,
        ridge: float = 1e-6, bounds: tuple[float, float] = (0.01, 1.0), *,
        models: Mapping[str, Any] | None = None, chunks: Mapping[str, int] | None = None) -> Fit:
    """Least-squares fit of the efficiencies and overheads to measured probes.

    `models`: name -> model shape for probes of several models (each `Probe.model` names
    its own; probes without one ran `model`), fitted together: one set of efficiencies,
    per-step, per-layer and per-request overheads and one API latency. `chunks`: a model's
    max_num_batched_tokens where it is not `chunk`.
    """
    base = base or load_cost_params(gpu.key)
    parts, design = features(probes, model, gpu, chunk, base, models, chunks)
    y = np.array([p.measured_s for p in probes], dtype=float)
    prior = np.array([getattr(base, k) for k in EFFS])
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    axes = [np.linspace(lo, hi, 36)] * 3
    center, span = None, None
    for _ in range(6):  # coarse grid, then five refinements around the best point
        grid = np.exp(np.array(np.meshgrid(*axes, indexing="ij")).reshape(3, -1).T)
        coef, obj = _solve(parts, design, y, grid, prior, ridge)
        k = int(np.argmin(obj))
        center, best_coef = np.log(grid[k]), coef[k]
        span = (axes[0][1] - axes[0][0]) * 2.5
        axes = [np.clip(np.linspace(c - span, c + span, 21), lo, hi) for c in center]
    effs = np.exp(center)
    pred = _roofline(parts, effs[None, :])[0] + design @ best_coef
    out = [replace(p, predicted_s=float(q)) for p, q in zip(probes, pred, strict=True)]
    params = replace(base, calibrated=True,
                     **{k: float(v) for k, v in zip(EFFS, effs, strict=True)},
                     step_overhead_s=float(best_coef[0]), per_request_overhead_s=float(best_coef[1]),
                     per_layer_overhead_s=float(best_coef[3]))
    rel = (pred - y) / y
    rms = float(np.sqrt(np.mean(rel ** 2)))
    names = [p.model or getattr(model, "name", "") for p in probes]
    by_model = {n: float(np.sqrt(np.mean([r ** 2 for r, m in zip(rel, names, strict=True) if m == n])))
                for n in dict.fromkeys(names)}
    return Fit(params, float(best_coef[2]), rms, out, by_model)


def synthetic_probes(params: CostParams, model: Any, gpu: Any, chunk: int, api_latency_s: float,
                     name: str = "") -> list[Probe]:
    """Probes whose 'measured' times are the cost model's own predictions (for tests);
    `name` goes into each probe's `model`."""
    cm = CostModel(model, gpu, params=params)
    probes = [Probe("prefill", n, model=name) for n in PREFILL_LENS] + [
        Probe("decode", p, b, o, model=name) for b, p, o in DECODE_SHAPES]
    for p in probes:
        t = sum(cm.step_time(*s) for s in probe_steps(p, chunk))
        p.measured_s = t + (api_latency_s if p.kind == "prefill" else 0.0)
    return probes


# ------------------------------------------------------------------ measuring (real engine)
def measure(url: str, vocab_size: int = 32000, reps: int = 3, progress: Any = print) -> list[Probe]:
    """Run the probes against the OpenAI endpoint at `url` (one engine, nothing else on it)."""
    from labkit.bench.loadgen import run_load
    from labkit.bench.workloads import fixed

    seed = iter(range(1000, 10**6))
    run_load(url, fixed(4, 256, 8, seed=next(seed)), vocab_size=vocab_size)  # warm-up
    probes: list[Probe] = []
    for n in PREFILL_LENS:
        ttfts = []
        for _ in range(reps):
            rec = run_load(url, fixed(1, n, 1, seed=next(seed)), vocab_size=vocab_size).records[0]
            if rec.ok:
                ttfts.append(rec.ttft)
        probes.append(Probe("prefill", n, measured_s=float(np.median(ttfts))))
        progress(f"prefill {n:>5} tokens: TTFT {probes[-1].measured_s * 1e3:.2f} ms")
    for b, p, o in DECODE_SHAPES:
        itls: list[float] = []
        for _ in range(max(1, reps - 1)):
            res = run_load(url, fixed(b, p, o, seed=next(seed)), vocab_size=vocab_size)
            itls += [x for r in res.records if r.ok for x in r.itls]
        probes.append(Probe("decode", p, b, o, measured_s=float(np.median(itls))))
        progress(f"decode batch {b:>3} prompt {p}: ITL {probes[-1].measured_s * 1e3:.2f} ms")
    return probes


def cost_json(f: Fit, gpu_key: str, *, device: str, vllm_version: str, chunk: int,
              base_raw: dict[str, Any] | None = None, model: str = "lab-1b",
              probe_files: list[str] | None = None) -> dict[str, Any]:
    """The costs file: the old file's other fields (memory, comm) + the fitted constants.

    `model`: the model probed ("a + b" names for a fit over several); `probe_files`: the
    stored probe sets a refit read (recorded under "calibration")."""
    raw = dict(base_raw or {})
    p = f.params
    cal: dict[str, Any] = {
        "device": device, "vllm_version": vllm_version,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d"),
        "model": model, "max_num_batched_tokens": chunk,
        "api_latency_s": round(f.api_latency_s, 7), "rms_rel_error": round(f.rms_rel_error, 4),
    }
    if probe_files:
        cal["probe_files"] = list(probe_files)
    if len(f.rms_by_model) > 1:
        cal["rms_rel_error_by_model"] = {k: round(v, 4) for k, v in f.rms_by_model.items()}
    cal["probes"] = [{k: (round(v, 7) if isinstance(v, float) else v)
                      for k, v in asdict(pr).items() if k != "model" or v} for pr in f.probes]
    raw.update({
        "gpu": gpu_key, "calibrated": True,
        "note": f"fitted by labkit.bench.calibrate to vLLM {vllm_version} on {device} "
                f"(--enforce-eager, {model}, dummy weights); comm/PP constants not calibrated",
        **{k: round(getattr(p, k), 6) for k in EFFS},
        "step_overhead_s": round(p.step_overhead_s, 7),
        "per_layer_overhead_s": round(p.per_layer_overhead_s, 9),
        "per_request_overhead_s": round(p.per_request_overhead_s, 9),
        "calibration": cal,
    })
    first = ["gpu", "calibrated", "note", *EFFS, "comm_efficiency", "step_overhead_s",
             "per_layer_overhead_s", "per_request_overhead_s"]
    rest = {k: v for k, v in raw.items() if k not in first and k != "calibration"}
    return {**{k: raw[k] for k in first if k in raw}, **rest, "calibration": cal}


def refit(sources: list[tuple[str | Path, str | None]], gpu_type: str,
          base_raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """One constant set fitted to stored probe sets (no GPU): each source is a costs file
    `calibrate` wrote (its "calibration": probes, model, chunk, device) and the model it
    probed (None: the file's own "calibration.model"). Returns the new costs JSON on top of
    `base_raw` (default: labkit/data/costs/<gpu>.json)."""
    from labkit import hardware
    from labkit.models import get_model

    gpu = hardware.GPU_TYPES[gpu_type]
    if base_raw is None:
        path = COSTS_DIR / f"{gpu.key}.json"
        base_raw = json.loads(path.read_text()) if path.exists() else {}
    base = CostParams(**{k: v for k, v in base_raw.items() if k in CostParams.__dataclass_fields__})
    probes: list[Probe] = []
    models: dict[str, Any] = {}
    chunks: dict[str, int] = {}
    cals = []
    seen: set[tuple[Any, ...]] = set()
    for src, name in sources:
        cal = json.loads(Path(src).read_text())["calibration"]
        for p in cal["probes"]:  # a probe's own model (a refit file) wins over the file's
            pr = Probe(**{**p, "model": p.get("model") or name or cal["model"]})
            key = (pr.model, pr.kind, pr.prompt_len, pr.batch, pr.output_len)
            if key not in seen:  # a probe set given twice (a refit file + its source) counts once
                seen.add(key)
                probes.append(pr)
                models.setdefault(pr.model, get_model(pr.model))
                chunks.setdefault(pr.model, int(cal.get("max_num_batched_tokens", 8192)))
        cals.append(cal)
    first = next(iter(models))
    f = fit(probes, models[first], gpu, chunks[first], base, models=models, chunks=chunks)
    return cost_json(f, gpu.key, device=cals[0].get("device", "unknown"),
                     vllm_version=cals[0].get("vllm_version", "unknown"), chunk=chunks[first],
                     base_raw=base_raw, model=" + ".join(models),
                     probe_files=[str(s) for s, _ in sources])


def calibrate(lab_or_url: Any, gpu_type: str, out_path: str | Path, *, reps: int = 3,
              progress: Any = print) -> dict[str, Any]:
    """Measure one real engine (a running colocated `Lab` or its URL), fit, write the JSON."""
    from labkit import hardware
    from labkit.models import get_model

    url = getattr(lab_or_url, "url", lab_or_url)
    plan = getattr(lab_or_url, "plan", None)
    gpu = hardware.GPU_TYPES[gpu_type]
    model = plan.model if plan is not None else get_model("lab-1b")
    chunk = plan.engines[0].max_num_batched_tokens if plan is not None else 8192
    probes = measure(url, model.vocab_size, reps=reps, progress=progress)
    f = fit(probes, model, gpu, chunk)
    path = COSTS_DIR / f"{gpu.key}.json"
    base_raw = json.loads(path.read_text()) if path.exists() else {}
    for p in probes:
        p.model = model.name
    out = cost_json(f, gpu.key, device=_device_name(), vllm_version=_vllm_version(), chunk=chunk,
                    model=model.name, base_raw=base_raw)
    Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    return out


def _device_name() -> str:
    from labkit.plan import detect

    hw = detect()
    return hw.gpus[0].name if hw.gpus else "unknown"


def _vllm_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm")
    except Exception:  # noqa: BLE001 - not installed
        return "unknown"


def format_probes(f: Fit | list[Probe]) -> str:
    """A Markdown table: probe, measured, predicted, relative error."""
    probes = f.probes if isinstance(f, Fit) else f
    lines = ["| probe | measured | fitted model | error |", "| --- | --- | --- | --- |"]
    several = len({p.model for p in probes}) > 1
    for p in probes:
        name = (f"prefill {p.prompt_len} tok (TTFT)" if p.kind == "prefill"
                else f"decode B={p.batch}, ctx {p.prompt_len}+{p.output_len} (ITL)")
        name = f"{p.model}: {name}" if several else name
        err = (p.predicted_s - p.measured_s) / p.measured_s
        lines.append(f"| {name} | {p.measured_s * 1e3:.2f} ms | {p.predicted_s * 1e3:.2f} ms | {err:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="labkit calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("--gpu-type", default="h200")
    ap.add_argument("--out", required=True)
    ap.add_argument("--url", help="an already running engine (default: start a colocated Lab)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--probes", action="append", default=[], metavar="FILE[=MODEL]",
                    help="refit from stored probe sets (costs files with 'calibration.probes'; "
                         "repeat per model) instead of measuring")
    a = ap.parse_args(argv)
    if a.probes:
        sources = [(f, m or None) for f, _, m in (x.partition("=") for x in a.probes)]
        out = refit(sources, a.gpu_type)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    elif a.url:
        out = calibrate(a.url, a.gpu_type, a.out, reps=a.reps)
    else:
        from labkit.lab import Lab

        with Lab(mode="vllm", model="lab-1b", colocated=True, num_gpus=1, observe=False) as lab:
            out = calibrate(lab, a.gpu_type, a.out, reps=a.reps)
    c = out["calibration"]
    print(format_probes([Probe(**p) for p in c["probes"]]))
    print({k: out[k] for k in (*EFFS, "step_overhead_s", "per_layer_overhead_s",
                               "per_request_overhead_s")},
          "api_latency_s", c["api_latency_s"], "rms", c["rms_rel_error"],
          c.get("rms_rel_error_by_model", ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
