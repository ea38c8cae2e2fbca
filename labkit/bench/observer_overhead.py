"""What labkit's observer connector costs a real engine: the same workload, with and without.

Two `vllm serve` engines of the same plan share one GPU (started one after the other, so
each sees the other's memory): "plain" has no KV connector, "observed" has labkit's observer
connector (labkit.pd.observer, solo) publishing to a subscriber in this process, exactly as a
Lab wires it. The workload (fixed prompt/output lengths, closed loop at a fixed concurrency)
runs against each in turn, alternating for `rounds` rounds after a warm-up, and the table
gives throughput and latency of each with the observed/plain ratio.

Each round gives one observed/plain ratio per figure (both variants ran the same prompts,
back to back, in alternating order); the 95 % interval of the ratio is a t-interval over the
rounds' log-ratios (`ratio_ci`). With `--ci-width W` the rounds go on past `--rounds` until
the interval of the throughput ratio and of the ITL ratio are both narrower than W (or
`--max-rounds` / `--budget-s` is reached; the table says which).

    python -m labkit.bench.observer_overhead --gpu 0 --requests 64 --prompt 512 \\
        --output 64 --concurrency 16 --rounds 3 --json overhead.json
    python -m labkit.bench.observer_overhead --rounds 8 --ci-width 0.02 --budget-s 200

`--method offline` is the quieter measure: no HTTP and no load generator. Each variant is
an offline `vllm.LLM` in a process of its own (the observed one publishing to a subscriber in
this process, as a Lab's engines do); a round submits the same `--requests` prompts to each
at once (the scheduler batches up to `--concurrency` of them, `max_num_seqs`) and steps the
engine to the end, timing every token as the engine hands it out: throughput is tokens over
the run's wall time, TTFT and ITL come from those token times.

    python -m labkit.bench.observer_overhead --method offline --requests 128 --prompt 512 \
        --output 128 --concurrency 32 --rounds 8 --ci-width 0.02 --budget-s 240

Needs real vLLM and an NVIDIA GPU (it measures the real engine; there is nothing to simulate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("plain", "observed")
CI_FIGURES = ("total_tok_s", "itl_p50_ms")  # what --ci-width waits on: throughput and ITL
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t quantile (t such that P(|T| <= t) = level) for `df` degrees of
    freedom: exact table for level 0.95 and df <= 10, else the Cornish-Fisher expansion
    (error < 1e-3 for df >= 5)."""
    if df < 1:
        return math.inf
    if abs(level - 0.95) < 1e-12 and df in _T975:
        return _T975[df]
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def round_ratios(runs: dict[str, list[dict[str, float]]], key: str,
                 num: str = "observed", den: str = "plain") -> list[float]:
    """num/den (default observed/plain) of figure `key`, one per round (rounds where both
    are > 0)."""
    pairs = zip(runs.get(den, []), runs.get(num, []), strict=False)
    return [o[key] / p[key] for p, o in pairs
            if p.get(key, 0) > 0 and o.get(key, 0) > 0
            and math.isfinite(p[key]) and math.isfinite(o[key])]


def ratio_ci(runs: dict[str, list[dict[str, float]]], key: str,
             level: float = 0.95, num: str = "observed", den: str = "plain") -> dict[str, float]:
    """The observed/plain ratio of `key` with its `level` confidence interval: a t-interval
    over the rounds' log-ratios, back-transformed (geometric mean; the interval is not
    symmetric around it). `width` = hi - lo in ratio units (0.02 = 2 %)."""
    r = round_ratios(runs, key, num, den)
    n = len(r)
    if n == 0:
        return {"n": 0, "ratio": float("nan"), "lo": float("nan"), "hi": float("nan"),
                "width": float("inf")}
    logs = [math.log(x) for x in r]
    m = statistics.fmean(logs)
    if n == 1:
        return {"n": 1, "ratio": math.exp(m), "lo": float("nan"), "hi": float("nan"),
                "width": float("inf")}
    half = t_quantile(n - 1, level) * statistics.stdev(logs) / math.sqrt(n)
    lo, hi = math.exp(m - half), math.exp(m + half)
    return {"n": n, "ratio": math.exp(m), "lo": lo, "hi": hi, "width": hi - lo}


