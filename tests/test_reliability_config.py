"""Bad configuration is refused before anything starts: fast, named, with the fix, no process left.

Each case goes through `labkit.Lab(...)` (the notebook path) and, where the CLI has the flag,
through `labkit plan` (in-process and once as a real subprocess). The environment tag of
labkit.faults finds any child a failed start might leave behind.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

import labkit
from labkit import faults
from labkit.cli import main as cli_main
from labkit.engines.base import EngineStartError
from labkit.engines.sim.process import SimEngineProcess
from labkit.plan import ConfigError, EngineConfig, PDConfig

# name -> (Lab keywords, words the message must hold: the problem and the fix)
LAB_CASES: dict[str, tuple[dict, list[str]]] = {
    "tp does not divide heads": (dict(tp=3), ["tp=3", "16 heads", "use tp in [1, 2, 4"]),
    "tp*pp over the GPUs": (
        dict(tp=2, pp=2, num_gpus=2, connector="example"),
        ["needs 8 GPUs", "there are 2", "lower tp and pp"],
    ),
    "weights + one block do not fit": (
        dict(model="llama-3.1-8b", gpu_memory_utilization=0.1),
        ["14.96 GiB weights", "raise gpu_memory_utilization"],
    ),
    "fp8 KV on an A100": (
        dict(kv_cache_dtype="fp8", gpu_type="a100"),
        ["fp8 KV cache", "A100", "8.9", "kv_cache_dtype='auto'"],
    ),
    "chunk smaller than a block": (
        dict(chunk=8),
        ["max_num_batched_tokens=8", "block_size=16", "at least 16 tokens"],
    ),
    "unknown model": (dict(model="no-such-model"), ["'no-such-model' is unknown", "lab-1b"]),
    "negative max_num_seqs": (dict(max_num_seqs=-1), ["max_num_seqs=-1", "1..65536"]),
    "absurd pool size": (
        dict(num_gpu_blocks=10**9),
        ["num_gpu_blocks_override=1000000000", "positive integer"],
    ),
    "utilization above 1": (dict(gpu_memory_utilization=1.5), ["outside (0, 1]", "0.4"]),
    "absurd GPU count": (dict(num_gpus=1000), ["num_gpus=1000", "1..64"]),
    "zero chunk": (dict(chunk=0), ["max_num_batched_tokens=0", "positive integer"]),
    "pp with nixl": (
        dict(pp=2, connector="nixl", num_gpus=4),
        ["NixlConnector cannot move KV with pp > 1", "connector='example'"],
    ),
    "example connector with a chunk below the prompt length": (
        dict(num_gpus=1, chunk=256, max_model_len=4096, connector="example"),
        ["connector='example'", "first step only", "max_model_len <= 256", "connector='nixl'"],
    ),
    "block size not a multiple of 16": (dict(block_size=17), ["block_size=17", "multiple of 16"]),
    "max_model_len past the model": (
        dict(max_model_len=10**6),
        ["max_model_len=1000000", "max_model_len <= 8192"],
    ),
    "unknown connector": (dict(connector="tcp"), ["connector='tcp'", "'nixl'"]),
    "unknown mode": (dict(mode="gpu"), ["mode 'gpu'", "'sim'"]),
    "negative speed": (dict(speed=-1.0), ["speed", "0 (as fast as possible)"]),
    "NaN speed": (dict(speed=float("nan")), ["speed", "0 (as fast as possible)"]),
    "shell in the model name": (
        dict(model="lab-1b; rm -rf /tmp/x"),
        ["'lab-1b; rm -rf /tmp/x' is unknown"],
    ),
}


@pytest.fixture
def tag() -> str:
    """Tag this test's children; afterwards assert none is alive."""
    t = faults.tag_children()
    yield t
    assert faults.tagged_pids(t) == [], "a refused configuration left processes running"


def _refused(make) -> tuple[ConfigError, float]:
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        make()
    return info.value, time.perf_counter() - t0


@pytest.mark.parametrize("case", list(LAB_CASES))
def test_lab_refuses_bad_config_before_starting(case: str, tag: str) -> None:
    knobs, words = LAB_CASES[case]
    knobs = {"mode": "sim", **knobs}
    err, dt = _refused(lambda: labkit.Lab(**knobs).start(progress=False))
    assert dt < 1.0, f"{case}: refused after {dt:.2f} s"
    for w in words:
        assert w in str(err), f"{case}: {w!r} missing from {err}"
    assert err.problem and err.fix, "a ConfigError names the problem and the fix"
    assert faults.tagged_pids(tag) == []


@pytest.mark.parametrize(
    "field,values,words",
    [
        ("block_size", (16, 32), ["block_size differs", "same block_size"]),
        ("kv_cache_dtype", ("auto", "fp8"), ["kv_cache_dtype differs", "same kv_cache_dtype"]),
        ("model", ("lab-1b", "qwen2.5-0.5b"), ["KV moves between engines only for the same model"]),
    ],
)
def test_mismatched_engines_are_refused(
    field: str, values: tuple, words: list[str], tag: str
) -> None:
    cfg = PDConfig(
        prefill=EngineConfig(role="prefill", **{field: values[0]}),
        decode=EngineConfig(role="decode", **{field: values[1]}),
    )
    err, dt = _refused(lambda: labkit.Lab(cfg, mode="sim"))
    assert dt < 1.0
    assert all(w in str(err) for w in words), str(err)


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--tp", "3"], ["--tp 3", "fix: use --tp in"]),
        (["--kv-dtype", "fp8", "--gpu-type", "a100"], ["fp8 KV cache", "fix: use --kv-cache-dtype"]),
        (["--model", "llama-3.1-8b", "--prefill-util", "0.1"], ["weights", "fix: raise"]),
        (["--chunk", "8"], ["smaller than --block-size 16", "fix: use a chunk"]),
        (["--pp", "2", "--connector", "nixl", "--gpus", "4"], ["--pp > 1", "fix: use --pp 1"]),
        (["--block-size", "24"], ["--block-size 24", "fix: use a multiple of 16"]),
        (["--gpus", "0"], ["--num-gpus 0", "fix: use 1..64"]),
    ],
)
def test_plan_refuses_in_process(argv: list[str], words: list[str], capsys, tag: str) -> None:
    t0 = time.perf_counter()
    code = cli_main(["plan", "--sim", *argv])
    dt = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2 and dt < 1.0, (code, dt)
    assert all(w in err for w in words), err


def test_plan_refuses_as_a_command() -> None:
    """The real `labkit plan` process: exit code 2, problem and fix on stderr, quickly."""
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "labkit.cli", "plan", "--sim", "--tp", "3"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    dt = time.perf_counter() - t0
    assert r.returncode == 2 and "--tp 3 cannot shard" in r.stderr and "fix:" in r.stderr
    assert r.stdout == ""
    assert dt < 3.0, f"`labkit plan` took {dt:.2f} s (interpreter start included)"


def test_engine_port_in_use_fails_fast_naming_the_port(tmp_path, tag: str) -> None:
    """An engine asked to bind a taken port fails before any process starts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        eng = SimEngineProcess(
            "prefill", port=port, log_path=tmp_path / "p.log", run_dir=tmp_path, fast=True
        )
        t0 = time.perf_counter()
        with pytest.raises(EngineStartError) as info:
            eng.start()
        dt = time.perf_counter() - t0
    assert dt < 1.0, f"port clash reported after {dt:.2f} s"
    assert str(port) in str(info.value) and "in use" in str(info.value)
    assert eng.proc is None, "a process was started although its port was taken"
    assert faults.tagged_pids(tag) == []
