"""The GPU proof's workload: a real PD pair on one GPU, observed from every side.

Starts four `vllm serve` engines at once on GPU 0 (prefill and decode through
MultiConnector[observer(open), ExampleConnector on /dev/shm, observer(close)], a "solo"
engine with the observer as its only connector, and an fp8-KV engine), the labkit PD proxy,
an observer subscriber (binds; all observers connect), a KV-event subscriber and an NVML
sampler; sends one 1,081-token prompt through the proxy (prefill max_tokens=1, then decode
streams 200 tokens), scrapes /metrics while decode runs, stops everything and checks the
GPU is clean. Everything measured goes into one dict (and $OUT/pd_run.json).

    PYTHONPATH=. python tests/gpu/pd_run.py       # on the GPU machine, outside pytest
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import httpx

from labkit.engines.base import pids_in_group
from labkit.engines.vllm import VLLMEngine
from labkit.plan.ports import free_port
from labkit.telemetry import nvml
from labkit.telemetry.metrics import MetricsSnapshot
from labkit.telemetry.subscriber import KVEventSubscriber, ObserverSubscriber

sys.path.insert(0, str(Path(__file__).parent))
from _support import OBSERVER, example_with_observer, out_dir, save_json, serve_args, write_model  # noqa: E402

PROMPT_TOKENS = 1081
DECODE_TOKENS = 200
GIB = 1 << 30


def _event_dict(engine: str, ev: Any) -> dict[str, Any]:
    d = {f: getattr(ev, f) for f in ev.__struct_fields__}
    d["type"] = type(ev).__name__
    d["engine"] = engine
    if isinstance(d.get("block_state"), bytes):
        st = d.pop("block_state")
        d["state_counts"] = [st.count(bytes([v])) for v in range(4)]
    return d


def _metrics(url: str) -> MetricsSnapshot:
    return MetricsSnapshot.parse(httpx.get(f"{url}/metrics", timeout=10).text)


def run_pd_proof(out: Path | None = None) -> dict[str, Any]:
    out = out or out_dir()
    res: dict[str, Any] = {"errors": [], "device": None}
    work = Path(tempfile.mkdtemp(prefix="labkit-gpu-"))
    shm = tempfile.mkdtemp(prefix="labkit-kv-", dir="/dev/shm")
    model = write_model(work / "lab-1b")
    obs_ep = f"tcp://127.0.0.1:{free_port()}"
    kv_ep = f"tcp://127.0.0.1:{free_port()}"
    events: list[tuple[float, str, Any]] = []
    lock = threading.Lock()

    def on_batch(batch: Any) -> None:
        now = time.time()
        with lock:
            events.extend((now, batch.engine_id, ev) for ev in batch.events)

    obs_sub = ObserverSubscriber(obs_ep, bind=True, callback=on_batch)
    base = nvml.read_sample()
    res["device"] = base.gpus[0].name
    res["gpu_used_before"] = base.gpus[0].used_bytes
    sampler = nvml.NvmlSampler(hz=4).start()
    kv_tx = lambda name: example_with_observer(shm, obs_ep, name, name)  # noqa: E731
    solo_tx = {**OBSERVER, "kv_connector_extra_config": {"observer_endpoint": obs_ep,
                                                         "observer_name": "solo"}}
    specs = {
        "prefill": serve_args(model, util=0.25, kv_transfer=kv_tx("prefill"),
                              kv_events_endpoint=kv_ep.replace("127.0.0.1", "*")),
        "decode": serve_args(model, util=0.25, kv_transfer=kv_tx("decode")),
        "solo": serve_args(model, util=0.1, kv_cache_memory=2 * GIB, kv_transfer=solo_tx),
        "fp8": serve_args(model, util=0.1, kv_cache_memory=2 * GIB, kv_cache_dtype="fp8"),
        "graphs": serve_args(model, util=0.1, kv_cache_memory=2 * GIB, eager=False),
    }
    engines = {n: VLLMEngine(n, a, role=n, gpus=[0], log_path=out / f"{n}.log",
                             observer_endpoint=obs_ep) for n, a in specs.items()}
    proxy: subprocess.Popen | None = None
    kv_sub: KVEventSubscriber | None = None
    try:
        t0 = time.time()
        for e in engines.values():
            e.start()
        res["start_errors"] = []
        res["startup_s"] = _wait_all(engines, timeout=420, res_errors=res["start_errors"])
        res["all_ready_s"] = round(time.time() - t0, 1)
        res["startup"] = {n: {k: getattr(e.startup, k) for k in (
            "weights_gib", "weights_load_s", "kv_cache_gib", "kv_cache_tokens",
            "max_concurrency", "init_engine_s", "eager", "graph_capture_s", "graph_gib",
            "stage", "errors")} for n, e in engines.items()}
        res["stage_times"] = {n: [(ev.stage, ev.log_time) for ev in e.startup.events]
                              for n, e in engines.items()}
        kv_sub = KVEventSubscriber(kv_ep, topic="kv")
        pport = free_port()
        proxy = subprocess.Popen(
            [sys.executable, "-m", "labkit.pd", "--prefill", engines["prefill"].base_url,
             "--decode", engines["decode"].base_url, "--connector", "example",
             "--port", str(pport)], stdout=open(out / "proxy.log", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True)
        purl = f"http://127.0.0.1:{pport}"
        for _ in range(100):
            try:
                if httpx.get(f"{purl}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        time.sleep(1.0)  # ZMQ slow joiner: let the SUB sockets connect
        _workload(res, purl, engines, events, lock)
        res["solo_request"] = httpx.post(
            f"{engines['solo'].base_url}/v1/completions", timeout=60,
            json={"model": "lab-1b", "prompt": list(range(3, 103)), "max_tokens": 4}).status_code
        time.sleep(1.5)  # trailing pool snapshots and batches
        s = sampler.latest()
        groups = {n: e.group_pids() for n, e in engines.items()}
        res["engine_pids"] = groups
        if s is not None:
            res["nvml_processes"] = [(p.pid, p.used_bytes) for p in s.processes]
            res["nvml_engine_bytes"] = {n: m.total_bytes for n, m in
                                        nvml.attribute(s, groups).items()}
        if kv_sub is not None:
            msgs = kv_sub.drain()
            kinds: dict[str, int] = {}
            for m in msgs:
                for ev in m.batch.events:
                    kinds[type(ev).__name__] = kinds.get(type(ev).__name__, 0) + 1
            res["kv_event_kinds"] = kinds
            res["kv_event_stored_blocks"] = sum(
                len(ev.block_hashes) for m in msgs for ev in m.batch.events
                if type(ev).__name__ == "BlockStored")
    except Exception as exc:  # keep what was measured; the tests report it
        res["errors"].append("".join(traceback.format_exception(exc))[-3000:])
    finally:
        t_stop = time.time()
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        res["exit_codes"] = {n: e.stop(timeout=30) for n, e in engines.items()}
        res["stop_s"] = round(time.time() - t_stop, 1)
        res["left_after_stop"] = {n: pids_in_group(e.pgid) if e.pgid else []
                                  for n, e in engines.items()}
        time.sleep(3)
        res["gpu_used_after"] = nvml.read_sample().gpus[0].used_bytes
        sampler.stop()
        res["peak_gpu_used"] = max((x.gpus[0].used_bytes for x in sampler.samples), default=0)
        if kv_sub is not None:
            kv_sub.close()
        obs_sub.close()
        res["observer_errors"] = obs_sub.num_errors
        with lock:
            res["events"] = [{**_event_dict(n, ev), "recv": t} for t, n, ev in events]
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        save_json("pd_run.json", res)
    return res


def _wait_all(engines: dict[str, VLLMEngine], timeout: float,
              res_errors: list[str]) -> dict[str, float]:
    """Each engine's own start-up seconds (waits in parallel); raises the first failure."""
    out: dict[str, float] = {}
    errors: list[BaseException] = []

    def wait(name: str, e: VLLMEngine) -> None:
        try:
            out[name] = round(e.wait_ready(timeout=timeout, poll_s=0.25), 1)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=item) for item in engines.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for exc in errors:
        res_errors.append(f"start: {exc}"[-2000:])
    if len(errors) > (0 if "graphs" in out else 1):  # only the CUDA-graph engine may fail
        raise errors[0]
    return out


