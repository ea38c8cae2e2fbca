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
        kv = tel.store.since("kv", 0).events
        assert any(type(ev).__name__ == "BlockStored"
                   for m in kv for ev in m.event.batch.events)
        assert {m.source for m in kv} >= {"prefill"}


def test_lab_validates_before_starting(tmp_path):
    with pytest.raises(labkit.config.ConfigError) as exc:
        Lab(mode="sim", model="llama-3.1-8b", tp=3, run_dir=tmp_path)
    assert "tp" in str(exc.value).lower()
    assert not (tmp_path / "prefill.log").exists()
