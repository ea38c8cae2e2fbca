"""xPyD placement: N prefill + M decode engines over the visible GPUs, each on GPUs of its
own with the pair's memory arithmetic, a ConfigError with a working fix when they do not fit,
and distinct ports per engine. 1P1D plans are untouched."""

from __future__ import annotations

import json

import pytest

from labkit.hardware import GPU_TYPES, GPUInfo, Hardware, simulated
from labkit.plan import ConfigError, EngineConfig, PDConfig, env_for, validate, vllm_args
from labkit.plan.ports import port_is_free
from labkit.plan.xpyd import engine_ports


def real(n: int, key: str = "h100") -> Hardware:
    t = GPU_TYPES[key]
    return Hardware([GPUInfo(i, t.name, f"GPU-{i}", t.memory_bytes, 0, t.compute_capability, t)
                     for i in range(n)], False, t)


def xpyd(p: int, d: int, ptp: int = 1, dtp: int = 1, **kw) -> PDConfig:
    return PDConfig(EngineConfig(role="prefill", tp=ptp), EngineConfig(role="decode", tp=dtp),
                    num_prefill=p, num_decode=d, **kw)


def test_8_gpus_2p_tp2_2d_tp2():
    plan = validate(xpyd(2, 2, 2, 2), real(8, "h200"))
    assert [(e.name, e.role, e.gpus) for e in plan.engines] == [
        ("prefill-0", "prefill", [0, 1]), ("prefill-1", "prefill", [2, 3]),
        ("decode-0", "decode", [4, 5]), ("decode-1", "decode", [6, 7])]
    assert [len(g.lines) for g in plan.gpus] == [1] * 8  # no GPU shared
    assert plan.connector == "nixl" and plan.link == "nvlink"
    pair = validate(PDConfig(EngineConfig(role="prefill", tp=2), EngineConfig(role="decode", tp=2)),
                    real(8, "h200"))
    assert {e.num_blocks for e in plan.engines} == {pair.engines[0].num_blocks}
    assert env_for("prefill-1", plan, 5601)["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env_for("decode-1", plan, 5603)["CUDA_VISIBLE_DEVICES"] == "6,7"
    args = vllm_args(None, plan, "decode-1", "/m", 8001)
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert plan.engine("decode") is plan.engines[2]  # by role: the first decode engine
    assert "xPyD 2P+2D on 8 GPUs" in plan.notes[-1]
    json.dumps(plan.to_dict())


def test_4_gpus_1p_3d():
    plan = validate(xpyd(1, 3), real(4))
    assert [(e.name, e.gpus) for e in plan.engines] == [
        ("prefill-0", [0]), ("decode-0", [1]), ("decode-1", [2]), ("decode-2", [3])]
    assert {e.config.role for e in plan.engines[1:]} == {"decode"}


def test_not_fitting_says_what_fits():
    with pytest.raises(ConfigError) as err:
        validate(xpyd(2, 2, 2, 2), real(4))
    e = err.value
    assert "needs 8 GPUs, there are 4" in str(e)
    assert "tp=pp=1 on both roles" in str(e) and "num_gpus=8" in str(e)
    with pytest.raises(ConfigError, match=r"num_decode=2"):
        validate(xpyd(1, 4), real(3))
    # the suggested fix plans
    assert len(validate(xpyd(1, 2), real(3)).engines) == 3


def test_simulated_machine_gets_the_gpus_it_needs():
    plan = validate(xpyd(2, 2, 2, 2), simulated(0))
    assert plan.num_gpus == 8 and plan.kind == "sim"
    assert plan.notes[0].startswith("simulated cluster: 8 x")
    plan = validate(xpyd(2, 2, num_gpus=6, gpu_type="h200"), simulated(0))
    assert plan.num_gpus == 6 and "GPUs 4..5 are left unused" in plan.notes


def test_bad_counts_and_colocated():
    with pytest.raises(ConfigError, match=r"num_prefill=0 is out of range"):
        validate(xpyd(0, 2), simulated(0))
    with pytest.raises(ConfigError, match=r"colocated=True is one engine"):
        validate(xpyd(2, 2, colocated=True), simulated(0))
    with pytest.raises(ConfigError, match=r"tp=3 cannot shard"):  # the pair's checks still run
        validate(xpyd(2, 2, ptp=3), simulated(0, "h100"))


def test_one_pair_keeps_its_plan():
    plan = validate(PDConfig(), real(2))
    assert [e.name for e in plan.engines] == ["prefill", "decode"]
    assert validate(PDConfig(num_gpus=1), real(1)).engines[0].gpus == [0]  # shared GPU still


def test_every_engine_gets_its_own_ports():
    plan = validate(xpyd(2, 2, 2, 2), simulated(0))
    ports = engine_ports(plan)
    assert list(ports) == [e.name for e in plan.engines]
    taken = []
    for name, p in ports.items():
        tp = plan.engine(name).config.tp
        taken += [p.http, p.kv_events, p.observer, *range(p.side_channel, p.side_channel + tp)]
        assert p.kv_events_endpoint() == f"tcp://127.0.0.1:{p.kv_events}"
    assert len(taken) == len(set(taken)) == 4 * 5
    assert all(port_is_free("127.0.0.1", p) for p in taken)  # released for the engines
