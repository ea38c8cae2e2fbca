"""CUDA_VISIBLE_DEVICES: the lab runs on the GPUs its parent names, counted from 0 (logical),
and hands each engine the parent's entries for its GPUs. NVML (which ignores the variable) is
a stand-in with 4 GPUs; GPU 1 is in MIG mode with two instances."""

from __future__ import annotations

import sys
import types
from dataclasses import replace

import pytest

import labkit.plan.planner as config
from labkit.engines.base import EngineHandle
from labkit.plan import ConfigError, EngineConfig, PDConfig, env_for, validate
from labkit.plan.devices import (
    cuda_visible_devices,
    detect,
    engine_gpu_env,
    resolve_visible,
    visible_entries,
)
from labkit.telemetry import nvml
from labkit.telemetry.source import SourceInfo
from labkit.viz.memory import MemoryView
from labkit.viz.state import MemoryState

GIB = 1 << 30
UUIDS = [f"GPU-{c * 8}-4106-c12f-20bd9faed9f6" for c in "abcd"]
MIGS = {(1, 0): "MIG-11111111-2222-5555-8888-000000000000",
        (1, 1): "MIG-11111111-2222-5555-8888-000000000001"}
PIDS = {0: 100, 1: 101, 2: 102, 3: 103}  # one compute process per GPU (pid 100 + index)


def fake_nvml() -> types.ModuleType:
    """nvidia-ml-py as detect() and telemetry.nvml call it: 4 H100s, distinct memory use."""
    m = types.ModuleType("pynvml")
    m.nvmlInit = m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: 4
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: "NVIDIA H100 80GB HBM3"
    m.nvmlDeviceGetUUID = lambda h: MIGS[h[1:]] if isinstance(h, tuple) else UUIDS[h]
    m.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)

    def memory(h):
        if isinstance(h, tuple):  # a MIG instance
            return types.SimpleNamespace(total=10 * GIB, used=GIB)
        return types.SimpleNamespace(total=80 * GIB, used=(h + 1) * GIB)

    def mig_slots(h):
        if h != 1:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 7

    def mig_handle(h, j):
        if (h, j) not in MIGS:
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return ("mig", h, j)

    m.nvmlDeviceGetMemoryInfo = memory
    m.nvmlDeviceGetMaxMigDeviceCount = mig_slots
    m.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=10 * h)
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=PIDS[h], usedGpuMemory=(h + 1) * GIB)]
    return m


@pytest.fixture
def nv(monkeypatch):
    """The stand-in NVML for detect() (imports pynvml) and the sampler (caches it)."""
    m = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", m)
    monkeypatch.setattr(nvml, "_NVML", m)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return m


def real_plan(hw) -> config.Plan:
    """A 2-GPU PD plan on `hw`, as real vLLM would run it."""
    cfg = PDConfig(EngineConfig(role="prefill"), EngineConfig(role="decode"), num_gpus=2)
    plan = validate(cfg, hw)
    assert [e.gpus for e in plan.engines] == [[0], [1]]  # plans count logical GPUs
    return replace(plan, kind="vllm")


