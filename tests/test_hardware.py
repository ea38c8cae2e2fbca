"""GPU table, NVML name mapping, detection without a GPU (and with a stand-in NVML)."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from labkit.hardware import (
    GPU_TYPES,
    LINKS,
    Hardware,
    gpu_type_for,
    simulated,
    vllm_available,
)
from labkit.plan import detect
from labkit.vocab import GiB


def test_datasheet_numbers():
    h100, h200, a100, l4 = (GPU_TYPES[k] for k in ("h100", "h200", "a100", "l4"))
    assert h100.bf16_flops == 989e12 and h100.mem_bw == 3.35e12 and h100.nvlink_bw == 450e9
    assert round(h100.memory_bytes / GiB, 2) == 79.18  # what CUDA (and vLLM's log) reports
    assert h200.mem_bw == 4.8e12 and 139 * GiB < h200.memory_bytes < 141 * GiB
    assert (
        a100.bf16_flops == 312e12 and a100.fp8_flops is None and a100.compute_capability == (8, 0)
    )
    assert l4.bf16_flops == 121e12 and l4.mem_bw == 300e9 and l4.nvlink_bw is None
    assert l4.memory_bytes < 24e9 and l4.compute_capability == (8, 9)


def test_fp8_kv_support_follows_compute_capability():
    assert GPU_TYPES["h100"].supports_fp8_kv and GPU_TYPES["l4"].supports_fp8_kv
    assert not GPU_TYPES["a100"].supports_fp8_kv


def test_links():
    assert set(LINKS) == {"same-gpu", "nvlink", "pcie", "rdma", "roce", "tcp"}
    assert LINKS["nvlink"].bandwidth > LINKS["pcie"].bandwidth > LINKS["tcp"].bandwidth
    assert all(link.latency > 0 for link in LINKS.values())


def test_cross_node_links_never_beat_nvlink_as_measured():
    from labkit.hardware import achieved_link

    nvlink = achieved_link("nixl", LINKS["nvlink"])
    for key in ("rdma", "roce", "tcp"):
        link = achieved_link("nixl", LINKS[key])
        assert link.bandwidth <= min(nvlink.bandwidth, LINKS[key].bandwidth)
        assert link.latency >= nvlink.latency and "bound" in link.name
    assert achieved_link("nixl", LINKS["tcp"]).bandwidth < nvlink.bandwidth


@pytest.mark.parametrize(
    "name,key",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", None),
        ("Tesla T4", None),
    ],
)
def test_nvml_names_map_to_types(name, key):
    t = gpu_type_for(name)
    assert (t.key if t else None) == key


def test_simulated():
    hw = simulated(4, "l4")
    assert hw.simulated and hw.num_gpus == 4 and hw.gpu_type.key == "l4"
    assert [g.index for g in hw.gpus] == [0, 1, 2, 3]
    assert simulated(0).num_gpus == 0
    with pytest.raises(ValueError, match="unknown gpu_type"):
        simulated(2, "v100")


def test_detect_without_gpu_is_simulated(monkeypatch):
    fake = types.ModuleType("pynvml")

    def fail():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    hw = detect()
    assert isinstance(hw, Hardware) and hw.simulated and hw.num_gpus == 0
    assert hw.note.startswith("no GPU") and "Not Found" in hw.note


def test_detect_on_this_machine_never_raises():
    hw = detect()
    assert hw.simulated == (hw.num_gpus == 0)


def _fake_nvml(names: list[str]) -> types.ModuleType:
    """A stand-in for nvidia-ml-py with the calls detect() makes."""
    m = types.ModuleType("pynvml")
    m.nvmlInit = lambda: None
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: len(names)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: names[h].encode()  # old bindings return bytes
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=81_559 * 2**20, used=600 * 2**20
    )
    m.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
    return m


def test_detect_maps_nvml_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(["NVIDIA H100 80GB HBM3"] * 2))
    hw = detect()
    assert not hw.simulated and hw.num_gpus == 2 and hw.gpu_type.key == "h100"
    g = hw.gpus[1]
    assert g.index == 1 and g.name == "NVIDIA H100 80GB HBM3" and g.uuid == "GPU-1"
    assert g.memory_total == 81_559 * 2**20 and g.compute_capability == (9, 0)


def test_detect_numbers_the_visible_gpus_and_keeps_nvmls_index(monkeypatch):
    names = ["NVIDIA L4", "NVIDIA A100-SXM4-80GB", "NVIDIA H200"]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(names))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    hw = detect()
    (g,) = hw.gpus  # logical GPU 0 is NVML's GPU 2, and the machine's type is its type
    assert (g.index, g.physical, g.uuid, hw.gpu_type.key) == (0, 2, "GPU-2", "h200")
    assert simulated(1).gpus[0].physical is None  # a simulated GPU is no NVML GPU


def test_detect_unknown_gpu_gets_a_type_from_nvml(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(["NVIDIA GH200 480GB"]))
    hw = detect()
    assert hw.gpu_type.key == "other" and hw.gpu_type.name == "NVIDIA GH200 480GB"
    assert hw.gpu_type.memory_bytes < 81_559 * 2**20 and hw.gpu_type.supports_fp8_kv


def test_import_is_cheap_and_does_not_touch_nvml():
    code = "import sys, labkit.hardware; print('pynvml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False"


def test_vllm_available_finds_vllm_without_importing_it(tmp_path, monkeypatch):
    import importlib

    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('vllm_available imported vLLM')\n")
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    real = importlib.util.find_spec("vllm") is not None
    assert vllm_available() is real
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert vllm_available() is True and "vllm" not in sys.modules
