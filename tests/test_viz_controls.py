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
    assert s.workload == WorkloadSettings(rate=5.0, prompt_len=1024, output_len=128, shared_prefix=0.5)
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
