"""Every `labkit` subcommand meets bad input with exit code 2 and ONE line
`error: ... / fix: ...` in the CLI's own words (flags, not Python keywords), never a traceback.
And the Python API speaks the same vocabulary (`Lab`'s keywords = the flags' names)."""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import subprocess
import sys
import time

import pytest

import labkit
from labkit.cli import main as cli_main
from labkit.plan import ConfigError

PY_WORDS = ("num_gpus=", "mode='", "kv_cache_dtype=", "max_num_batched_tokens=", "tp=", "pp=")


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labkit.cli", *argv], capture_output=True,
                          text=True, timeout=timeout)


def in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # argparse exits itself (through labkit.cli.Parser.error)
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error_line(code: int, err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: ") and " / fix: " in line, line
    assert not any(w in line for w in PY_WORDS), f"Python words in a CLI error: {line}"
    return line


BAD = [
    (["plan", "--sim", "--tp", "3"], "--tp 3 cannot shard"),
    (["plan", "--sim", "--num-gpus", "0"], "--num-gpus 0 is out of range"),
    (["plan", "--sim", "--kv-cache-dtype", "fp9"], "--kv-cache-dtype"),
    (["plan", "--sim", "--kv-dtype", "fp8", "--gpu-type", "a100"], "fix: use --kv-cache-dtype"),
    (["plan", "--sim", "--tp", "2", "--gpus", "2"], "--num-gpus 4"),
    (["plan", "--no-such-flag"], "unrecognized arguments"),
    (["plan", "--sim", "--kv-cache-memory", "lots"], "not a size"),
    (["plan", "--sim", "--num-gpu-blocks", "8", "--kv-cache-memory", "1M"], "not both"),
    (["up", "--sim", "--tp", "3"], "--tp 3"),
    (["up", "--sim", "--port", "70000"], "--port 70000"),
    (["up", "--vllm"] if not importlib.util.find_spec("vllm") else ["up", "--tp", "3"], "fix: "),
    (["demo", "--sim", "--num-gpu-blocks", "6"], "--num-gpu-blocks"),
    (["demo", "--sim", "--requests", "-1"], "--requests"),
    (["replay", "no-such-recording"], "real-h200x2-nixl"),
    (["replay"], "needs a recording"),
    (["replay", "real-h200x2-nixl", "--speed", "0"], "--speed"),
    (["record", "--out", "/no/such/dir/x.lkrec", "--mode", "sim"], "--out"),
    (["record", "--out", "x.lkrec", "--mode", "sim", "--tp", "3"], "--tp 3"),
    (["dashboard", "--port", "eighty"], "invalid int value"),
    (["bench", "--compare", "nothing"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_error_line(argv, words, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    code, out, err = in_process(argv, capsys)
    line = assert_one_error_line(code, err)
    assert words in line, line
    assert time.monotonic() - t0 < 5, "a bad input must fail before anything starts"


def test_non_recording_and_directory_are_errors(tmp_path, capsys) -> None:
    junk = tmp_path / "junk.lkrec"
    junk.write_text("not a recording")
    for path in (junk, tmp_path):
        code, _, err = in_process(["replay", str(path)], capsys)
        assert str(path) in assert_one_error_line(code, err)


def test_shipped_recording_by_name_as_the_readme_says() -> None:
    r = run("replay", "real-h200x2-nixl")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "REPLAY" in r.stdout and "H200" in r.stdout
    listed = run("replay", "--list").stdout.split()
    assert "real-h200x2-nixl" in listed and listed == labkit.recordings()


@pytest.mark.skipif(importlib.util.find_spec("zstandard") is not None,
                    reason="zstandard is installed here")
def test_record_zstd_without_zstandard_fails_before_the_lab_starts(tmp_path) -> None:
    t0 = time.monotonic()
    r = run("record", "--out", str(tmp_path / "r.lkrec"), "--mode", "sim",
            "--compression", "zstd")
    assert "zstandard" in assert_one_error_line(r.returncode, r.stderr)
    assert time.monotonic() - t0 < 10 and not (tmp_path / "r.lkrec").exists()
    assert "SIMULATED PD pair" not in r.stdout + r.stderr  # no lab was started


def test_calibrate_without_a_gpu_is_an_error_line() -> None:
    from labkit.plan import detect

    if detect().gpus and importlib.util.find_spec("vllm"):
        pytest.skip("a GPU machine: calibrate would run")
    for argv in (["calibrate"], ["calibrate", "--out", "c.json"]):
        r = run(*argv)
        assert "GPU" in assert_one_error_line(r.returncode, r.stderr)


def test_plan_into_a_closed_pipe_is_quiet() -> None:
    """`labkit plan | head -1`: the reader goes away; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "labkit.cli", "plan", "--sim", "--gpus", "4",
                             "--tp", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=30)
    assert first.startswith(b"PD plan") and "Traceback" not in err and "BrokenPipe" not in err


def test_the_fix_for_a_model_too_big_is_one_that_works(capsys) -> None:
    code, _, err = in_process(["plan", "--sim", "--model", "llama-3.1-70b", "--gpus", "2"],
                              capsys)
    line = assert_one_error_line(code, err)
    assert "--tp 2 with --num-gpus 4" in line and "--colocated" in line, line
    for argv in (["--tp", "2", "--num-gpus", "4"], ["--tp", "2", "--colocated"]):
        code, out, err = in_process(["plan", "--sim", "--model", "llama-3.1-70b", "--gpus", "2",
                                     *argv], capsys)
        assert code == 0 and out.startswith("PD plan"), err


def test_pp_says_what_it_changed_at_the_top(capsys) -> None:
    code, out, _ = in_process(["plan", "--sim", "--pp", "2", "--gpus", "4"], capsys)
    assert code == 0
    top = out.split("Placement")[0]
    assert "Changed from what was asked" in top
    assert "connector: example (pp > 1" in top and "chunked prefill off" in top
    assert "max_model_len" in top


def test_vllm_names_and_old_spellings_give_the_same_plan(capsys) -> None:
    new = ["plan", "--sim", "--json", "--kv-cache-dtype", "fp8", "--num-gpus", "4",
           "--max-num-batched-tokens", "256", "--tensor-parallel-size", "2"]
    old = ["plan", "--sim", "--json", "--kv-dtype", "fp8", "--gpus", "4", "--chunk", "256",
           "--tp", "2"]
    plans = []
    for argv in (new, old):
        code, out, err = in_process(argv, capsys)
        assert code == 0, err
        plans.append(json.loads(out))
    assert plans[0] == plans[1]
    assert plans[0]["engines"][0]["kv_cache_dtype"] == "fp8"
    code, out, _ = in_process(["plan", "--help"], capsys)
    assert "--kv-cache-dtype" in out and "--kv-dtype" not in out  # old spellings are hidden


def test_lab_has_a_real_signature_and_one_vocabulary() -> None:
    params = inspect.signature(labkit.Lab).parameters
    for name in ("model", "max_num_batched_tokens", "tp", "pp", "kv_cache_dtype", "block_size",
                 "num_gpu_blocks", "kv_cache_memory", "num_gpus", "gpu_type", "mode", "port"):
        assert name in params and name in labkit.Lab.__doc__, name
    buf = io.StringIO()
    sys.stdout, old = buf, sys.stdout
    try:
        help(labkit.Lab)
    finally:
        sys.stdout = old
    assert "kv_cache_dtype" in buf.getvalue()
    assert {"Lab", "replay", "recordings"} <= set(dir(labkit))
    lab = labkit.Lab(mode="sim", kv_dtype="fp8", gpus=4, chunk=256)  # other spellings work
    assert lab.config.prefill.kv_cache_dtype == "fp8" and lab.plan.num_gpus == 4
    assert lab.config.prefill.max_num_batched_tokens == 256
    with pytest.raises(ConfigError) as exc:
        labkit.Lab(mode="sim", kv_cache_dtyp="fp8")
    assert "kv_cache_dtype" in exc.value.fix


def test_kv_cache_memory_is_bytes_so_fp8_doubles_the_blocks() -> None:
    auto = labkit.Lab(mode="sim", model="lab-tiny", kv_cache_memory=4_000_000)
    fp8 = labkit.Lab(mode="sim", model="lab-tiny", kv_cache_memory=4_000_000,
                     kv_cache_dtype="fp8")
    a, f = auto.plan.engines[0].num_blocks, fp8.plan.engines[0].num_blocks
    assert f == 2 * a and a > 10


def test_status_lists_a_lab_started_from_python(tmp_path) -> None:
    lab = labkit.Lab(mode="sim", model="lab-tiny", speed=0, run_dir=tmp_path / "run",
                     observe=False)
    lab.start(progress=False)
    try:
        r = run("status")
        assert r.returncode == 0 and str(tmp_path / "run") in r.stdout, r.stdout
        assert "by python" in r.stdout
    finally:
        lab.stop()
    assert not lab.state_path.exists()
    assert str(tmp_path / "run") not in run("status").stdout


def test_up_port_is_the_openai_endpoint(tmp_path) -> None:
    from labkit.plan import free_port

    port = free_port()
    lab = labkit.Lab(mode="sim", model="lab-tiny", speed=0, port=port, observe=False,
                     run_dir=tmp_path)
    with lab:
        assert lab.url == f"http://127.0.0.1:{port}"
        assert lab.complete([5, 6, 7], max_tokens=2)["choices"]


def test_progress_into_a_log_says_each_stage_once(capsys) -> None:
    from labkit.lab import _progress

    report = _progress(True, "A LAB DESCRIPTION")
    for i, stage in enumerate(("a", "b", "c", "ready")):
        report(stage, (i + 1) / 4)
    err = capsys.readouterr().err
    assert "A LAB DESCRIPTION" not in err and err.count("ready") == 1
    assert len(err.splitlines()) == 4


def test_demo_with_a_small_pool_runs(tmp_path) -> None:
    r = run("demo", "--sim", "--speed", "0", "--num-gpu-blocks", "64", "--requests", "2",
            "--run-dir", str(tmp_path), timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "prompt tok output tok" in r.stdout and "TTFT = time to first token" in r.stdout
    assert "of 64 blocks in use" in r.stdout
