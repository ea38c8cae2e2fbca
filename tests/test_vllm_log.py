"""vLLM 0.26 start-up logs -> staged progress; a log that grows; an engine that dies starting."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from labfixtures import FIXTURES

from labkit.engines.base import EngineStartError, pids_in_group
from labkit.engines.vllm import VLLMEngine
from labkit.telemetry.vllm_log import STAGES, LogFollower, StartupParser, follow, parse_log

LOGS = FIXTURES / "logs"


@pytest.mark.parametrize(
    ("name", "kv_gib", "tokens", "conc", "port"),
    [("nixl-prefill", 11.55, 189_168, 46.18, 8100), ("nixl-decode", 13.0, 212_912, 51.98, 8200),
     ("offload-small", 9.14, 1_280, 1.25, 8300)],
)
def test_fixture_logs_give_every_stage(name, kv_gib, tokens, conc, port):
    st = parse_log(LOGS / f"{name}.log")
    assert st.version == "0.26.0"
    assert st.weights_gib == 1.65 and 1.1 < st.weights_load_s < 1.4
    assert st.kv_cache_gib == kv_gib and st.kv_cache_tokens == tokens
    assert st.max_concurrency == conc
    assert st.eager is True and st.graph_capture_s is None
    assert st.init_engine_s == pytest.approx(14.2, abs=0.1)
    assert st.port == port and st.ready and not st.errors
    assert st.stage == "api_ready" and st.progress == 1.0
    assert set(st.pids) == {"APIServer", "EngineCore"}
    assert st.config["load_format"] == "dummy" and st.config["kv_cache_dtype"] == "auto"
    reached = [e.stage for e in st.events]
    order = [STAGES.index(s) for s in reached]
    assert order == sorted(order)  # stages come in vLLM's order
    assert set(reached) == set(STAGES) - {"graph_capture"}


def _lines(*bodies: str) -> list[str]:
    return [f"(EngineCore pid=7) INFO 11-21 08:37:42 [x.py:1] {b}\n" for b in bodies]


def test_graph_capture_and_errors():
    p = StartupParser()
    for line in _lines("Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%",
                       "Graph capturing finished in 7 secs, took 0.42 GiB",
                       "Model loading took 2.5 GiB memory and 3.25 seconds"):
        p.feed(line)
    assert p.state.eager is False and p.state.graph_capture_s == 7 and p.state.graph_gib == 0.42
    assert p.state.weights_gib == 2.5  # the V1 runner's wording ("GiB memory and")
    bad = [
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "ValueError: No available memory for the cache blocks. Try increasing "
        "`gpu_memory_utilization` when initializing the engine.",
        "OSError: [Errno 98] Address already in use",
        "RuntimeError: Engine core initialization failed. See root cause above.",
    ]
    for line in _lines(*bad):
        assert [e.stage for e in p.feed(line)][-1] == "failed"
    assert p.state.failed and len(p.state.errors) == 4
    # vLLM's ulimit warning mentions an error type but is not one
    p2 = StartupParser()
    p2.feed((LOGS / "nixl-prefill.log").read_text().splitlines()[7])
    assert not p2.state.errors


def test_follow_tails_a_growing_log(tmp_path):
    src = (LOGS / "nixl-decode.log").read_text().splitlines(keepends=True)
    log = tmp_path / "decode.log"
    stages: list[str] = []
    follower = LogFollower(log, lambda ev, st: stages.append(ev.stage), poll_s=0.02).start()

    def writer() -> None:
        with open(log, "w") as fh:
            for i, line in enumerate(src):
                if i % 20 == 0:
                    fh.write(line[:10])  # a partial line is held back until its newline
                    fh.flush()
                    time.sleep(0.03)
                    fh.write(line[10:])
                else:
                    fh.write(line)
                fh.flush()

    t = threading.Thread(target=writer)
    t.start()
    t.join()
    deadline = time.time() + 5
    while follower.state.stage != "api_ready" or not follower.state.ready:
        assert time.time() < deadline, follower.state.stage
        time.sleep(0.02)
    follower.stop()
    assert follower.state.kv_cache_tokens == 212_912
    assert stages[0] == "process_started" and "weights_loaded" in stages
    stop = threading.Event()
    stop.set()
    assert len(list(follow(log, stop))) == len(src)


def test_engine_that_dies_starting_raises_with_the_log_errors(tmp_path):
    fake = tmp_path / "fake_vllm.py"
    fake.write_text(
        "import sys, time\n"
        "print('(EngineCore pid=1) INFO 11-21 08:37:39 [m.py:1] Loading model from scratch...')\n"
        "print('(EngineCore pid=1) ERROR 11-21 08:37:42 [core.py:1] ValueError: No available "
        "memory for the cache blocks. Try increasing `gpu_memory_utilization`.')\n"
        "sys.stdout.flush(); time.sleep(0.3); sys.exit(1)\n")
    seen: list[str] = []
    eng = VLLMEngine("bad", [], python=sys.executable, log_path=tmp_path / "bad.log")
    eng.command = lambda: [sys.executable, str(fake)]  # type: ignore[method-assign]
    eng.start(lambda stage, detail: seen.append(stage))
    with pytest.raises(EngineStartError) as info:
        eng.wait_ready(timeout=20, poll_s=0.05)
    assert "No available memory for the cache blocks" in str(info.value)
    assert any("ValueError" in line for line in info.value.log_lines)
    eng.stop(timeout=5)
    assert not eng.is_alive() and pids_in_group(eng.pid) == []
    assert "loading_weights" in seen


def test_stop_kills_the_whole_process_group(tmp_path):
    script = tmp_path / "tree.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "time.sleep(60)\n")
    eng = VLLMEngine("tree", [], log_path=tmp_path / "tree.log")
    eng.command = lambda: [sys.executable, str(script)]  # type: ignore[method-assign]
    eng.start()
    deadline = time.time() + 10
    while len(eng.group_pids()) < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    assert "--port" in VLLMEngine("x", ["m"]).command()
    assert VLLMEngine("y", ["m", "--port", "8123"]).port == 8123
    eng.stop(timeout=5)
    assert pids_in_group(eng.pgid) == []


def test_lab_telemetry_takes_the_engines_own_figures_from_its_log():
    """The views show what the engine made (its start-up log), the plan only where the log
    said nothing: fixture log: 1.65 GiB weights, 11.55 GiB KV, 189,168 tokens."""
    from types import SimpleNamespace

    from labkit.hardware import simulated
    from labkit.lab import _engine_reported, build_config
    from labkit.plan import validate
    from labkit.telemetry.vllm_log import StartupState, parse_log

    ep = validate(build_config("lab-1b", num_gpus=2, gpu_type="h100"), simulated(0)).engine("prefill")
    state = parse_log(FIXTURES / "logs" / "nixl-prefill.log")
    weights, kv, blocks = _engine_reported(SimpleNamespace(startup=state), ep)
    assert (weights, kv, blocks) == (int(1.65 * 2**30), int(11.55 * 2**30), 189_168 // 16)
    assert blocks != ep.num_blocks  # the plan (other GPU memory, other fraction) differs
    plan = _engine_reported(SimpleNamespace(startup=StartupState()), ep)
    assert plan == (max(ep.weight_bytes), ep.kv_cache_bytes, ep.num_blocks)