def ci_reached(runs: dict[str, list[dict[str, float]]], width: float,
               keys: tuple[str, ...] = CI_FIGURES) -> bool:
    """True when every figure in `keys` has a 95 % interval narrower than `width`."""
    return all(ratio_ci(runs, k)["width"] < width for k in keys)


def _engine(name: str, plan: Any, model_dir: str, run_dir: Path, gpu: int,
            observer_endpoint: str | None) -> Any:
    from labkit.engines.vllm import VLLMEngine
    from labkit.plan import env_for, vllm_args
    from labkit.plan.devices import engine_gpu_env
    from labkit.plan.ports import free_port

    port = free_port()
    extra = {"run_dir": str(run_dir), "served_model_name": plan.model.name,
             "observer_endpoint": observer_endpoint}
    args = vllm_args(None, plan, 0, model_dir, port, extra)
    # `gpu` is logical: the gpu-th of the GPUs the parent's CUDA_VISIBLE_DEVICES names
    env = {**env_for(0, plan), **engine_gpu_env([gpu])}
    return VLLMEngine(name, args, role="both", port=port, log_path=run_dir / f"{name}.log",
                      env=env)


def _figures(records: list[Any], duration: float) -> dict[str, float]:
    from labkit.bench.report import summarize

    s = summarize(records)
    done = [r for r in records if r.ok]
    tokens = sum(r.prompt_len + r.num_output_tokens for r in done)
    span = s["duration_s"] or duration
    return {"ok": s["num_ok"], "errors": s["num_errors"], "req_s": s["throughput_rps"],
            "out_tok_s": s["output_tps"], "total_tok_s": tokens / span if span else 0.0,
            "ttft_p50_ms": s["ttft"].get("p50", float("nan")) * 1e3,
            "itl_p50_ms": s["itl"].get("p50", float("nan")) * 1e3}