def _workload(res: dict[str, Any], purl: str, engines: dict[str, VLLMEngine],
              events: list, lock: threading.Lock) -> None:
    rng = random.Random(7)
    prompt = [rng.randrange(3, 32000) for _ in range(PROMPT_TOKENS)]
    body = {"model": "lab-1b", "prompt": prompt, "max_tokens": DECODE_TOKENS,
            "ignore_eos": True, "stream": True, "temperature": 0.0}
    dec = engines["decode"].base_url
    n_chunks = 0
    t0 = time.time()
    first = None
    with httpx.stream("POST", f"{purl}/v1/completions", json=body, timeout=120) as r:
        res["proxy_status"] = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            n_chunks += 1
            if first is None:
                first = time.time() - t0
            if n_chunks == 60:  # decode is running: usage gauge vs observer snapshot
                m = _metrics(dec)
                t_m = time.time()
                time.sleep(0.6)  # one more snapshot period
                with lock:
                    snaps = [(t, ev) for t, n, ev in events
                             if n == "decode" and type(ev).__name__ == "PoolSnapshot"]
                res["during"] = {
                    "kv_cache_usage_perc": m.get("vllm:kv_cache_usage_perc"),
                    "num_gpu_blocks": int(m.info("vllm:cache_config_info")["num_gpu_blocks"]),
                    "metrics_ts": t_m,
                    "snapshots": [(ev.ts, ev.num_free, [ev.block_state.count(bytes([v]))
                                                        for v in range(4)])
                                  for t, ev in snaps[-6:]],
                }
    res["ttft_s"] = first
    res["e2e_s"] = time.time() - t0
    res["stream_chunks"] = n_chunks
    mp, md = _metrics(engines["prefill"].base_url), _metrics(dec)
    res["metrics"] = {
        eng: {
            "by_source": {s: m.get("vllm:prompt_tokens_by_source", source=s)
                          for s in ("local_compute", "local_cache_hit", "external_kv_transfer")},
            "num_gpu_blocks": int(m.info("vllm:cache_config_info")["num_gpu_blocks"]),
            "kv_cache_size_tokens": int(m.info("vllm:cache_config_info")["kv_cache_size_tokens"]),
        } for eng, m in (("prefill", mp), ("decode", md))}


if __name__ == "__main__":
    import json

    r = run_pd_proof()
    r.pop("events", None)
    print(json.dumps(r, indent=1, default=str))
