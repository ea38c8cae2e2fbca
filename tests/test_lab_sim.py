"""A simulated PD pair through the product API: `labkit.Lab(mode="sim")` starts two engine
subprocesses and the PD proxy; the openai client talks to the proxy over real HTTP; decode's
/metrics counts the KV that crossed the way vLLM 0.26 counts it; the live telemetry delivers
observer events of both engines, the proxy timeline, metrics and (simulated) GPU memory.
"""

from __future__ import annotations

import time

import openai
import pytest

import labkit
from labkit.engines.base import pids_in_group
from labkit.lab import Lab
from labkit.telemetry.metrics import scrape

PROMPT = list(range(100, 1181))  # 1,081 token ids


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("connector,external", [("example", 1072), ("nixl", 1081)])
def test_openai_client_through_the_proxy_and_kv_counted_like_vllm(tmp_path, connector, external):
    lab = Lab(mode="sim", model="lab-1b", num_gpu_blocks=600, connector=connector,
              run_dir=tmp_path / "run", speed=0)
    assert lab.kind == "sim" and "SIMULATED" in lab.describe()
    with lab:
        groups = [e.pgid for e in lab.engines.values()] + [lab.proxy.pgid]
        client = openai.OpenAI(base_url=f"{lab.url}/v1", api_key="none")
        r = client.completions.create(model="lab-1b", prompt=PROMPT, max_tokens=8,
                                      extra_body={"ignore_eos": True})
        assert r.usage.prompt_tokens == 1081 and r.usage.completion_tokens == 8
        dec = scrape(lab.engines["decode"].base_url)
        pre = scrape(lab.engines["prefill"].base_url)
        assert dec.get("vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == external
        assert dec.get("vllm:prompt_tokens_by_source_total", source="local_compute") == 1081 - external
        assert pre.get("vllm:prompt_tokens_by_source_total", source="local_compute") == 1081
        chunks = list(client.completions.create(model="lab-1b", prompt="Hello there, lab",
                                                max_tokens=5, stream=True,
                                                extra_body={"ignore_eos": True}))
        assert sum(len(c.choices[0].text) > 0 for c in chunks if c.choices) >= 4
        models = client.models.list()
        assert [m.id for m in models.data] == ["lab-1b"]
    assert all(not pids_in_group(g) for g in groups), "a process survived Lab.stop()"


def test_live_telemetry_from_a_simulated_pair(tmp_path):
    with Lab(mode="sim", model="lab-1b", num_gpu_blocks=400, run_dir=tmp_path / "run",
             speed=0) as lab:
        tel = lab.telemetry()
        desc = tel.describe()
        assert desc["kind"] == "sim"
        assert {e["name"] for e in desc["engines"]} == {"prefill", "decode"}
        assert all(e["num_blocks"] == 400 for e in desc["engines"])
        lab.complete(PROMPT, max_tokens=6)
        seen = {"obs": set(), "timeline": [], "metrics": set(), "gpu": 0}

        def drained():
            d = tel.poll()
            seen["obs"] |= {b.engine_id for b in d.observer}
            seen["timeline"] += [e["event"] for e in d.timeline]
            seen["metrics"] |= {m.engine for m in d.metrics}
            seen["gpu"] += len(d.gpu_samples)
            return (seen["obs"] == {"prefill", "decode"} and "finish" in seen["timeline"]
                    and seen["metrics"] == {"prefill", "decode"} and seen["gpu"] > 0)

        assert _wait(drained, 10), seen
        order = [e for e in seen["timeline"] if e != "token"]
        assert order.index("arrival") < order.index("prefill_end") < order.index("finish")
        # KV events arrived in vLLM's wire format from the engine that computed the prompt
        kv = tel.recent_kv_events()
        assert any(type(ev).__name__ == "BlockStored"
                   for _, m in kv for ev in m.batch.events)
        assert {engine for engine, _ in kv} >= {"prefill"}
        assert tel.dropped() == {"observer": 0, "timeline": 0, "metrics": 0, "gpu": 0}
        assert tel.observer_drops() == {}  # the simulated engines' observers lost nothing


def test_lab_validates_before_starting(tmp_path):
    with pytest.raises(labkit.plan.ConfigError) as exc:
        Lab(mode="sim", model="llama-3.1-8b", tp=3, run_dir=tmp_path)
    assert "tp" in str(exc.value).lower()
    assert not (tmp_path / "prefill.log").exists()


def _steps_of_concurrent_prompts(tmp_path, name: str, **options) -> tuple[float, float, float]:
    """Three 300-token prompts at once (one request with a list of prompts: they reach the
    engine together, whatever the machine's load) to a paced simulated ExampleConnector
    prefill engine with a 512-token budget: (steps that ran, tokens they ran, steps of at most
    256 tokens) from its /metrics (vllm:iteration_tokens_total)."""
    import httpx

    from labkit.engines.sim.process import SimEngineProcess

    eng = SimEngineProcess(name, role="prefill", connector="example", run_dir=tmp_path / name,
                           log_path=tmp_path / f"{name}.log", model="lab-1b", gpu_type="h200",
                           max_num_batched_tokens=512, max_model_len=512, speed=0.05, **options)
    try:
        eng.start()
        eng.wait_ready(timeout=30)
        prompts = [[1000 * (i + 1) + t for t in range(300)] for i in range(3)]
        r = httpx.post(f"{eng.base_url}/v1/completions", timeout=30,
                       json={"model": "lab-1b", "prompt": prompts, "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 3
        m = scrape(eng.base_url)
        return (m.sum("vllm:iteration_tokens_total_count"), m.sum("vllm:iteration_tokens_total_sum"),
                m.sum("vllm:iteration_tokens_total_bucket", le="256.0"))
    finally:
        eng.stop()


def test_example_prefill_gets_chunked_prefill_off_and_never_splits_a_prompt(tmp_path):
    """The plan turns chunked prefill off on an ExampleConnector prefill engine; the simulated
    process gets vLLM's --no-enable-chunked-prefill and its scheduler then runs each prompt
    whole: three 300-token prompts against a 512-token budget run as 3 steps of 300 tokens."""
    lab = Lab(mode="sim", model="lab-1b", num_gpu_blocks=600, connector="example",
              run_dir=tmp_path / "run", speed=0)
    with lab:
        assert "--no-enable-chunked-prefill" in lab.engines["prefill"].command()
        assert "--no-enable-chunked-prefill" not in lab.engines["decode"].command()
    off = _steps_of_concurrent_prompts(tmp_path, "off", enable_chunked_prefill=False)
    assert off == (3, 900, 0)  # every step one whole prompt (300 tokens), however they arrive
    # The flag reaches the engine process (its start-up line), and nowhere else is it default.
    assert "enable_chunked_prefill=False" in (tmp_path / "off.log").read_text()
    _steps_of_concurrent_prompts(tmp_path, "on")
    assert "enable_chunked_prefill=True" in (tmp_path / "on.log").read_text()
    # (Whether a prompt meeting a partly used budget is split or waits is decided in the
    # scheduler: tests/test_sim_scheduler.py runs it in-process, without HTTP timing.)
