"""Planning: every bad configuration is refused fast with a problem and a fix; good ones get
vLLM's placement, memory arithmetic and `vllm serve` arguments."""

from __future__ import annotations

import json
import re
import time

import pytest
from labfixtures import FIXTURES

import labkit.plan.memory as memory_plan
import labkit.plan.planner as config
from labkit.hardware import GPU_TYPES, GPUInfo, Hardware, simulated
from labkit.plan import (
    ConfigError,
    EngineConfig,
    PDConfig,
    env_for,
    kv_transfer_config,
    validate,
    vllm_args,
)
from labkit.vocab import GiB

SERVE_FLAGS = FIXTURES / "serve-flags.txt"  # every `vllm serve` flag of vLLM 0.26.0


def assert_vllm_flags(args: list[str]) -> None:
    """Every `--flag` in `args` is one vLLM 0.26 defines (a `--no-` form of a boolean too)."""
    if not SERVE_FLAGS.exists():
        pytest.skip(f"{SERVE_FLAGS} is absent: $LABKIT_VLLM_FIXTURES names captures without "
                    "vLLM's flag list, so labkit's vllm serve flags go unchecked")
    known = {ln for ln in SERVE_FLAGS.read_text().splitlines() if ln.startswith("--")}
    assert len(known) > 200 and "--kv-transfer-config" in known
    unknown = [a for a in args if a.startswith("--")
               and a not in known and "--" + a.removeprefix("--no-") not in known]
    assert unknown == [], f"not flags of vLLM 0.26's `vllm serve`: {unknown}"
NO_GPU = simulated(0)


def pd(num_gpus=None, gpu_type=None, connector="auto", colocated=False, **both) -> PDConfig:
    pre = {k[8:]: v for k, v in both.items() if k.startswith("prefill_")}
    dec = {k[7:]: v for k, v in both.items() if k.startswith("decode_")}
    common = {k: v for k, v in both.items() if not k.startswith(("prefill_", "decode_"))}
    return PDConfig(
        EngineConfig(role="prefill", **{**common, **pre}),
        EngineConfig(role="decode", **{**common, **dec}),
        connector=connector,
        num_gpus=num_gpus,
        gpu_type=gpu_type,
        colocated=colocated,
    )


def real(n: int, key: str = "h100") -> Hardware:
    t = GPU_TYPES[key]
    gpus = [
        GPUInfo(i, t.name, f"GPU-{i}", t.memory_bytes, 0, t.compute_capability, t) for i in range(n)
    ]
    return Hardware(gpus, False, t)


