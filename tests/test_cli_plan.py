"""`labkit plan`: the readable report, the JSON form, and config errors as exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

from labkit.cli import COMMANDS, EXIT_CONFIG_ERROR, build_parser, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "labkit.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_plan_json_in_a_subprocess():
    out = run_cli(
        "plan",
        "--model",
        "llama-3.1-8b",
        "--tp",
        "2",
        "--gpus",
        "4",
        "--gpu-type",
        "h200",
        "--sim",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["kind"] == "sim" and plan["gpu_type"] == "h200" and plan["num_gpus"] == 4
    pre, dec = plan["engines"]
    assert pre["gpus"] == [0, 1] and dec["gpus"] == [2, 3]
    assert pre["kv_bytes_per_token"] == 65_536  # 131,072 B split over 2 TP ranks
    assert pre["num_tokens"] == pre["num_blocks"] * 16 > 0
    cmd = plan["commands"][1]
    assert cmd["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"
    argv = cmd["argv"]
    assert argv[:2] == ["vllm", "serve"] and argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert json.loads(argv[argv.index("--kv-transfer-config") + 1])["kv_role"] == "kv_consumer"


def test_plan_error_exit_code_and_stderr():
    out = run_cli("plan", "--model", "lab-1b", "--tp", "3", "--sim")
    assert out.returncode == EXIT_CONFIG_ERROR and out.stdout == ""
    assert "--tp 3 cannot shard lab-1b" in out.stderr and "fix: use --tp in" in out.stderr


def test_plan_text_report(capsys):
    assert main(["plan", "--gpus", "1", "--sim", "--chunk", "128", "--kv-dtype", "fp8",
                 "--connector", "example"]) == 0
    text = capsys.readouterr().out
    for part in (
        "Placement",
        "Memory per GPU",
        "KV capacity",
        "Commands",
        "free",
        "GPU 0 (pp0/tp0)",
        "--max-num-batched-tokens 128",
        "--max-num-seqs 128",
        "--kv-cache-dtype fp8",
        "ExampleConnector",
        "CUDA_VISIBLE_DEVICES=0",
    ):
        assert part in text, part
    assert text.count("vllm serve") == 2
    assert "--max-num-seqs 256" not in text  # a chunk below 256 lowers max_num_seqs with it


def test_plan_prefill_decode_asymmetry_and_colocated(capsys):
    assert (
        main(
            [
                "plan",
                "--model",
                "llama-3.1-8b",
                "--gpus",
                "3",
                "--sim",
                "--prefill-tp",
                "2",
                "--decode-tp",
                "1",
                "--json",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert [e["gpus"] for e in plan["engines"]] == [[0, 1], [2]]
    assert main(["plan", "--colocated", "--gpus", "1", "--sim", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in plan["engines"]] == ["colocated"] and plan["connector"] is None


def test_plan_config_errors_via_main(capsys):
    assert (
        main(["plan", "--gpus", "1", "--sim", "--prefill-util", "0.6", "--decode-util", "0.6"]) == 2
    )
    err = capsys.readouterr().err
    assert "adds up to 1.20" in err and "fix:" in err
    assert main(["plan", "--gpu-type", "a100", "--kv-dtype", "fp8", "--sim"]) == 2
    assert "compute capability" in capsys.readouterr().err


def test_commands_are_registered_in_one_table():
    names = {a.dest for a in build_parser()._subparsers._group_actions}  # noqa: SLF001
    assert names == {"command"} and len(COMMANDS) >= 1
    sub = build_parser()._subparsers._group_actions[0]  # noqa: SLF001
    assert "plan" in sub.choices