def run(gpu: int = 0, model: str = "lab-1b", requests: int = 64, prompt: int = 512,
        output: int = 64, concurrency: int = 16, rounds: int = 3, util: float = 0.4,
        run_dir: Path | None = None, ci_width: float | None = None, max_rounds: int = 200,
        budget_s: float | None = None, num_gpu_blocks: int | None = None,
        go_file: Path | None = None) -> dict[str, Any]:
    """Start both engines, run the workload `rounds` times on each (alternating), stop them.

    With `ci_width`, go on after `rounds` until `ci_reached(runs, ci_width)`, `max_rounds`
    rounds, or `budget_s` seconds of rounds (a round is started only if the last one's time
    still fits). With `num_gpu_blocks` both engines get exactly that many KV blocks
    (`--num-gpu-blocks-override` and `--kv-cache-memory-bytes`: no memory profiling) and start
    together. With `go_file` the engines start now and the warm-up and rounds wait until
    that file exists (a batch starts them beside other work, then measures alone); a number
    in that file replaces `budget_s`."""
    from labkit.bench.loadgen import run_load
    from labkit.bench.workloads import fixed
    from labkit.lab import build_config
    from labkit.models import write_model_dir
    from labkit.plan import validate
    from labkit.plan.devices import cuda_visible_devices
    from labkit.plan.ports import free_port
    from labkit.telemetry.subscriber import ObserverSubscriber

    cfg = build_config(model, colocated=True, num_gpus=1, gpu_memory_utilization=util,
                       num_gpu_blocks=num_gpu_blocks)
    plan = validate(cfg)
    if num_gpu_blocks and plan.kind == "vllm":  # exact KV bytes: no profiling, start together
        extra = ["--kv-cache-memory-bytes", str(plan.engines[0].page_bytes * num_gpu_blocks)]
        cfg = dataclasses.replace(
            cfg, prefill=dataclasses.replace(cfg.prefill, extra_args=extra),
            decode=dataclasses.replace(cfg.decode, extra_args=extra))
        plan = validate(cfg)
    if plan.kind != "vllm":
        raise SystemExit("observer_overhead measures real vLLM: no GPU or no vLLM here")
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="labkit-overhead-"))
    model_dir = str(write_model_dir(plan.model, run_dir / "model"))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    batches = [0]
    sub = ObserverSubscriber(endpoint, bind=True,
                             callback=lambda b: batches.__setitem__(0, batches[0] + 1))
    engines = {"plain": _engine("plain", plan, model_dir, run_dir, gpu, None),
               "observed": _engine("observed", plan, model_dir, run_dir, gpu, endpoint)}
    out: dict[str, Any] = {"gpu": gpu, "cuda_visible_devices": cuda_visible_devices([gpu]),
                           "model": plan.model.name, "requests": requests,
                           "prompt": prompt, "output": output, "concurrency": concurrency,
                           "rounds": rounds, "ci_width_target": ci_width,
                           "runs": {v: [] for v in VARIANTS}}
    try:
        if num_gpu_blocks:  # fixed pools: start together
            for eng in engines.values():
                eng.start()
        for eng in engines.values():  # else one after the other: they share the GPU
            if not num_gpu_blocks:
                eng.start()
            out[f"{eng.name}_start_s"] = round(eng.wait_ready(600), 1)
        if go_file is not None:
            print(f"engines ready; waiting for {go_file}", file=sys.stderr, flush=True)
            t_wait = time.perf_counter()
            while not Path(go_file).exists():
                if time.perf_counter() - t_wait > 1800:
                    raise SystemExit(f"{go_file} did not appear in 30 minutes")
                time.sleep(0.2)
            out["waited_s"] = round(time.perf_counter() - t_wait, 1)
            try:  # a number in the file is the rounds' budget in seconds (the batch's time left)
                budget_s = float(Path(go_file).read_text().strip())
            except ValueError:
                pass
            out["budget_s"] = budget_s
        warm = fixed(concurrency, prompt, output, seed=99)
        for eng in engines.values():
            run_load(eng.base_url, warm, model=plan.model.name, max_concurrency=concurrency)
        t_rounds, last, i, out["stopped_by"] = time.perf_counter(), 0.0, 0, "rounds"
        last_round = max(rounds, max_rounds) if ci_width else rounds
        while i < last_round:  # fresh prompts each round: no prefix-cache hits across rounds
            if ci_width and i >= rounds and ci_reached(out["runs"], ci_width):
                out["stopped_by"] = "ci_width"
                break
            spent = time.perf_counter() - t_rounds
            if budget_s is not None and i >= 2 and spent + last > budget_s:
                out["stopped_by"] = "budget_s"
                break
            t_round = time.perf_counter()
            w = fixed(requests, prompt, output, seed=i, name=f"fixed-{prompt}x{output}")
            for name in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
                t0 = time.perf_counter()
                res = run_load(engines[name].base_url, w, model=plan.model.name,
                               vocab_size=plan.model.vocab_size, max_concurrency=concurrency)
                out["runs"][name].append(_figures(res.records, time.perf_counter() - t0))
            last, i = time.perf_counter() - t_round, i + 1
            pl, ob = out["runs"]["plain"][-1], out["runs"]["observed"][-1]
            print(f"round {i}: total tok/s plain {pl['total_tok_s']:.0f} observed "
                  f"{ob['total_tok_s']:.0f}; ITL p50 {pl['itl_p50_ms']:.2f} / "
                  f"{ob['itl_p50_ms']:.2f} ms; {last:.1f} s", file=sys.stderr, flush=True)
        else:
            out["stopped_by"] = "max_rounds" if ci_width else "rounds"
        out["rounds"] = i
        out["rounds_s"] = round(time.perf_counter() - t_rounds, 1)
        out["observer_batches"] = batches[0]
    finally:
        for eng in engines.values():
            eng.stop()
        sub.close()
    out["summary"] = summarize_runs(out["runs"])
    return out


# ---- --method offline: engine-side, no HTTP ---------------------------------------------------


def token_figures(t_start: float, t_end: float, token_times: dict[str, list[float]],
                  prompt: int) -> dict[str, float]:
    """The served method's figures from an offline run: `token_times[req]` holds the wall
    time each of the request's output tokens was handed out (one entry per token)."""
    done = [ts for ts in token_times.values() if ts]
    span = t_end - t_start
    out_tokens = sum(len(ts) for ts in done)
    ttft = [ts[0] - t_start for ts in done]
    itl = [b - a for ts in done for a, b in zip(ts, ts[1:], strict=False)]
    return {"ok": len(done), "errors": len(token_times) - len(done),
            "req_s": len(done) / span if span > 0 else 0.0,
            "out_tok_s": out_tokens / span if span > 0 else 0.0,
            "total_tok_s": (out_tokens + prompt * len(done)) / span if span > 0 else 0.0,
            "ttft_p50_ms": statistics.median(ttft) * 1e3 if ttft else float("nan"),
            "itl_p50_ms": statistics.median(itl) * 1e3 if itl else float("nan")}


