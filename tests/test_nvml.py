"""NVML sampling (on a GPU) and the pid -> engine mapping (anywhere, on recorded samples)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types

import pytest

from labkit.engines.base import pids_in_group
from labkit.telemetry import nvml
from labkit.telemetry.nvml import GpuSample, ProcessMemory, Sample, attribute

GIB = 1 << 30

# Recorded on the lent H200 (tests/gpu/pd_run.py, 2026-11-21): NVML's compute processes are
# the EngineCore children; the API servers hold no GPU memory.
RECORDED = Sample(
    ts=1795251133.5,
    gpus=[GpuSample(0, "NVIDIA H200", 40_893_022_208, 150_754_820_096, 0)],
    processes=[ProcessMemory(0, 954, 4_045_406_208), ProcessMemory(0, 961, 5_307_891_712),
               ProcessMemory(0, 943, 5_257_560_064), ProcessMemory(0, 948, 25_610_420_224),
               ProcessMemory(0, 4242, None)],
)
GROUPS = {"prefill": [502, 946, 948], "decode": [504, 953, 954], "solo": [506, 939, 943]}


def test_attribute_maps_processes_to_engines():
    per = attribute(RECORDED, GROUPS)
    assert per["prefill"].total_bytes == 25_610_420_224 and per["prefill"].pids == [948]
    assert per["decode"].per_gpu == {0: 4_045_406_208}
    # pid 961 (an engine not asked about) and 4242 (memory hidden by the driver) -> other
    assert per["other"].pids == [961, 4242] and per["other"].total_bytes == 5_307_891_712
    assert attribute(RECORDED, {"idle": [1]})["idle"].total_bytes == 0


def test_attribute_sums_ranks_of_one_engine_per_gpu():
    s = Sample(0.0, [], [ProcessMemory(0, 10, 3 * GIB), ProcessMemory(1, 11, 3 * GIB),
                         ProcessMemory(1, 12, GIB)])
    per = attribute(s, {"tp2": [10, 11], "x": [12]})
    assert per["tp2"].per_gpu == {0: 3 * GIB, 1: 3 * GIB} and per["tp2"].total_bytes == 6 * GIB
    assert per["x"].per_gpu == {1: GIB}


def test_attribute_with_a_live_process_group():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             start_new_session=True)
    try:
        deadline = time.time() + 5
        while child.pid not in pids_in_group(child.pid):
            assert time.time() < deadline
            time.sleep(0.05)
        s = Sample(0.0, [], [ProcessMemory(0, child.pid, GIB), ProcessMemory(0, os.getpid(), 1)])
        per = attribute(s, {"engine": pids_in_group(child.pid)})
        assert per["engine"].total_bytes == GIB and per["other"].pids == [os.getpid()]
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not nvml.available(), reason="no NVIDIA GPU (NVML)")
def test_sampler_reads_the_gpus():
    with nvml.NvmlSampler(hz=20) as sampler:
        time.sleep(0.3)
    s = sampler.latest()
    assert s is not None and len(sampler.samples) >= 2 and sampler.num_errors == 0
    assert all(0 < g.used_bytes <= g.total_bytes for g in s.gpus)


def test_without_nvml_the_sampler_refuses_to_start():
    if nvml.available():
        pytest.skip("NVML present")
    with pytest.raises(RuntimeError):
        nvml.NvmlSampler().start()
    with pytest.raises(RuntimeError):
        nvml.read_sample()


def test_read_sample_numbers_the_visible_gpus_by_position(monkeypatch):
    """NVML ignores CUDA_VISIBLE_DEVICES: the sampler keeps the GPUs it names, renumbered."""
    m = types.SimpleNamespace(
        nvmlDeviceGetCount=lambda: 3, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUUID=lambda h: f"GPU-{h}", nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=h * GIB, total=140 * GIB),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=h),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            types.SimpleNamespace(pid=500 + h, usedGpuMemory=h * GIB)])
    monkeypatch.setattr(nvml, "_NVML", m)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    s = nvml.read_sample()
    assert [(g.index, g.physical, g.used_bytes) for g in s.gpus] == [(0, 1, GIB)]
    assert s.processes == [ProcessMemory(0, 501, GIB)]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [(g.index, g.physical) for g in nvml.read_sample().gpus] == [(0, 0), (1, 1), (2, 2)]
