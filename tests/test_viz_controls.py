"""The control panel hands on_apply only configs that labkit.plan.validate accepts."""
from __future__ import annotations

from labkit.plan import EngineConfig, PDConfig
from labkit.viz.controls import ControlPanel, LabSettings, StartupProgress, WorkloadSettings


def base_cfg() -> PDConfig:
    # llama-3.2-1b: 32 heads, 8 KV heads; two simulated GPUs.
    return PDConfig(prefill=EngineConfig(model="llama-3.2-1b", role="prefill"),
                    decode=EngineConfig(model="llama-3.2-1b", role="decode"), num_gpus=2)


def test_bad_tp_is_refused_and_nothing_is_called():
    calls: list[LabSettings] = []
    panel = ControlPanel(on_apply=calls.append, base=base_cfg())
    panel.tp.value = 3  # 32 heads do not split 3 ways
    assert panel.apply() is None
    assert calls == []
    assert "tp=3" in panel.message.value and "32 heads" in panel.message.value
    panel.apply_button.click()  # the button takes the same path
    assert calls == []


def test_valid_change_reaches_on_apply_with_the_knobs():
    calls: list[LabSettings] = []
    panel = ControlPanel(on_apply=calls.append, base=base_cfg())
    panel.max_num_batched_tokens.value = 512
    panel.kv_cache_dtype.value = "fp8"
    panel.block_size.value = 32
    panel.rate.value = 5.0
    panel.shared_prefix.value = 0.5
    panel.apply_button.click()
    assert len(calls) == 1, panel.message.value
    s = calls[0]
    for eng in (s.config.prefill, s.config.decode):
        assert (eng.max_num_batched_tokens, eng.kv_cache_dtype, eng.block_size) == (512, "fp8", 32)
    assert s.workload == WorkloadSettings(rate=5.0, prompt_len=600, output_len=48, shared_prefix=0.5)
    assert s.plan is not None and "applied" in panel.message.value
    assert panel.base is s.config
    # Only the prefill engine's chunk size changes; decode keeps the applied one.
    panel.target.value = "prefill"
    panel.max_num_batched_tokens.value = 256
    panel.apply_button.click()
    assert len(calls) == 2, panel.message.value
    assert calls[1].config.prefill.max_num_batched_tokens == 256
    assert calls[1].config.decode.max_num_batched_tokens == 512


def test_on_apply_failure_is_reported():
    def boom(_s: LabSettings) -> None:
        raise RuntimeError("engine would not start")

    panel = ControlPanel(on_apply=boom, base=base_cfg())
    assert panel.apply() is None
    assert "engine would not start" in panel.message.value


def test_startup_progress_rows():
    p = StartupProgress()
    p.update("loading_weights", 0.3, engine="prefill-0")
    p.update("api_ready", 1.0, engine="decode-0")
    p.update("kv_cache_allocated", 0.6, engine="prefill-0")
    assert len(p.rows) == 2 and len(p.widget.children) == 3
    label, bar, pct = p.rows["prefill-0"]
    assert label.value == "prefill-0: kv_cache_allocated" and bar.value == 0.6 and pct.value == "60%"
    assert p.rows["decode-0"][1].bar_style == "success"
    p.update("failed", 0.6, engine="prefill-0", failed=True)
    assert bar.bar_style == "danger" and pct.value == "failed"


def test_the_simulated_machine_is_a_control_so_tp_and_pp_are_reachable():
    calls: list[LabSettings] = []
    panel = ControlPanel(on_apply=calls.append, base=base_cfg())  # 2 simulated GPUs
    assert panel.simulated and panel.num_gpus.value == 2
    panel.tp.value = 2
    assert panel.apply() is None and "needs 4 GPUs" in panel.message.value
    panel.num_gpus.value = 4
    assert panel.apply() is not None, panel.message.value
    assert calls[-1].plan.num_gpus == 4 and calls[-1].plan.engines[1].gpus == [2, 3]
    panel.tp.value, panel.pp.value, panel.num_gpus.value = 1, 2, 4
    assert panel.apply() is not None, panel.message.value
    assert [r.pp_rank for r in calls[-1].plan.engines[0].ranks] == [0, 1]
    panel.gpu_type.value, panel.num_gpus.value, panel.pp.value = "h200", 8, 1
    panel.tp.value = 4
    assert panel.apply() is not None and calls[-1].plan.gpu_type.key == "h200"


