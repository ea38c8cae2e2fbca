"""What labkit's observer connector costs a real engine: the same workload, with and without.

Two `vllm serve` engines of the same plan share one GPU (started one after the other, so
each sees the other's memory): "plain" has no KV connector, "observed" has labkit's observer
connector (labkit.pd.observer, solo) publishing to a subscriber in this process, exactly as a
Lab wires it. The workload (fixed prompt/output lengths, closed loop at a fixed concurrency)
runs against each in turn, alternating for `rounds` rounds after a warm-up, and the table
gives throughput and latency of each with the observed/plain ratio.

    python -m labkit.bench.observer_overhead --gpu 0 --requests 64 --prompt 512 \\
        --output 64 --concurrency 16 --rounds 3 --json overhead.json

Needs real vLLM and an NVIDIA GPU (it measures the real engine; there is nothing to simulate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("plain", "observed")


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
        run_dir: Path | None = None) -> dict[str, Any]:
    """Start both engines, run the workload `rounds` times on each (alternating), stop them."""
    from labkit.bench.loadgen import run_load
    from labkit.bench.workloads import fixed
    from labkit.lab import build_config
    from labkit.models import write_model_dir
    from labkit.plan import validate
    from labkit.plan.devices import cuda_visible_devices
    from labkit.plan.ports import free_port
    from labkit.telemetry.subscriber import ObserverSubscriber

    plan = validate(build_config(model, colocated=True, num_gpus=1, gpu_memory_utilization=util))
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
                           "rounds": rounds, "runs": {v: [] for v in VARIANTS}}
    try:
        for eng in engines.values():  # one after the other: they share the GPU
            eng.start()
            out[f"{eng.name}_start_s"] = round(eng.wait_ready(600), 1)
        warm = fixed(concurrency, prompt, output, seed=99)
        for eng in engines.values():
            run_load(eng.base_url, warm, model=plan.model.name, max_concurrency=concurrency)
        for i in range(rounds):  # fresh prompts each round: no prefix-cache hits across rounds
            w = fixed(requests, prompt, output, seed=i, name=f"fixed-{prompt}x{output}")
            for name in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
                t0 = time.perf_counter()
                res = run_load(engines[name].base_url, w, model=plan.model.name,
                               vocab_size=plan.model.vocab_size, max_concurrency=concurrency)
                out["runs"][name].append(_figures(res.records, time.perf_counter() - t0))
        out["observer_batches"] = batches[0]
    finally:
        for eng in engines.values():
            eng.stop()
        sub.close()
    out["summary"] = summarize_runs(out["runs"])
    return out


def summarize_runs(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Median of each figure over the rounds, per variant, and observed/plain ratios."""
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for v, rs in runs.items() if rs}
    if "plain" in med and "observed" in med:
        med["ratio"] = {k: (med["observed"][k] / med["plain"][k] if med["plain"][k] else
                            float("nan")) for k in med["plain"] if k not in ("ok", "errors")}
    return med


def format_table(result: dict[str, Any]) -> str:
    cols = ("req_s", "out_tok_s", "total_tok_s", "ttft_p50_ms", "itl_p50_ms")
    s = result["summary"]
    lines = [f"observer overhead: {result['model']}, {result['requests']} requests of "
             f"{result['prompt']}+{result['output']} tokens, concurrency {result['concurrency']}, "
             f"median of {result['rounds']} rounds (REAL vLLM, GPU {result['gpu']}, "
             f"CUDA_VISIBLE_DEVICES={result.get('cuda_visible_devices', result['gpu'])})",
             f"{'':>9}" + "".join(f"{c:>13}" for c in cols)]
    for row in ("plain", "observed", "ratio"):
        if row in s:
            fmt = "{:>13.3f}" if row == "ratio" else "{:>13.1f}"
            lines.append(f"{row:>9}" + "".join(fmt.format(s[row][c]) for c in cols))
    lines.append(f"observer batches received: {result.get('observer_batches', 0)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.bench.observer_overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", type=int, default=0,
                   help="logical GPU: its position among those CUDA_VISIBLE_DEVICES names")
    p.add_argument("--model", default="lab-1b")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--output", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--util", type=float, default=0.4, help="gpu_memory_utilization of each")
    p.add_argument("--run-dir", type=Path)
    p.add_argument("--json", type=Path, help="write the result here")
    a = p.parse_args(argv)
    result = run(a.gpu, a.model, a.requests, a.prompt, a.output, a.concurrency, a.rounds,
                 a.util, a.run_dir)
    print(format_table(result), flush=True)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
