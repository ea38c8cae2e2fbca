"""Bad input gets one clear error before anything starts (issue 20, item 9): the wrong type for
a Lab keyword, a bad `labkit up` flag, a model config.json that cannot describe a model.

Nothing here starts an engine: the Lab is only constructed (it plans), the CLI cases end in
the planner or the flag checks (exit code 2, one `error: ... / fix: ...` line).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labkit.cli import main as cli_main
from labkit.lab import Lab
from labkit.models import ModelConfigError, get_model
from labkit.plan import ConfigError, EngineConfig, PDConfig, validate
from labkit.plan.planner import check_config

GOOD = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256,
        "num_hidden_layers": 4, "intermediate_size": 704, "vocab_size": 32000,
        "max_position_embeddings": 2048, "architectures": ["LlamaForCausalLM"]}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli_main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


# ---- Lab keywords of the wrong type -> ConfigError naming the keyword and the type ----------
@pytest.mark.parametrize(("kw", "words"), [
    ({"gpu_memory_utilization": "0.5"}, ("gpu_memory_utilization='0.5'", "a str", "not a number")),
    ({"num_gpus": 2.5}, ("num_gpus=2.5", "a float", "not an integer")),
    ({"num_gpus": 2.5, "mode": "sim"}, ("num_gpus=2.5", "not an integer")),
    ({"tp": "2"}, ("tp='2'", "not an integer")),
    ({"max_num_seqs": 8.0}, ("max_num_seqs=8.0", "not an integer")),
    ({"gpu_memory_utilization": True}, ("gpu_memory_utilization=True", "not a number")),
    ({"gpu_memory_utilization": float("nan")}, ("gpu_memory_utilization=nan", "not a number")),
])
def test_lab_refuses_the_wrong_type(kw: dict, words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        Lab(**kw)
    err = info.value
    assert isinstance(err, ConfigError) and not isinstance(err, TypeError)
    for w in words:
        assert w in err.problem, (w, err.problem)
    assert err.fix.startswith("pass ")


def test_num_gpus_negative_in_sim_mode_is_a_config_error() -> None:
    # hardware.simulated() used to get -1 first and raise a bare ValueError
    with pytest.raises(ConfigError, match=r"num_gpus=-1 is out of range"):
        Lab(num_gpus=-1, mode="sim")


def test_check_config_covers_both_engines_and_the_pair() -> None:
    cfg = PDConfig(decode=EngineConfig(role="decode", block_size="16"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^decode: block_size='16' is a str, not an integer"):
        check_config(cfg)
    cfg = PDConfig(colocated="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"colocated='yes' is a str, not True or False"):
        validate(cfg)
    cfg = PDConfig(prefill=EngineConfig(role="prefill", extra_args="--seed 1"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"extra_args='--seed 1' is not a list of strings"):
        check_config(cfg)
    check_config(PDConfig())  # the defaults pass


# ---- labkit up flags -> exit 2, one error line ----------------------------------------------
@pytest.mark.parametrize("flag", ["--num-gpus", "--gpus"])
def test_up_negative_gpus(flag: str, capsys: pytest.CaptureFixture[str],
                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path))
    for mode in ("--sim", "--auto"):
        code, err = _cli(capsys, "up", mode, flag, "-1")
        assert code == 2
        assert len(err.splitlines()) == 1, err
        assert err.startswith("error: --num-gpus=-1 is out of range / fix: use 1..64"), err
        assert "Traceback" not in err


def test_up_run_dir_that_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path))
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = _cli(capsys, "up", "--sim", "--run-dir", str(afile))
    assert code == 2
    assert err == (f"error: --run-dir {afile} is a file, not a directory / fix: name a "
                   "directory (it is created if missing), or leave --run-dir out")
    assert afile.read_text() == "x"  # left as it was


@pytest.mark.parametrize("value", ["-3", "0", "nan", "inf"])
def test_up_read_timeout_is_checked(value: str, capsys: pytest.CaptureFixture[str],
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABKIT_RUN_DIR", str(tmp_path))
    code, err = _cli(capsys, "up", "--sim", "--read-timeout", value)
    assert code == 2
    assert err.startswith("error: --read-timeout") and "not a positive number of seconds" in err
    assert "fix: use e.g. --read-timeout 30" in err


def test_up_read_timeout_reaches_the_proxy(tmp_path: Path) -> None:
    """The flag is the proxy's own (`python -m labkit.pd --read-timeout`), passed through Lab."""
    import argparse

    from labkit.cli.lab import make_lab, register_up
    from labkit.lab import ProxyProcess

    parser = argparse.ArgumentParser()
    register_up(parser.add_subparsers())
    a = parser.parse_args(["up", "--sim", "--read-timeout", "7.5", "--run-dir", str(tmp_path)])
    lab = make_lab(a, owner="test")
    assert lab.read_timeout == 7.5
    cmd = ProxyProcess(["http://127.0.0.1:1"], ["http://127.0.0.1:2"], "nixl",
                       lab.read_timeout, port=3).command()
    assert cmd[cmd.index("--read-timeout") + 1] == "7.5"
    a = parser.parse_args(["up", "--sim", "--run-dir", str(tmp_path)])
    assert make_lab(a, owner="test").read_timeout is None  # the proxy's 600 s default


# ---- model config.json shapes -> ConfigError naming the field and the file ------------------
@pytest.mark.parametrize(("change", "words"), [
    ({"num_attention_heads": 0}, "num_attention_heads=0 in {f} is not positive"),
    ({"hidden_size": -2048}, "hidden_size=-2048 in {f} is not positive"),
    ({"text_config": [1, 2]}, "text_config in {f} is a list, not an object"),
    ({"num_hidden_layers": "4"}, "num_hidden_layers='4' in {f} is a str, not an integer"),
    ({"vocab_size": None}, "vocab_size is missing from {f}"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 in {f} is not a multiple of "
                                 "num_key_value_heads=3"),
    ({"hidden_size": 2}, "hidden_size=2 in {f} is smaller than num_attention_heads=4"),
])
def test_bad_model_config(change: dict, words: str, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {**GOOD, **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    f = tmp_path / "config.json"
    f.write_text(json.dumps(cfg))
    expected = words.format(f=f)
    with pytest.raises(ModelConfigError) as info:
        get_model(str(tmp_path))
    assert expected in info.value.problem
    with pytest.raises(ConfigError) as info2:
        Lab(model=str(tmp_path), mode="sim")
    assert expected in info2.value.problem and info2.value.problem.startswith("prefill: ")
    code, err = _cli(capsys, "plan", "--model", str(tmp_path))
    assert code == 2 and len(err.splitlines()) == 1 and expected in err


def test_model_config_not_an_object_or_not_json(tmp_path: Path) -> None:
    f = tmp_path / "config.json"
    f.write_text("[1]")
    with pytest.raises(ConfigError, match=r"holds a JSON list, not an object"):
        Lab(model=str(tmp_path))
    f.write_text("{not json")
    with pytest.raises(ConfigError, match=r"is not valid JSON"):
        Lab(model=str(tmp_path))


def test_good_model_config_plans_positive_blocks(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(GOOD))
    plan = Lab(model=str(tmp_path), mode="sim").plan
    assert all(e.num_blocks > 0 and e.kv_bytes_per_token > 0 for e in plan.engines)