def test_a_pool_sized_in_bytes_doubles_its_blocks_with_fp8():
    calls: list[LabSettings] = []
    cfg = PDConfig(prefill=EngineConfig(model="lab-tiny", role="prefill", max_num_seqs=16),
                   decode=EngineConfig(model="lab-tiny", role="decode", max_num_seqs=16),
                   num_gpus=2)
    panel = ControlPanel(on_apply=calls.append, base=cfg, kv_cache_memory=4_000_000)
    assert panel.apply() is not None
    auto = calls[-1].plan.engines[0].num_blocks
    panel.kv_cache_dtype.value = "fp8"
    assert panel.apply() is not None
    assert calls[-1].plan.engines[0].num_blocks == 2 * auto
    assert f"{2 * auto:,}" in panel.message.value and "fp8 holds twice" in panel.pool_note.value
    pinned = ControlPanel(base=PDConfig(
        prefill=EngineConfig(model="lab-tiny", role="prefill", num_gpu_blocks_override=128),
        decode=EngineConfig(model="lab-tiny", role="decode", num_gpu_blocks_override=128)))
    assert "pinned at 128 blocks" in pinned.pool_note.value


def test_double_click_is_one_relaunch_and_the_old_error_goes():
    import threading
    import time

    release = threading.Event()
    calls: list[LabSettings] = []

    def slow(s: LabSettings) -> None:
        calls.append(s)
        release.wait(5)

    panel = ControlPanel(on_apply=slow, base=base_cfg(), threaded=True)
    panel.tp.value = 3
    panel.apply_button.click()
    deadline = time.monotonic() + 5
    while panel.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "✗" in panel.message.value
    panel.tp.value = 1
    panel.apply_button.click()
    panel.apply_button.click()  # the second click lands during the relaunch
    time.sleep(0.2)
    assert panel.apply_button.disabled and "relaunching" in panel.message.value
    assert "✗" not in panel.message.value  # the stale error is gone while it relaunches
    release.set()
    while panel.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 1 and not panel.apply_button.disabled


def test_workload_knobs_start_from_what_was_applied():
    wl = WorkloadSettings(rate=1.5, prompt_len=300, output_len=20, shared_prefix=0.25)
    panel = ControlPanel(base=base_cfg(), workload=wl)
    assert panel.workload() == wl


def test_threaded_applies_run_on_one_thread_that_outlives_them():
    """Engines die with the thread that started them (PR_SET_PDEATHSIG): a relaunch must run
    on a thread that stays alive after Apply returns, the same one for every panel."""
    import threading
    import time

    threads: list[threading.Thread] = []
    panels = [ControlPanel(on_apply=lambda s: threads.append(threading.current_thread()),
                           base=base_cfg(), threaded=True) for _ in range(2)]  # fmt: skip
    for panel in panels:  # a relaunch builds a new panel: the thread is the process's
        panel.apply_button.click()
        deadline = time.monotonic() + 5
        while panel.busy and time.monotonic() < deadline:
            time.sleep(0.01)
    time.sleep(0.1)
    assert len(threads) == 2 and threads[0] is threads[1]
    assert threads[0] is not threading.main_thread() and threads[0].is_alive()


def test_a_workload_the_plan_would_refuse_is_said_and_not_applied():
    """PP=2 caps max_model_len at the chunk (prefill not chunked): 600-token prompts with a
    256-token chunk would all get 400; Apply says so and relaunches nothing."""
    calls: list[LabSettings] = []
    cfg = base_cfg()
    panel = ControlPanel(on_apply=calls.append, base=cfg, simulated=True)
    panel.num_gpus.value = 4
    panel.pp.value = 2
    panel.max_num_batched_tokens.value = 256
    panel.prompt_len.value, panel.output_len.value = 600, 48
    assert panel.apply() is None and calls == []
    assert "max_model_len is 256" in panel.message.value and "648" in panel.message.value
    panel.prompt_len.value = 200
    assert panel.apply() is not None and len(calls) == 1