def test_detect_keeps_the_named_gpus_in_order(nv, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    hw = detect()
    assert not hw.simulated and hw.num_gpus == 2
    assert [(g.index, g.physical, g.uuid) for g in hw.gpus] == [(0, 2, UUIDS[2]),
                                                                 (1, 3, UUIDS[3])]
    assert [g.memory_used for g in hw.gpus] == [3 * GIB, 4 * GIB]  # physical 2's, 3's
    assert "physical GPU(s) 2, 3 of 4" in hw.note
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,0")  # CUDA's order is the entries' order
    assert [g.physical for g in detect().gpus] == [3, 0]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [(g.index, g.physical) for g in detect().gpus] == [(i, i) for i in range(4)]


def test_env_for_gives_each_engine_the_parents_entries(nv, monkeypatch):
    monkeypatch.setattr(config, "nixl_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    plan = real_plan(detect())
    pre, dec = env_for("prefill", plan), env_for("decode", plan)
    assert (pre["CUDA_VISIBLE_DEVICES"], dec["CUDA_VISIBLE_DEVICES"]) == ("2", "3")
    assert pre["CUDA_DEVICE_ORDER"] == dec["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert env_for("decode", plan)["CUDA_VISIBLE_DEVICES"] == "1"
    assert env_for("decode", plan)["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_engine_handle_environment_translates_its_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    env = EngineHandle("decode", kind="vllm", gpus=[1], port=1).environment()
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    tp2 = EngineHandle("tp2", kind="vllm", gpus=[1, 0], port=1).environment()
    assert tp2["CUDA_VISIBLE_DEVICES"] == "3,2"
    with pytest.raises(ConfigError, match="lets this process use 2 GPU"):
        EngineHandle("far", kind="vllm", gpus=[2], port=1).environment()


def test_uuid_entries(nv, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{UUIDS[3]}, {UUIDS[1]}")
    hw = detect()
    assert [(g.index, g.physical) for g in hw.gpus] == [(0, 3), (1, 1)]
    plan = real_plan(hw)
    assert env_for("prefill", plan)["CUDA_VISIBLE_DEVICES"] == UUIDS[3]
    assert env_for("decode", plan)["CUDA_VISIBLE_DEVICES"] == UUIDS[1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"2,{UUIDS[0]}")  # indices and UUIDs mixed
    assert [g.physical for g in detect().gpus] == [2, 0]


def test_mig_entry_is_its_gpu_with_the_instances_memory(nv, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIGS[(1, 1)])
    (g,) = detect().gpus
    assert (g.index, g.physical, g.uuid, g.memory_total) == (0, 1, MIGS[(1, 1)], 10 * GIB)
    assert detect().gpu_type.memory_bytes < 10 * GIB  # planned on the slice, not the GPU
    assert engine_gpu_env([0])["CUDA_VISIBLE_DEVICES"] == MIGS[(1, 1)]


@pytest.mark.parametrize("value", ["", "-1", " "])
def test_empty_means_no_gpu(nv, monkeypatch, value):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    hw = detect()
    assert hw.simulated and hw.num_gpus == 0 and "hides every GPU" in hw.note
    assert visible_entries() == [] and not nvml.available()
    assert nvml.read_sample().gpus == []


@pytest.mark.parametrize("value,problem,fix", [
    ("7", "GPU 7 does not exist (NVML sees 4 GPU(s): 0..3)", "nvidia-smi -L"),
    ("2,x", "entry 'x' names no GPU", "CUDA_VISIBLE_DEVICES=0,1"),
    ("2,,3", "entry '' names no GPU", "comma-separated"),
    ("2,2", "names physical GPU 2 twice", "name each GPU once"),
    (f"2,{UUIDS[2]}", "names physical GPU 2 twice", "name each GPU once"),
    ("GPU-cccc", "abbreviated UUID (of GPU(s) [2])", f"write {UUIDS[2]}"),
    ("GPU-ffff", "no GPU has UUID 'GPU-ffff'", "nvidia-smi -L"),
    ("MIG-9999", "no GPU has UUID 'MIG-9999'", "nvidia-smi -L"),
])
def test_an_entry_that_names_no_gpu_is_refused_with_the_fix(nv, monkeypatch, value, problem,
                                                            fix):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    with pytest.raises(ConfigError) as err:
        detect()
    assert problem in err.value.problem and fix in err.value.fix
    with pytest.raises(ConfigError):  # the sampler would not silently show other GPUs
        nvml.read_sample()


def test_pure_helpers_without_nvml():
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert visible_entries({}) is None and visible_entries(env) == ["2", "3"]
    assert cuda_visible_devices([1, 0], env) == "3,2" and cuda_visible_devices([1], {}) == "1"
    assert resolve_visible(None, UUIDS) == [0, 1, 2, 3]
    assert resolve_visible(["MIG-x", "0"], UUIDS, {"MIG-x": 3}) == [3, 0]
    with pytest.raises(ConfigError, match="logical 0..1"):
        cuda_visible_devices([2], env)


def test_nvml_samples_only_the_visible_gpus(nv, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    s = nvml.read_sample()
    assert [(g.index, g.physical, g.used_bytes) for g in s.gpus] == [(0, 2, 3 * GIB),
                                                                     (1, 3, 4 * GIB)]
    assert [(p.gpu, p.pid) for p in s.processes] == [(0, PIDS[2]), (1, PIDS[3])]
    per = nvml.attribute(s, {"prefill": [PIDS[2]], "decode": [PIDS[3]]})
    assert per["prefill"].per_gpu == {0: 3 * GIB} and per["decode"].per_gpu == {1: 4 * GIB}
    assert "other" not in per  # GPUs 0 and 1 (and their processes) are not this lab's
    assert nvml.available()


def test_memory_view_shows_logical_gpus_with_their_physical_index(nv, monkeypatch):
    from labkit.telemetry.live import LiveTelemetry

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    gpus = [{"index": k, "name": "NVIDIA H100 80GB HBM3", "total_bytes": 80 * GIB}
            for k in (0, 1)]
    live = LiveTelemetry("vllm", [], gpus=gpus, interval=0.05)
    try:
        samples = []
        for _ in range(100):
            samples += live.poll().gpu_samples
            if len(samples) >= 2:
                break
            live._stop.wait(0.05)
    finally:
        live.close()
    assert [(s.gpu, s.physical, s.used_bytes) for s in samples[:2]] == [(0, 2, 3 * GIB),
                                                                        (1, 3, 4 * GIB)]
    state = MemoryState()
    view = MemoryView(state, SourceInfo.from_dict({**live.describe(), "engines": []}))
    for s in samples:
        state.apply_sample(s)
    view.update()
    free = next(tr for tr in view.figure.data if tr.name == "free")
    assert list(free.x) == ["GPU 0 (physical 2)", "GPU 1 (physical 3)"]
    assert list(free.y) == pytest.approx([77, 76])
    titles = [a.text for a in view.figure.layout.annotations]
    assert "GPU 1 (physical 3) over time (GiB)" in titles


def test_labkit_plan_reports_a_bad_entry_as_error_and_fix(nv, monkeypatch, capsys):
    from labkit.cli import main as cli_main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,7")
    assert cli_main(["plan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "fix:" in err and "Traceback" not in err
