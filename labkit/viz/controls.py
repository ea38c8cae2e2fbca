"""The learner's knobs: an ipywidgets panel whose Apply button hands a VALIDATED config to
`on_apply`, and a start-up progress bar (stage name + fraction, one row per engine).

Controls never touch an engine: they only build a `labkit.plan` object and run
`labkit.plan.validate` on it; a `ConfigError` is shown in the panel and nothing is called.
"""
from __future__ import annotations

import dataclasses
import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ipywidgets as w

KV_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16", "float16")
BLOCK_SIZES = (16, 32, 64)  # CUDA attention backends' block sizes (vllm/config/cache.py)


@dataclass(frozen=True)
class WorkloadSettings:
    """The traffic the learner sends: Poisson arrivals with fixed lengths."""

    rate: float = 2.0  # requests per second
    prompt_len: int = 1024  # tokens
    output_len: int = 128  # tokens
    shared_prefix: float = 0.0  # fraction of each prompt shared by all requests (prefix cache)


@dataclass(frozen=True)
class LabSettings:
    """What Apply hands to `on_apply`: the validated engine config and the workload."""

    config: Any  # labkit.plan.PDConfig (or EngineConfig), validated
    plan: Any  # what labkit.plan.validate returned for it
    workload: WorkloadSettings


def _row(label: str, widget: w.Widget) -> w.Widget:
    widget.description = label
    widget.style = {"description_width": "150px"}
    widget.layout = w.Layout(width="98%")
    return widget


class ControlPanel:
    """Engine and workload knobs + Apply.

    Args:
        on_apply: called with a `LabSettings` once validation passed; never on a ConfigError.
        base: the running config (a labkit.plan.PDConfig); its values fill the widgets and
            the knobs are applied onto a copy of it. None: labkit.plan's defaults.
        models: model choices (labkit.models preset keys by default).
    """

    def __init__(self, on_apply: Callable[[LabSettings], None] | None = None, base: Any = None,
                 models: list[str] | None = None, hardware: Any = None) -> None:  # fmt: skip
        from labkit.plan import PDConfig

        self.on_apply = on_apply
        self.base = base if base is not None else PDConfig()
        self.hardware = hardware
        if models is None:
            from labkit.models import PRESETS

            models = list(PRESETS)
        eng = engines_of(self.base)[0]
        self.target = _row("apply to", w.ToggleButtons(
            options=["both", "prefill", "decode"] if isinstance(self.base, PDConfig) else ["both"],
            value="both"))  # fmt: skip
        self.max_num_batched_tokens = _row("chunk size (0 = auto)", w.BoundedIntText(
            value=eng.max_num_batched_tokens or 0, min=0, max=1 << 24, step=256))  # fmt: skip
        self.tp = _row("tensor parallel (TP)", w.Dropdown(
            options=list(range(1, 9)), value=eng.tp))  # fmt: skip
        self.pp = _row("pipeline parallel (PP)", w.Dropdown(
            options=list(range(1, 9)), value=eng.pp))  # fmt: skip
        self.kv_cache_dtype = _row("KV-cache dtype", w.Dropdown(
            options=list(KV_DTYPES), value=eng.kv_cache_dtype))  # fmt: skip
        self.block_size = _row("block size (tokens)", w.Dropdown(
            options=sorted({*BLOCK_SIZES, eng.block_size}), value=eng.block_size))  # fmt: skip
        self.gpu_memory_utilization = _row("memory fraction (0 = auto)", w.BoundedFloatText(
            value=eng.gpu_memory_utilization or 0.0, min=0.0, max=1.0, step=0.05))  # fmt: skip
        self.model = _row("model", w.Dropdown(
            options=models if eng.model in models else [eng.model, *models], value=eng.model))  # fmt: skip
        wl = WorkloadSettings()
        self.rate = _row("rate (req/s)", w.BoundedFloatText(value=wl.rate, min=0.0, max=1e4))
        self.prompt_len = _row("prompt tokens", w.BoundedIntText(value=wl.prompt_len, min=1, max=1 << 20))
        self.output_len = _row("output tokens", w.BoundedIntText(value=wl.output_len, min=1, max=1 << 20))
        self.shared_prefix = _row("shared-prefix share", w.FloatSlider(
            value=wl.shared_prefix, min=0.0, max=1.0, step=0.05))  # fmt: skip
        self.apply_button = w.Button(description="Apply", button_style="primary", icon="check")
        self.apply_button.on_click(lambda _b: self.apply())
        self.message = w.HTML("")
        self.last_settings: LabSettings | None = None
        engine_box = w.VBox([
            self.target, self.model, self.max_num_batched_tokens, self.tp, self.pp,
            self.kv_cache_dtype, self.block_size, self.gpu_memory_utilization,
        ])  # fmt: skip
        workload_box = w.VBox([self.rate, self.prompt_len, self.output_len, self.shared_prefix])
        self.widget = w.VBox([
            w.HTML("<b>Engines</b>"), engine_box, w.HTML("<b>Workload</b>"), workload_box,
            self.apply_button, self.message,
        ])  # fmt: skip

    def engine_values(self) -> dict[str, Any]:
        """The engine knobs, named like labkit.plan.EngineConfig's fields."""
        return {
            "model": str(self.model.value),
            "max_num_batched_tokens": int(self.max_num_batched_tokens.value) or None,
            "tp": int(self.tp.value),
            "pp": int(self.pp.value),
            "kv_cache_dtype": str(self.kv_cache_dtype.value),
            "block_size": int(self.block_size.value),
            "gpu_memory_utilization": float(self.gpu_memory_utilization.value) or None,
        }

    def workload(self) -> WorkloadSettings:
        return WorkloadSettings(
            rate=float(self.rate.value), prompt_len=int(self.prompt_len.value),
            output_len=int(self.output_len.value), shared_prefix=float(self.shared_prefix.value),
        )  # fmt: skip

    def apply(self) -> LabSettings | None:
        """Validate, then call on_apply; on ConfigError show it and call nothing."""
        from labkit.plan import ConfigError, validate

        try:
            cfg = with_engine_values(self.base, self.engine_values(), self.target.value)
            plan = validate(cfg, self.hardware)
        except ConfigError as e:
            self._say(f"✗ {e}", "#c92a2a")
            return None
        settings = LabSettings(cfg, plan, self.workload())
        self.last_settings = settings
        if self.on_apply is None:
            self._say("✓ valid (no on_apply given: nothing restarted)", "#2b8a3e")
            return settings
        try:
            self.on_apply(settings)
        except Exception as e:  # the lab failed to apply it: say so, keep the panel alive
            self._say(f"✗ apply failed: {type(e).__name__}: {e}", "#c92a2a")
            return None
        self.base = cfg
        self._say("✓ applied", "#2b8a3e")
        return settings

    def _say(self, text: str, color: str) -> None:
        self.message.value = f'<span style="color:{color};white-space:pre-wrap">{html.escape(text)}</span>'