def _offline_worker(conn: Any, kwargs: dict[str, Any], prompt: int, output: int,
                    vocab_size: int) -> None:
    """One variant's process: an offline vllm.LLM that runs ("run", seed, n) rounds."""
    import random as _random

    from vllm import LLM, SamplingParams

    llm = LLM(**kwargs)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=output, ignore_eos=True, temperature=0.0)
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg[0] != "run":
            break
        _, seed, n, tag = msg
        rng = _random.Random(seed)
        prompts = [[rng.randrange(1000, vocab_size - 1) for _ in range(prompt)] for _ in range(n)]
        times: dict[str, list[float]] = {}
        t0 = time.time()
        for i, ids in enumerate(prompts):
            rid = f"{tag}-{seed}-{i}"
            times[rid] = []
            engine.add_request(rid, {"prompt_token_ids": ids}, params)
        while engine.has_unfinished_requests():
            for ro in engine.step():
                t = time.time()
                got = len(ro.outputs[0].token_ids) if ro.outputs else 0
                ts = times.setdefault(ro.request_id, [])
                ts.extend([t] * (got - len(ts)))  # one stamp per new token
        conn.send(("done", token_figures(t0, time.time(), times, prompt)))
    try:
        engine.engine_core.shutdown()
    except Exception:
        pass
    conn.send(("bye", None))


