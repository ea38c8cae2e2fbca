"""Record REAL vLLM 0.26 scheduler traces under memory pressure, for the conformance harness.

    source .gpu-carry/on-device.sh && PYTHONPATH=$PWD python3 tests/gpu/record_conformance.py \
        $OUT [CASE ...]

Each case runs one offline `vllm.LLM` (lab-1b, dummy weights, enforce_eager) with labkit's
observer connector (kv_both, `observer_trace: true`: EngineSettings, RequestAdded with the
prompt token ids, StepScheduled with the free count), a small pool
(`num_gpu_blocks_override`), and writes OUT/conformance-<case>.lkrec plus
OUT/conformance-<case>.log. Then `python -m labkit.bench.conformance OUT/*.lkrec` replays
them; ship the good ones in labkit/data/conformance/ (tests/test_sim_conformance.py can then
add them to FULL). Cases (default: all):

- preempt-async: ~100-block pool, 6 long prompts, async scheduling on (deferred frees: the
  observer is a kv_both connector, as a PD decode engine's is)
- preempt-sync: the same, async scheduling off (frees at once)
- prefix-evict: shared prefixes in a 120-block pool, later requests re-send evicted ones
- abort-prefill: chunk 64, long prompts, two requests aborted mid-prefill
- chunked-long: chunk 256, 3,000-token prompts in a 260-block pool
- pd-decode-preempt: a PD decode engine (ExampleConnector, kv_both, async scheduling on) with
  the ~100-block pool of preempt-async: a prefill engine (its own offline LLM, run first in the
  same process, then shut down) stores the prompts' KV under /dev/shm; the decode engine loads
  it (WAITING_FOR_REMOTE_KVS is not used: ExampleConnector loads synchronously) and preempts
"""
from __future__ import annotations

import random
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

CASES: dict[str, dict[str, Any]] = {
    "preempt-async": dict(blocks=100, chunk=2048, async_scheduling=True, prompts=[700] * 6, max_tokens=200),
    "preempt-sync": dict(blocks=100, chunk=2048, async_scheduling=False, prompts=[700] * 6, max_tokens=200),
    "prefix-evict": dict(blocks=120, chunk=2048, async_scheduling=True, prompts=[600] * 8, max_tokens=40,
                         shared=512),
    "abort-prefill": dict(blocks=200, chunk=64, async_scheduling=True, prompts=[1500] * 4, max_tokens=32,
                          abort=2),
    "chunked-long": dict(blocks=260, chunk=256, async_scheduling=True, prompts=[3000, 2000, 1000], max_tokens=64),
    "pd-decode-preempt": dict(blocks=100, chunk=2048, async_scheduling=True, prompts=[700] * 6, max_tokens=200,
                              pd=True),
}


class _Collector:
    """A bound SUB socket the observer publishers connect to; a TelemetrySource for Recorder."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        from labkit.telemetry.observer_schema import OBS_TOPIC

        self._sock = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, OBS_TOPIC)
        self._sock.bind(endpoint)
        self._batches: list[Any] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import zmq

        from labkit.telemetry.observer_schema import decode_observer_frames

        while not self._stop:
            if self._sock.poll(50, zmq.POLLIN):
                batch = decode_observer_frames(self._sock.recv_multipart())
                with self._lock:
                    self._batches.append(batch)

    def poll(self) -> Any:
        from labkit.telemetry.source import TelemetryDelta

        with self._lock:
            out, self._batches = self._batches, []
        return TelemetryDelta(observer=out)

    def describe(self) -> dict[str, Any]:
        return {"kind": "vllm", "engines": ["engine"], "note": "conformance trace (offline LLM)"}

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self._sock.close(linger=0)


def _pd_decode_config(model_dir: Path, run_dir: Path, endpoint: str,
                      prompts: list[list[int]]) -> dict[str, Any]:
    """Run the prefill side (an offline LLM with ExampleConnector, ample pool, max_tokens=1)
    so the prompts' KV is in ExampleConnector's storage; return the decode engine's
    kv_transfer_config: MultiConnector [observer open, ExampleConnector, observer close], as
    a Lab's decode engine has it (labkit.plan.vllm_args.kv_transfer_config), tracing on."""
    from vllm import LLM, SamplingParams

    from labkit.plan.vllm_args import kv_transfer_config

    run_dir.mkdir(parents=True, exist_ok=True)
    prefill = LLM(model=str(model_dir), load_format="dummy", enforce_eager=True, block_size=16,
                  num_gpu_blocks_override=1024, kv_cache_memory_bytes=1024 << 20,
                  max_model_len=4096, gpu_memory_utilization=0.1,
                  kv_transfer_config=kv_transfer_config("example", "prefill", run_dir))
    prefill.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    try:
        prefill.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del prefill
    cfg = kv_transfer_config("example", "decode", run_dir, endpoint, observer_name="engine")
    for child in cfg["kv_connector_extra_config"]["connectors"]:
        if child["kv_connector"] == "LabkitObserverConnector":
            child["kv_connector_extra_config"]["observer_trace"] = True
    return cfg