class StartupProgress:
    """Staged start-up, one row per engine: stage name, bar, percent (red on failure)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[w.HTML, w.FloatProgress, w.Label]] = {}
        self.widget = w.VBox([w.HTML("<b>Start-up</b>")])

    def update(self, stage: str, fraction: float, engine: str = "", failed: bool = False) -> None:
        """Show `engine` at `stage` with `fraction` (0..1) done."""
        row = self.rows.get(engine)
        if row is None:
            # The stage text gets a line of its own and wraps: a w.Label is cut at its width.
            row = (w.HTML(layout=w.Layout(width="100%")),
                   w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="75%")),
                   w.Label())  # fmt: skip
            self.rows[engine] = row
            line = w.VBox([row[0], w.HBox(list(row[1:]))])
            self.widget.children = (*self.widget.children, line)
        label, bar, pct = row
        frac = min(max(float(fraction), 0.0), 1.0)
        text = html.escape(f"{engine}: {stage}" if engine else stage, quote=False)
        label.value = text  # plain text in an HTML widget: it wraps where a Label is cut
        bar.value = frac
        bar.bar_style = "danger" if failed else ("success" if frac >= 1.0 else "info")
        pct.value = "failed" if failed else f"{100 * frac:.0f}%"

    def update_from(self, engine: str, state: Any) -> None:
        """From a labkit.telemetry.vllm_log.StartupState (stage, progress, failed, errors)."""
        stage = state.stage or "starting"
        if state.failed and state.errors:
            stage = f"failed: {state.errors[-1][:80]}"
        self.update(stage, state.progress, engine, failed=state.failed)


def engines_of(cfg: Any) -> list[Any]:
    """The EngineConfigs inside a PDConfig (prefill, decode), or [cfg] for an EngineConfig."""
    from labkit.plan import PDConfig

    return [cfg.prefill, cfg.decode] if isinstance(cfg, PDConfig) else [cfg]


def with_engine_values(cfg: Any, values: dict[str, Any], target: str = "both") -> Any:
    """A copy of `cfg` with the knobs set on the targeted engine(s) ("both"|"prefill"|"decode")."""
    from labkit.plan import PDConfig

    if not isinstance(cfg, PDConfig):
        return dataclasses.replace(cfg, **values)
    changes = {
        role: dataclasses.replace(getattr(cfg, role), **values)
        for role in ("prefill", "decode") if target in ("both", role)
    }  # fmt: skip
    return dataclasses.replace(cfg, **changes)