def run_offline(model: str = "lab-1b", requests: int = 128, prompt: int = 512,
                output: int = 128, concurrency: int = 32, rounds: int = 8,
                num_gpu_blocks: int = 4096, run_dir: Path | None = None,
                ci_width: float | None = None, max_rounds: int = 200,
                budget_s: float | None = None, gpu: int = 0,
                enforce_eager: bool = True, noop_connector: bool = False) -> dict[str, Any]:
    """`--method offline`: both variants as offline engines in processes of their own, with
    fixed KV pools (no memory profile: they start together), rounds alternating in order.
    `noop_connector`: a third engine with labkit.bench.noop_connector (kv_both), to tell
    vLLM's cost of carrying a connector from the observer's own."""
    import multiprocessing as mp

    from labkit.models import get_model, write_model_dir
    from labkit.plan.devices import cuda_visible_devices, engine_gpu_env
    from labkit.plan.ports import free_port
    from labkit.plan.vllm_args import kv_transfer_config
    from labkit.telemetry.subscriber import ObserverSubscriber

    spec = get_model(model)
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="labkit-overhead-"))
    model_dir = str(write_model_dir(spec, run_dir / "model"))
    page = spec.kv_bytes_per_token("auto") * 16
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    batches = [0]
    sub = ObserverSubscriber(endpoint, bind=True,
                             callback=lambda b: batches.__setitem__(0, batches[0] + 1))
    base = dict(model=model_dir, load_format="dummy", enforce_eager=enforce_eager,
                block_size=16, num_gpu_blocks_override=num_gpu_blocks,
                kv_cache_memory_bytes=page * num_gpu_blocks, gpu_memory_utilization=0.2,
                max_num_seqs=concurrency, max_model_len=prompt + output + 16,
                enable_prefix_caching=True)
    observed = kv_transfer_config(None, "both", run_dir, endpoint, observer_name="observed")
    kwargs = {"plain": base, "observed": {**base, "kv_transfer_config": observed}}
    variants: tuple[str, ...] = VARIANTS
    if noop_connector:
        kwargs["connector"] = {**base, "kv_transfer_config": {
            "kv_connector": "NoopConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "labkit.bench.noop_connector"}}
        variants = ("plain", "connector", "observed")
    for k, v in engine_gpu_env([gpu]).items():  # the children inherit it
        os.environ[k] = v
    ctx = mp.get_context("spawn")
    procs: dict[str, Any] = {}
    conns: dict[str, Any] = {}
    out: dict[str, Any] = {"method": "offline", "gpu": gpu,
                           "cuda_visible_devices": cuda_visible_devices([gpu]), "model": spec.name,
                           "requests": requests, "prompt": prompt, "output": output,
                           "concurrency": concurrency, "num_gpu_blocks": num_gpu_blocks,
                           "enforce_eager": enforce_eager, "ci_width_target": ci_width,
                           "runs": {v: [] for v in variants}}
    try:
        t_start = time.perf_counter()
        for name in variants:
            conns[name], child = ctx.Pipe()
            procs[name] = ctx.Process(target=_offline_worker, name=f"overhead-{name}",
                                      args=(child, kwargs[name], prompt, output, spec.vocab_size),
                                      daemon=False)  # vLLM starts its own processes
            procs[name].start()
        for name in variants:
            if not conns[name].poll(900):
                raise SystemExit(f"{name} engine did not start in 900 s")
            conns[name].recv()
            out[f"{name}_start_s"] = round(time.perf_counter() - t_start, 1)

        def one(name: str, seed: int, n: int) -> dict[str, float]:
            conns[name].send(("run", seed, n, name))
            return conns[name].recv()[1]

        for name in variants:  # warm-up
            one(name, 10_000, concurrency)
        t_rounds, last, i, out["stopped_by"] = time.perf_counter(), 0.0, 0, "rounds"
        last_round = max(rounds, max_rounds) if ci_width else rounds
        while i < last_round:
            if ci_width and i >= rounds and ci_reached(out["runs"], ci_width):
                out["stopped_by"] = "ci_width"
                break
            spent = time.perf_counter() - t_rounds
            if budget_s is not None and i >= 2 and spent + last > budget_s:
                out["stopped_by"] = "budget_s"
                break
            t_round = time.perf_counter()
            for name in (variants if i % 2 == 0 else variants[::-1]):
                out["runs"][name].append(one(name, i, requests))
            last, i = time.perf_counter() - t_round, i + 1
            pl, ob = out["runs"]["plain"][-1], out["runs"]["observed"][-1]
            print(f"round {i}: total tok/s plain {pl['total_tok_s']:.0f} observed "
                  f"{ob['total_tok_s']:.0f}; ITL p50 {pl['itl_p50_ms']:.2f} / "
                  f"{ob['itl_p50_ms']:.2f} ms; {last:.1f} s", file=sys.stderr, flush=True)
        else:
            out["stopped_by"] = "max_rounds" if ci_width else "rounds"
        out["rounds"] = i
        out["rounds_s"] = round(time.perf_counter() - t_rounds, 1)
        out["observer_batches"] = batches[0]
    finally:
        for c in conns.values():
            try:
                c.send(("stop",))
                if c.poll(60):
                    c.recv()
            except (OSError, EOFError):
                pass
        for p in procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        sub.close()
    out["summary"] = summarize_runs(out["runs"])
    return out


def summarize_runs(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Median of each figure over the rounds, per variant, observed/plain ratios of the
    medians, and ("ci") each figure's per-round ratio with its 95 % interval (`ratio_ci`)."""
    med: dict[str, dict[str, Any]] = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                                      for v, rs in runs.items() if rs}
    if "plain" in med and "observed" in med:
        keys = [k for k in med["plain"] if k not in ("ok", "errors")]
        med["ratio"] = {k: (med["observed"][k] / med["plain"][k] if med["plain"][k] else
                            float("nan")) for k in keys}
        med["ci"] = {k: ratio_ci(runs, k) for k in keys}
        if "connector" in med:  # the no-op connector's arm splits the cost in two
            med["ci_connector"] = {k: ratio_ci(runs, k, num="connector") for k in keys}
            med["ci_observer_own"] = {k: ratio_ci(runs, k, den="connector") for k in keys}
    return med


def format_table(result: dict[str, Any]) -> str:
    cols = ("req_s", "out_tok_s", "total_tok_s", "ttft_p50_ms", "itl_p50_ms")
    s = result["summary"]
    how = ("offline engines, token times in the engine's process" if
           result.get("method") == "offline" else "served, HTTP load generator")
    lines = [f"observer overhead ({how}): {result['model']}, {result['requests']} requests "
             f"of {result['prompt']}+{result['output']} tokens, concurrency "
             f"{result['concurrency']}, median of {result['rounds']} rounds (REAL vLLM, GPU {result['gpu']}, "
             f"CUDA_VISIBLE_DEVICES={result.get('cuda_visible_devices', result['gpu'])})",
             f"{'':>9}" + "".join(f"{c:>13}" for c in cols)]
    for row in ("plain", "connector", "observed", "ratio"):
        if row in s:
            fmt = "{:>13.3f}" if row == "ratio" else "{:>13.1f}"
            lines.append(f"{row:>9}" + "".join(fmt.format(s[row][c]) for c in cols))
    ci = s.get("ci")
    if ci:  # per-round ratios: geometric mean, 95 % t-interval, its width
        for label, field in (("r (gmean)", "ratio"), ("95% lo", "lo"), ("95% hi", "hi"),
                             ("95% width", "width")):
            lines.append(f"{label:>9}" + "".join(
                f"{ci[c][field]:>13.4f}" if c in ci else f"{'':>13}" for c in cols))
    for name, what in (("ci_connector", "no-op connector / plain (vLLM's cost of a connector)"),
                       ("ci_observer_own", "observed / no-op connector (the observer's own)")):
        part = s.get(name)
        if part:
            lines.append(f"{what}: " + ", ".join(
                f"{c} {part[c]['ratio']:.4f} [{part[c]['lo']:.4f}, {part[c]['hi']:.4f}]"
                for c in ("total_tok_s", "itl_p50_ms") if c in part))
    lines.append(f"observer batches received: {result.get('observer_batches', 0)}")
    if result.get("ci_width_target"):
        ok = ci_reached(result["runs"], result["ci_width_target"])
        lines.append(f"95 % interval narrower than {result['ci_width_target']:.3f} for "
                     f"{', '.join(CI_FIGURES)}: {'yes' if ok else 'NO'} after "
                     f"{result['rounds']} rounds (stopped by {result.get('stopped_by')})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.bench.observer_overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=("served", "offline"), default="served",
                   help="served: two `vllm serve` engines under an HTTP load generator (what a "
                        "lab runs); offline: two offline engines stepped in their own processes, "
                        "token times taken there (quieter)")
    p.add_argument("--gpu", type=int, default=0,
                   help="logical GPU: its position among those CUDA_VISIBLE_DEVICES names")
    p.add_argument("--model", default="lab-1b")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--output", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--util", type=float, default=0.4, help="gpu_memory_utilization of each")
    p.add_argument("--ci-width", type=float, default=None,
                   help="go on after --rounds until the 95 %% interval of the throughput and "
                        "ITL ratios is narrower than this (0.02 = 2 %%)")
    p.add_argument("--max-rounds", type=int, default=200)
    p.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV blocks of each engine (fixed); the engines then start together")
    p.add_argument("--go-file", type=Path, default=None,
                   help="start the engines, then wait for this file before measuring; a "
                        "number in it replaces --budget-s")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting rounds after this many seconds of rounds")
    p.add_argument("--noop-connector", action="store_true",
                   help="offline: a third engine with a KV connector that does nothing, to "
                        "split the cost into vLLM's (of any connector) and the observer's own")
    p.add_argument("--run-dir", type=Path)
    p.add_argument("--json", type=Path, help="write the result here")
    a = p.parse_args(argv)
    if a.method == "offline":
        result = run_offline(a.model, a.requests, a.prompt, a.output, a.concurrency, a.rounds,
                             a.num_gpu_blocks or 4096, a.run_dir, a.ci_width, a.max_rounds,
                             a.budget_s, a.gpu, noop_connector=a.noop_connector)
        print(format_table(result), flush=True)
        if a.json:
            a.json.write_text(json.dumps(result, indent=1))
        return 0
    result = run(a.gpu, a.model, a.requests, a.prompt, a.output, a.concurrency, a.rounds,
                 a.util, a.run_dir, a.ci_width, a.max_rounds, a.budget_s, a.num_gpu_blocks,
                 a.go_file)
    print(format_table(result), flush=True)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