BAD = {
    "tp does not divide heads": (pd(tp=3), r"tp=3 cannot shard", r"\[1, 2, 4, 8, 16\]"),
    "tp*pp over the GPUs": (pd(num_gpus=2, tp=2), r"needs 4 GPUs, there are 2", r"num_gpus=4"),
    "tp zero": (pd(tp=0), r"tp=0 is out of range", r"1\.\.64"),
    "tp absurd": (pd(tp=128), r"tp=128", r"1\.\.64"),
    "pp over layers": (
        pd(model="lab-tiny", pp=5, connector="example"),
        r"pp=5 exceeds the 4 layers",
        r"pp <= 4",
    ),
    "weights do not fit": (
        pd(model="llama-3.1-70b", gpu_type="l4", num_gpus=2),
        r"needs 131\.\d+ GiB weights .* more than its 19\.\d+ GiB share",
        r"tp=8 with num_gpus=16 \(8 GPUs per engine",
    ),
    "max_model_len KV does not fit": (
        pd(model="llama-3.1-8b", gpu_type="l4", max_model_len=131072),
        r"max_model_len=131072 needs \d+ KV blocks",
        r"max_model_len <= \d+",
    ),
    "max_model_len over the model": (
        pd(max_model_len=100_000),
        r"exceeds lab-1b's max_position",
        r"8192",
    ),
    "fp8 on A100": (
        pd(gpu_type="a100", kv_cache_dtype="fp8"),
        r"fp8 KV cache needs compute capability",
        r"auto",
    ),
    "unknown kv dtype": (pd(kv_cache_dtype="int3"), r"kv_cache_dtype='int3' is unknown", r"fp8"),
    "kv dtype differs": (
        pd(prefill_kv_cache_dtype="fp8"),
        r"kv_cache_dtype differs",
        r"same kv_cache_dtype",
    ),
    "block size not a multiple of 16": (
        pd(block_size=24),
        r"block_size=24 is not allowed",
        r"multiple of 16",
    ),
    "block size zero": (pd(block_size=0), r"block_size=0", r"multiple of 16"),
    "block sizes differ": (pd(decode_block_size=32), r"block_size differs", r"same block_size"),
    "chunk below block size": (
        pd(max_num_batched_tokens=8, max_num_seqs=4),
        r"smaller than block_size=16",
        r"at least 16",
    ),
    "chunk below max_num_seqs": (
        pd(max_num_batched_tokens=128),
        r"128 < max_num_seqs=256",
        r"max_num_seqs <= 128",
    ),
    "chunk below max_model_len without chunked prefill": (
        pd(max_num_batched_tokens=2048, enable_chunked_prefill=False, max_model_len=4096),
        r"without chunked prefill",
        r"max_model_len <= 2048",
    ),
    "negative chunk": (pd(max_num_batched_tokens=-5), r"max_num_batched_tokens=-5", r"positive"),
    "utilization above 1": (pd(gpu_memory_utilization=1.5), r"outside \(0, 1\]", r"fraction"),
    "utilization zero": (pd(gpu_memory_utilization=0.0), r"outside \(0, 1\]", r"fraction"),
    "shared GPU over 0.9": (
        pd(num_gpus=1, gpu_memory_utilization=0.5),
        r"adds up to 1\.00",
        r"<= 0\.9",
    ),
    "max_num_seqs zero": (pd(max_num_seqs=0), r"max_num_seqs=0", r"1\.\.65536"),
    "unknown model": (pd(model="gpt-17"), r"model 'gpt-17' is unknown", r"lab-1b"),
    "models differ": (
        pd(decode_model="lab-tiny"),
        r"prefill runs 'lab-1b' but decode runs 'lab-tiny'",
        r"same model",
    ),
    "synthetic model with real weights": (pd(load_format="auto"), r"synthetic", r"dummy"),
    "pp with nixl": (
        pd(num_gpus=4, pp=2, connector="nixl"),
        r"NixlConnector cannot move KV with pp > 1",
        r"pp=1",
    ),
    "example with tp": (
        pd(num_gpus=4, tp=2, connector="example"),
        r"ExampleConnector with tp > 1",
        r"tp=1",
    ),
    "blocks override too big": (
        pd(num_gpu_blocks_override=10_000_000),
        r"num_gpu_blocks_override=10000000",
        r"<= \d+",
    ),
    "unknown gpu type": (pd(gpu_type="v100"), r"gpu_type='v100' is unknown", r"h100"),
    "zero GPUs": (pd(num_gpus=0), r"num_gpus=0", r"1\.\.64"),
    "unknown connector": (pd(connector="p2p"), r"connector='p2p' is unknown", r"nixl"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_config_is_refused_with_problem_and_fix(name):
    cfg, problem, fix = BAD[name]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        validate(cfg, NO_GPU)
    assert time.perf_counter() - t0 < 1.0
    e = err.value
    assert isinstance(e, ValueError) and re.search(problem, e.problem), e.problem
    assert re.search(fix, e.fix), e.fix
    assert str(e) == f"{e.problem} — {e.fix}"


def test_more_gpus_than_the_machine_has():
    with pytest.raises(ConfigError, match="this machine has 1 GPU"):
        validate(pd(num_gpus=2), real(1))


def test_nixl_asked_but_not_installed_on_real_vllm(monkeypatch):
    monkeypatch.setattr(config, "vllm_available", lambda: True)
    monkeypatch.setattr(config, "nixl_available", lambda: False)
    with pytest.raises(ConfigError, match="nixl package is not importable") as err:
        validate(pd(connector="nixl"), real(2))
    assert "pip install nixl" in err.value.fix
    plan = validate(pd(), real(2))  # auto falls back to the always-available connector
    assert plan.kind == "vllm" and plan.connector == "example"


def test_validate_is_fast():
    cfg = pd(model="llama-3.1-8b", num_gpus=8, tp=4)
    validate(cfg, NO_GPU)
    t0 = time.perf_counter()
    for _ in range(50):
        validate(cfg, NO_GPU)
    assert (time.perf_counter() - t0) / 50 < 0.010


@pytest.mark.parametrize(
    "n,prefill,decode",
    [
        (1, [0], [0]),
        (2, [0], [1]),
        (4, [0, 1], [2, 3]),
        (8, [0, 1, 2, 3], [4, 5, 6, 7]),
    ],
)
def test_placement_prefill_first(n, prefill, decode):
    tp = max(1, n // 2)
    plan = validate(pd(model="llama-3.1-8b", num_gpus=n, tp=tp), NO_GPU)
    p, d = plan.engines
    assert (p.gpus, d.gpus) == (prefill, decode)
    assert [(r.pp_rank, r.tp_rank) for r in p.ranks] == [(0, t) for t in range(tp)]
    assert plan.connector == ("example" if n == 1 else "nixl")
    assert env_for(d, plan)["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, decode))


def test_pp_places_stages_and_uses_example_connector():
    plan = validate(pd(num_gpus=8, pp=4), NO_GPU)
    p, d = plan.engines
    assert [(r.pp_rank, r.gpu) for r in p.ranks] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert d.gpus == [4, 5, 6, 7] and plan.connector == "example"
    assert (
        len({ln.weights for g in plan.gpus[:4] for ln in g.lines}) >= 2
    )  # embed vs lm_head stages


def test_shared_gpu_plan():
    plan = validate(pd(num_gpus=1), NO_GPU)
    assert plan.connector == "example" and plan.link == "same-gpu"
    assert [e.gpu_memory_utilization for e in plan.engines] == [0.4, 0.4]
    (g,) = plan.gpus
    assert [ln.engine for ln in g.lines] == ["prefill", "decode"] and g.free > 0
    used = sum(ln.weights + ln.kv + ln.activation + ln.overhead for ln in g.lines)
    assert g.free == g.total - used
    assert any("one after the other" in n for n in plan.notes)
    one = validate(pd(num_gpus=1, prefill_gpu_memory_utilization=0.6), NO_GPU)
    assert [e.gpu_memory_utilization for e in one.engines] == [0.6, 0.25]


def test_example_pair_never_splits_a_prompt_on_prefill():
    """ExampleConnector saves a prompt's KV in its first step only: prefill gets chunked prefill
    off and prompts capped at the chunk; decode keeps chunked prefill; nixl keeps both."""
    plan = validate(pd(num_gpus=1, max_num_batched_tokens=256, connector="example"), NO_GPU)
    p, d = plan.engines
    assert plan.connector == "example"
    assert (p.config.enable_chunked_prefill, p.max_num_batched_tokens, p.max_model_len) == (
        False, 256, 256)
    assert d.config.enable_chunked_prefill and d.max_model_len > 256
    args = vllm_args(None, plan, "prefill", "/m", 8000)
    assert "--no-enable-chunked-prefill" in args
    assert args[args.index("--max-model-len") + 1] == "256"
    assert any("first step only" in n for n in plan.notes)
    # auto on a shared GPU: example by default, nixl (which can carry a chunked prompt) once a
    # chunk is asked for; the link is the GPU itself either way
    assert validate(pd(num_gpus=1), NO_GPU).connector == "example"
    auto = validate(pd(num_gpus=1, max_num_batched_tokens=256), NO_GPU)
    assert (auto.connector, auto.link) == ("nixl", "same-gpu")
    assert all(e.config.enable_chunked_prefill for e in auto.engines)
    nixl = validate(pd(num_gpus=2, max_num_batched_tokens=256, connector="nixl"), NO_GPU)
    assert all(e.config.enable_chunked_prefill for e in nixl.engines)
    assert nixl.engines[0].max_model_len > 256


def test_kv_capacity_follows_vllm_formula_against_fixture(monkeypatch):
    """Real vLLM (fixtures, H100, util 0.25, lab-1b): non-torch 6.21 GiB -> 189,168 tokens,
    4.76 GiB -> 212,912 tokens. With the logged non-torch figure the plan must agree."""
    for name, non_torch, tokens in (
        ("nixl-prefill", 6.21, 189_168),
        ("nixl-decode", 4.76, 212_912),
    ):
        log = (FIXTURES / "logs" / f"{name}.log").read_text()
        assert f"{non_torch} GiB for non-torch" in log and f"{tokens:,} tokens" in log
        monkeypatch.setattr(memory_plan, "NON_TORCH_BYTES", int(non_torch * GiB))
        plan = validate(pd(num_gpus=1, gpu_memory_utilization=0.25, max_model_len=4096), NO_GPU)
        e = plan.engines[0]
        assert abs(e.num_tokens - tokens) <= 16 * 12  # the log rounds GiB to 0.01
        assert round(e.activation_bytes / GiB, 2) == 0.38  # "0.38 GiB for peak activation"


@pytest.mark.parametrize(
    "model,tokens,activation",
    [
        ("lab-1b", 650_080, 0.38),
        ("qwen2.5-0.5b", 3_537_040, 0.31),
    ],
)
def test_kv_capacity_matches_real_vllm_on_h200(model, tokens, activation):
    """Measured with real vLLM 0.26 on the lent H200, one engine at a time, util 0.3,
    max_model_len 4096, the dirs write_model_dir() writes and the args vllm_args() builds
    ("GPU KV cache size: N tokens"; non-torch logged as 0.22 GiB both times)."""
    cfg = PDConfig(
        EngineConfig(model=model, gpu_memory_utilization=0.3, max_model_len=4096),
        colocated=True,
        num_gpus=1,
        gpu_type="h200",
    )
    e = validate(cfg, NO_GPU).engines[0]
    assert abs(e.num_tokens - tokens) / tokens < 0.001
    assert round(e.activation_bytes / GiB, 2) == activation


def test_kv_capacity_scales_with_dtype_tp_and_utilization():
    base = validate(pd(model="llama-3.1-8b", num_gpus=2), NO_GPU).engines[0]
    assert base.kv_bytes_per_token == 131_072 and base.page_bytes == 16 * 131_072
    assert base.num_blocks == base.kv_cache_bytes // base.page_bytes
    fp8 = validate(pd(model="llama-3.1-8b", num_gpus=2, kv_cache_dtype="fp8"), NO_GPU).engines[0]
    assert fp8.num_blocks == fp8.kv_cache_bytes // (16 * 65_536)
    assert 1.99 < fp8.num_blocks / base.num_blocks < 2.01
    tp2 = validate(pd(model="llama-3.1-8b", num_gpus=4, tp=2), NO_GPU).engines[0]
    assert tp2.kv_bytes_per_token == 65_536 and tp2.num_blocks > 2 * base.num_blocks
    low = validate(
        pd(model="llama-3.1-8b", num_gpus=2, gpu_memory_utilization=0.5), NO_GPU
    ).engines[0]
    assert low.num_blocks < base.num_blocks / 2


def test_planner_defaults_follow_vllm():
    h100 = validate(pd(num_gpus=2), NO_GPU).engines[0]
    assert h100.max_num_batched_tokens == 8192 and h100.max_model_len == 8192
    a100 = validate(pd(num_gpus=2, gpu_type="a100"), NO_GPU).engines[0]
    assert a100.max_num_batched_tokens == 2048  # arg_utils.get_batch_defaults: A100 excluded
    capped = validate(pd(model="llama-3.1-8b", gpu_type="l4", num_gpus=2), NO_GPU).engines[0]
    # auto-fit to the KV capacity, with a 10 % margin for the planner's estimates (an 8B pair
    # on a real H100 had 15.57 GiB where the plan said 15.59 GiB, and vLLM refused max length)
    assert capped.max_model_len == int(capped.num_tokens * 0.9) // 16 * 16 < 131072


def test_colocated_is_one_engine():
    plan = validate(pd(colocated=True, num_gpus=1), NO_GPU)
    (e,) = plan.engines
    assert e.name == "colocated" and e.role == "both" and plan.connector is None
    assert e.gpu_memory_utilization == 0.9


def test_simulated_plan_on_a_gpu_machine_of_another_type():
    plan = validate(pd(gpu_type="h200", num_gpus=4), real(1, "h100"))
    assert plan.kind == "sim" and plan.num_gpus == 4 and plan.gpu_type.key == "h200"
    assert "1 x NVIDIA H100" in plan.notes[0]


def test_plan_to_dict_is_json():
    plan = validate(pd(num_gpus=2), NO_GPU)
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["kind"] == "sim" and d["gpu_type"] == "h100" and d["engines"][1]["gpus"] == [1]
    assert d["gpus"][0]["lines"][0]["engine"] == "prefill"


def test_vllm_args_are_vllm_flags():
    plan = validate(
        pd(
            num_gpus=1,
            num_gpu_blocks_override=80,
            kv_offloading_size_gb=1.0,
            enable_prefix_caching=False,
            extra_args=["--seed", "1"],
        ),
        NO_GPU,
    )
    args = vllm_args(
        None,
        plan,
        0,
        "/models/lab",
        8100,
        {"kv_events_endpoint": "tcp://127.0.0.1:5557", "run_dir": "/tmp/runs/r1"},
    )
    assert args[0] == "/models/lab" and args[args.index("--port") + 1] == "8100"
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.4"
    assert args[args.index("--load-format") + 1] == "dummy" and "--enforce-eager" in args
    assert "--no-enable-prefix-caching" in args and args[-2:] == ["--seed", "1"]
    assert "--kv-offloading-size" not in args  # it would replace the PD connector
    ktc = json.loads(args[args.index("--kv-transfer-config") + 1])
    kinds = [c["kv_connector"] for c in ktc["kv_connector_extra_config"]["connectors"]]
    assert ktc["kv_connector"] == "MultiConnector" and kinds == [
        "ExampleConnector",
        "OffloadingConnector",
    ]
    events = json.loads(args[args.index("--kv-events-config") + 1])
    assert events == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://127.0.0.1:5557",
        "topic": "kv",
    }
    assert_vllm_flags(args)


@pytest.mark.parametrize("knobs", [
    {"colocated": True, "num_gpus": 1},
    {"connector": "example", "num_gpus": 1, "kv_cache_dtype": "fp8"},
    {"connector": "nixl", "num_gpus": 2, "max_num_batched_tokens": 512},
    {"connector": "nixl", "num_gpus": 4, "tp": 2},
])
def test_every_engines_vllm_args_are_vllm_flags(knobs) -> None:
    colocated = knobs.pop("colocated", False)
    num_gpus = knobs.pop("num_gpus")
    connector = knobs.pop("connector", "auto")
    plan = validate(pd(num_gpus=num_gpus, connector=connector, colocated=colocated, **knobs),
                    simulated(num_gpus, "h100"))
    for ep in plan.engines:
        assert_vllm_flags(vllm_args(None, plan, ep.name, "/m", 8400,
                                    {"observer_endpoint": "tcp://127.0.0.1:7000",
                                     "kv_events_endpoint": "tcp://127.0.0.1:5557",
                                     "run_dir": "/tmp/r", "served_model_name": "lab"}))


def test_the_flag_check_can_fail() -> None:
    with pytest.raises(AssertionError, match="--kv-cache-dtpye"):
        assert_vllm_flags(["/m", "--port", "1", "--kv-cache-dtpye", "fp8"])


def test_colocated_offload_uses_the_flag():
    plan = validate(pd(colocated=True, num_gpus=1, kv_offloading_size_gb=2.0), NO_GPU)
    args = vllm_args(None, plan, 0, "/m", 8300)
    assert (
        args[args.index("--kv-offloading-size") + 1] == "2" and "--kv-transfer-config" not in args
    )


def test_kv_transfer_config_shapes():
    ex = kv_transfer_config("example", "prefill", "/tmp/runs/abc")
    assert ex["kv_connector"] == "ExampleConnector" and ex["kv_role"] == "kv_both"
    assert "abc" in ex["kv_connector_extra_config"]["shared_storage_path"]
    assert kv_transfer_config("example", "decode", "/tmp/runs/abc") == {**ex}
    assert kv_transfer_config("nixl", "prefill", "/r")["kv_role"] == "kv_producer"
    assert kv_transfer_config("nixl", "decode", "/r")["kv_role"] == "kv_consumer"
    assert kv_transfer_config(None, "both", "/r") is None
    multi = kv_transfer_config(
        "nixl",
        "decode",
        "/r",
        "tcp://127.0.0.1:7000",
        connector_extra={"enforce_handshake_compat": False},
    )
    assert multi["kv_connector"] == "MultiConnector" and multi["kv_role"] == "kv_consumer"
    # bracket mode: observer(open) -> transfer connector -> observer(close)
    opener, transfer, observer = multi["kv_connector_extra_config"]["connectors"]
    assert transfer["kv_connector"] == "NixlConnector"
    assert transfer["kv_connector_extra_config"] == {"enforce_handshake_compat": False}
    for c in (opener, observer):
        assert c["kv_connector"] == "LabkitObserverConnector"
        assert c["kv_connector_module_path"] == "labkit.pd.observer"
        assert c["kv_role"] == "kv_consumer"
    assert opener["kv_connector_extra_config"] == {"observer_bracket": "open"}  # publishes nothing
    assert observer["kv_connector_extra_config"] == {
        "observer_endpoint": "tcp://127.0.0.1:7000", "observer_role": "decode",
        "observer_bracket": "close", "transfer_connector": "NixlConnector"}
    # MultiConnector passes engine_id itself: a child carrying one would break KVTransferConfig(**ktc, engine_id=...)
    assert all("engine_id" not in c and "kv_role" in c for c in (opener, transfer, observer))
    named = kv_transfer_config("example", "prefill", "/r", "tcp://127.0.0.1:7000",
                               observer_name="prefill")
    kids = named["kv_connector_extra_config"]["connectors"]
    assert [c["kv_connector_extra_config"].get("observer_name") for c in kids] == [
        "prefill", None, "prefill"]
    assert kids[2]["kv_connector_extra_config"]["transfer_connector"] == "ExampleConnector"
    alone = kv_transfer_config(None, "both", "/r", "tcp://127.0.0.1:7000", observer_name="colocated")
    assert alone["kv_connector"] == "LabkitObserverConnector"  # solo: nothing to bracket
    assert alone["kv_connector_extra_config"] == {
        "observer_endpoint": "tcp://127.0.0.1:7000", "observer_role": "both",
        "observer_name": "colocated"}
    # offload beside a PD connector: the observer brackets the transfer connector only
    both = kv_transfer_config("example", "decode", "/r", "tcp://127.0.0.1:7000", offload_gib=1.0)
    assert [c["kv_connector"] for c in both["kv_connector_extra_config"]["connectors"]] == [
        "LabkitObserverConnector", "ExampleConnector", "LabkitObserverConnector",
        "OffloadingConnector"]


def test_env_for_nixl_side_channels():
    plan = validate(pd(num_gpus=2), NO_GPU)
    a, b = env_for(plan.engines[0], plan), env_for(plan.engines[1], plan)
    assert a["VLLM_NIXL_SIDE_CHANNEL_PORT"] != b["VLLM_NIXL_SIDE_CHANNEL_PORT"]
    assert env_for(0, plan, side_channel_port=5600)["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"
    one = validate(pd(num_gpus=1), NO_GPU)
    assert env_for("decode", one) == {"CUDA_VISIBLE_DEVICES": "0"}
    cfg = pd(num_gpus=2)
    plan = validate(cfg, NO_GPU)
    assert plan.engine(cfg.decode).name == "decode"


def test_vllm_args_name_each_engines_observer():
    plan = validate(pd(num_gpus=1), NO_GPU)
    for ep in plan.engines:
        args = vllm_args(None, plan, ep.name, "/m", 8400,
                         {"observer_endpoint": "tcp://127.0.0.1:7001", "run_dir": "/tmp/r"})
        kids = json.loads(args[args.index("--kv-transfer-config") + 1])[
            "kv_connector_extra_config"]["connectors"]
        close = kids[-1]["kv_connector_extra_config"]
        assert (close["observer_name"], close["observer_role"]) == (ep.name, ep.role)
        assert kids[0]["kv_connector_extra_config"]["observer_bracket"] == "open"