def run_case(out: Path, name: str, case: dict[str, Any], port: int) -> Path:
    from vllm import LLM, SamplingParams

    from labkit.telemetry.recording import Recorder

    endpoint = f"tcp://127.0.0.1:{port}"
    col = _Collector(endpoint)
    rec = Recorder(col, out / f"conformance-{name}.lkrec")
    rng = random.Random(13)
    shared = [rng.randrange(1, 30000) for _ in range(case.get("shared", 0))]
    prompts = []
    for i, n in enumerate(case["prompts"]):
        body = [rng.randrange(1, 30000) for _ in range(n - len(shared))]
        prompts.append((shared if i % 2 == 0 else []) + body if shared else body)
    if shared:  # re-send the first prompts after the pool has moved on (evicted or not)
        prompts += prompts[:3]
    from labkit.models import get_model, write_model_dir

    model_dir = write_model_dir(get_model("lab-1b"), Path("/tmp/lk-models/lab-1b"))
    observer = {"kv_connector": "LabkitObserverConnector", "kv_role": "kv_both",
                "kv_connector_module_path": "labkit.pd.observer",
                "kv_connector_extra_config": {"observer_endpoint": endpoint,
                                              "observer_name": "engine",
                                              "observer_trace": True}}
    if case.get("pd"):
        observer = _pd_decode_config(model_dir, out / f"kv-{name}", endpoint, prompts)
    # Exact KV bytes (lab-1b: 1 MiB per 16-token block) skip the memory profile, so the
    # cases can start side by side on one GPU (each in its own process: see main).
    llm = LLM(model=str(model_dir),
              load_format="dummy", enforce_eager=True, block_size=16,
              num_gpu_blocks_override=case["blocks"], max_num_batched_tokens=case["chunk"],
              kv_cache_memory_bytes=case["blocks"] << 20,
              # vLLM refuses a pool that cannot hold one max_model_len request
              max_num_seqs=16, max_model_len=min(4096, case["blocks"] * 16),
              gpu_memory_utilization=0.1,
              async_scheduling=case["async_scheduling"], enable_prefix_caching=True,
              kv_transfer_config=observer)
    params = SamplingParams(max_tokens=case["max_tokens"], ignore_eos=True, temperature=0.0)
    engine = llm.llm_engine
    for i, p in enumerate(prompts):  # a TokensPrompt dict (raw prompts: still taken in 0.26)
        engine.add_request(f"req-{i}", {"prompt_token_ids": p}, params)
    step = 0
    aborted = False
    while engine.has_unfinished_requests():
        engine.step()
        step += 1
        if case.get("abort") and step == 3 and not aborted:  # mid-prefill at chunk 64
            # external ids: LLMEngine.abort_request maps them to the internal (suffixed) ones
            engine.abort_request([f"req-{i}" for i in range(1, 1 + case["abort"])])
            aborted = True
        rec.write(col.poll())
    time.sleep(0.5)
    rec.write(col.poll())
    path = rec.close()
    col.close()
    try:  # one case per process is the safe way (the batch does that); this frees the GPU early
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    return path


def main(argv: list[str]) -> int:
    out, *names = argv
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    rc = 0
    for name in names or list(CASES):
        k = list(CASES).index(name)
        t0 = time.time()
        try:
            path = run_case(outdir, name, CASES[name], 5700 + k)
            print(f"{name}: {path} {path.stat().st_size} B in {time.time() - t0:.0f} s", flush=True)
        except Exception:
            (outdir / f"conformance-{name}.log").write_text(traceback.format_exc())
            traceback.print_exc()
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
