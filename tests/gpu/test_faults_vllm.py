"""Faults on REAL vLLM: kill -9 an engine of a PD pair while requests flow through the proxy.

The same checks as the CPU suite's tests/test_reliability_faults.py (whose request driver
this reuses), on a real `Lab(mode="vllm")` pair sharing one GPU with ExampleConnector: every
request ends (none hangs), each failure names the dead engine and comes within 2 s of the
kill, requests decode already held still finish after a prefill kill, and
`Lab.restart_engine` brings the pair back. At the end nothing is left running and GPU memory
is back where it started.
"""

from __future__ import annotations

import time

import httpx
import pytest
from _lab_support import gpu_used, wait_gpu_back
from _support import out_dir, save_json
from test_reliability_faults import _check_no_hang, flow_with_fault

from labkit import faults

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from labkit.lab import Lab

    before = gpu_used()
    lab = Lab(mode="vllm", model="lab-1b", num_gpus=1, connector="example",
              run_dir=tmp_path_factory.mktemp("faults"), read_timeout=10.0)
    t0 = time.time()
    lab.start(progress=False)
    lab.start_s = round(time.time() - t0, 1)  # type: ignore[attr-defined]
    yield lab
    groups = list(faults.lab_groups(lab).values())
    lab.stop()
    assert faults.wait_groups_gone(groups, timeout=20) >= 0
    assert not faults.pids_in_groups(groups)
    after = wait_gpu_back(before, [0])
    assert after[0] <= before[0] + (512 << 20)


def _summary(outcomes, t_kill) -> dict:
    failed = [o for o in outcomes if o.status != 200]
    return {"n": len(outcomes), "failed": len(failed),
            "worst_error_after_kill_s": round(max((o.done - max(o.sent, t_kill)
                                                   for o in failed), default=0.0), 3),
            "ok_after_kill": sum(1 for o in outcomes if o.status == 200 and o.done > t_kill)}


def test_kill_prefill_then_restart(lab) -> None:
    out = out_dir()
    outcomes, t_kill = flow_with_fault(lab.url, 24, 3.0, 1.5,
                                       lambda: faults.kill_engine(lab, "prefill"))
    failed = _check_no_hang(outcomes, t_kill, "prefill engine")
    res = {"start_s": lab.start_s, **_summary(outcomes, t_kill)}
    assert failed, "no request failed: the kill came too late"
    assert res["ok_after_kill"] > 0, "decode did not finish what it held"
    assert lab.engines["decode"].health()
    assert httpx.get(f"{lab.url}/health", timeout=5).status_code == 503
    t0 = time.monotonic()
    lab.restart_engine("prefill", timeout=300)
    res["restart_s"] = round(time.monotonic() - t0, 1)
    assert lab.complete("after the restart", max_tokens=4)["usage"]["completion_tokens"] == 4
    save_json("faults_prefill.json", res)
    assert out.exists()


def test_kill_decode_then_restart(lab) -> None:
    outcomes, t_kill = flow_with_fault(lab.url, 24, 3.0, 1.5,
                                       lambda: faults.kill_engine(lab, "decode"))
    failed = _check_no_hang(outcomes, t_kill, "decode engine")
    res = _summary(outcomes, t_kill)
    assert [o for o in failed if o.sent < t_kill], "no request was cut off in flight"
    assert lab.engines["prefill"].health()
    t0 = time.monotonic()
    lab.restart_engine("decode", timeout=300)
    res["restart_s"] = round(time.monotonic() - t0, 1)
    assert lab.complete("after the restart", max_tokens=4)["usage"]["completion_tokens"] == 4
    save_json("faults_decode.json", res)

