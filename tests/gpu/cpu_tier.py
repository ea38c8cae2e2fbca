"""The CPU tier on real vLLM: a prompt's GPU blocks are evicted, then come back from host memory.

    source .gpu-carry/on-device.sh && PYTHONPATH=$PWD python3 tests/gpu/cpu_tier.py \\
        OUTDIR NAME LAYOUT [blocks=96] [offload_gib=2] [mode=vllm|sim]

LAYOUT:
  flag       one engine, `--kv-offloading-size` alone (observer off: labkit.plan.vllm_args
             passes vLLM's flag, which makes an OffloadingConnector itself)
  colocated  one engine, labkit's observer on: MultiConnector [observer open,
             OffloadingConnector, observer close]; recorded (OUTDIR/NAME.lkrec)
  pd         a PD pair on one GPU: ExampleConnector with the OffloadingConnector beside it on
             both engines ([observer open, Example, observer close, Offloading]); recorded

A small GPU pool (`--num-gpu-blocks-override` and `--kv-cache-memory-bytes` of `blocks` 1 MiB
blocks, lab-1b) so that prompts B and C (1,024 tokens each, 65 blocks) push prompt A's cached
blocks out of it. Then A2 = A's first 960 tokens + 64 new ones: its prefix is no longer on the
GPU, but the CPU tier has it. (A2, not A itself: ExampleConnector would serve A whole from
/dev/shm in the PD layout, since it matches whole prompts only.)

Saves OUTDIR/NAME.json (per step: client TTFT; per engine: the offload byte counters by
transfer_type, prompt tokens by source, prefix-cache counters, before and after; the
observer's RequestAllocated events), OUTDIR/NAME-metrics.txt (every /metrics line naming
offload, at the end) and OUTDIR/NAME-logs.tgz (engine logs).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tarfile
import time
import traceback
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _lab_support import Poller, prompt_ids, stream  # noqa: E402

from labkit.telemetry.metrics import MetricsSnapshot  # noqa: E402

OFFLOAD = ("vllm:kv_offload_total_bytes_total", "vllm:kv_offload_total_time_total")
COUNTERS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
            "vllm:external_prefix_cache_hits_total", "vllm:external_prefix_cache_queries_total",
            "vllm:num_preemptions_total")


def _scrape(url: str) -> tuple[str, dict[str, Any]]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    snap = MetricsSnapshot.parse(text)
    fig: dict[str, Any] = {}
    for name in OFFLOAD:
        for t in ("CPU_to_GPU", "GPU_to_CPU"):
            fig[f"{name.split(':')[1]}{{{t}}}"] = snap.sum(name, transfer_type=t)
    for name in COUNTERS:
        fig[name.split(":")[1]] = snap.sum(name)
    for s in ("local_compute", "local_cache_hit", "external_kv_transfer"):
        fig[f"by_source{{{s}}}"] = snap.sum("vllm:prompt_tokens_by_source_total", source=s)
    info = snap.info("vllm:cache_config_info") or {}
    fig["num_gpu_blocks"] = info.get("num_gpu_blocks")
    return text, fig


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in b if isinstance(b[k], float) and isinstance(a.get(k), float)
            and b[k] != a[k]}


def main(argv: list[str]) -> int:
    out, name, layout, *pairs = argv
    opts = dict(p.split("=", 1) for p in pairs)
    blocks, offload_gib = int(opts.get("blocks", 96)), float(opts.get("offload_gib", 2))
    mode = opts.get("mode", "vllm")  # mode=sim: a dry run of this script on the simulator
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path("/tmp/lkruns") / name
    run_dir.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"layout": layout, "blocks": blocks, "offload_gib": offload_gib}
    rc = 0
    t0 = time.time()
    try:
        rc = _run(out_dir, name, layout, blocks, offload_gib, run_dir, res, mode)
    except Exception:
        traceback.print_exc()
        res["error"] = traceback.format_exc()[-2000:]
        rc = 1
    res["wall_s"] = round(time.time() - t0, 1)
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    with tarfile.open(out_dir / f"{name}-logs.tgz", "w:gz") as tar:
        for log in run_dir.rglob("*.log"):
            if log.stat().st_size < 8 << 20:
                tar.add(log, arcname=str(log.relative_to(run_dir)))
    print(json.dumps({k: v for k, v in res.items() if k in ("layout", "start_s", "steps_summary",
                                                             "delta_last", "error", "recording_bytes",
                                                             "allocated")},
                     default=str)[:3000], flush=True)
    return rc


def _run(out_dir: Path, name: str, layout: str, blocks: int, offload_gib: float,
         run_dir: Path, res: dict[str, Any], mode: str = "vllm") -> int:
    from labkit.lab import Lab, build_config

    pd = layout == "pd"
    cfg = build_config("lab-1b", colocated=not pd, num_gpus=1,
                       connector="example" if pd else "auto", num_gpu_blocks=blocks,
                       gpu_memory_utilization=0.05, kv_offloading_size_gb=offload_gib)
    # exact KV bytes: no memory profiling, so engines starting beside others on this GPU
    # get exactly `blocks` blocks (lab-1b: 1 MiB per 16-token block)
    extra = ["--kv-cache-memory-bytes", str(blocks << 20)]
    cfg = dataclasses.replace(cfg, prefill=dataclasses.replace(cfg.prefill, extra_args=extra),
                              decode=dataclasses.replace(cfg.decode, extra_args=extra))
    lab = Lab(cfg, mode=mode, run_dir=run_dir, observe=layout != "flag")
    res["describe"] = lab.describe()
    res["args"] = {}
    t = time.time()
    lab.start(progress=False)
    res["start_s"] = round(time.time() - t, 1)
    rec = None
    try:
        for n, e in lab.engines.items():
            res["args"][n] = getattr(e, "serve_args", None)
        tel = lab.telemetry()
        time.sleep(1.0)  # observer PUBs reconnect to the bound SUB
        src: Any = tel
        if layout != "flag":
            from labkit.telemetry.recording import Recorder

            rec = src = Recorder(tel, out_dir / f"{name}.lkrec", lab=lab, meta={
                "workload": "CPU tier: A (1,024 tokens), B, C (1,024 each) evict A's blocks "
                            "from a small GPU pool; A2 = A[:960] + 64 new tokens comes back "
                            "from host memory", "layout": layout, "gpu_blocks": blocks,
                "offload_gib": offload_gib, "test": "tests/gpu/cpu_tier.py"})
        model = lab.plan.model.name
        a = prompt_ids(1024, 11)
        steps = [("A", a), ("B", prompt_ids(1024, 12)), ("C", prompt_ids(1024, 13)),
                 ("A2", a[:960] + prompt_ids(64, 14))]
        urls = {n: e.base_url for n, e in lab.engines.items()}
        snaps: list[dict[str, Any]] = []
        raw = ""
        res["steps"] = []
        with Poller(src, interval=0.2) as poll:
            before = {n: _scrape(u)[1] for n, u in urls.items()}
            snaps.append(before)
            for label, ids in steps:
                r = stream(lab.url, model, ids, 8)
                time.sleep(1.0)  # CPU stores are asynchronous: let them land
                after = {}
                for n, u in urls.items():
                    raw, after[n] = _scrape(u)
                res["steps"].append({"step": label, "prompt": len(ids), **r,
                                     "delta": {n: _delta(snaps[-1][n], after[n]) for n in urls}})
                snaps.append(after)
            time.sleep(0.5)
        res["metrics_before"], res["metrics_after"] = snaps[0], snaps[-1]
        res["delta_last"] = res["steps"][-1]["delta"]
        res["steps_summary"] = [(s["step"], s.get("ttft_s"), s["delta"]) for s in res["steps"]]
        res["allocated"] = [
            {"engine": eng, "req": getattr(e, "req_id", None),
             "external": getattr(e, "num_external_tokens", None),
             "computed": getattr(e, "num_computed_tokens", None)}
            for eng, e in poll.events("RequestAllocated")]
        res["telemetry"] = poll.summary()
        offload_lines = "\n".join(f"## {n}\n" + "\n".join(
            ln for ln in httpx.get(f"{u}/metrics", timeout=10).text.splitlines()
            if "offload" in ln and not ln.startswith("#")) for n, u in urls.items())
        (out_dir / f"{name}-metrics.txt").write_text(offload_lines + "\n")
        del raw
    finally:
        if rec is not None:
            res["recording_bytes"] = rec.close().stat().st_size
        lab.stop()
    loaded = sum(d.get("kv_offload_total_bytes_total{CPU_to_GPU}", 0.0)
                 for d in res["delta_last"].values())
    res["a2_loaded_from_cpu_bytes"] = loaded
    return 0 if loaded > 0 else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
