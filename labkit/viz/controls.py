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
GPU_COUNTS = (1, 2, 4, 8)  # a simulated machine's GPUs
BLOCK_SIZES = (16, 32, 64)  # CUDA attention backends' block sizes (vllm/config/cache.py)


@dataclass(frozen=True)
class WorkloadSettings:
    """The traffic the learner sends: Poisson arrivals with fixed lengths."""

    # Defaults chosen so the chunk size shows: several prompts in flight, each longer than a
    # small chunk, so a prefill takes several steps and TTFT follows the chunk, not the pool.
    rate: float = 4.0  # requests per second
    prompt_len: int = 600  # tokens
    output_len: int = 48  # tokens
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

    Labels carry vLLM's names (max_num_batched_tokens, kv_cache_dtype, ...), as the CLI's
    flags and `labkit.Lab`'s keywords do.

    Args:
        on_apply: called with a `LabSettings` once validation passed; never on a ConfigError.
        base: the running config (a labkit.plan.PDConfig); its values fill the widgets and
            the knobs are applied onto a copy of it. None: labkit.plan's defaults.
        models: model choices (labkit.models preset keys by default).
        hardware: the machine validate() plans for. A simulated one (or None with
            `simulated=True`) gets GPU type and count controls, so every TP/PP those GPUs
            allow is reachable; a real one is shown (its visible GPUs), not changed.
        kv_cache_memory: bytes of KV cache per GPU (vLLM's --kv-cache-memory): the block
            count then follows the dtype, block size, TP and PP. None: the base config's
            num_gpu_blocks_override (if any) pins the count, and the panel says so.
        workload: the workload knobs' values (kept across Apply by the caller).
        threaded: run on_apply on a thread, Apply disabled until it returns (a second click
            meanwhile is ignored); False: synchronously (tests, scripts).
    """

    def __init__(self, on_apply: Callable[[LabSettings], None] | None = None, base: Any = None,
                 models: list[str] | None = None, hardware: Any = None,
                 kv_cache_memory: int | None = None, workload: WorkloadSettings | None = None,
                 simulated: bool | None = None, threaded: bool = False) -> None:  # fmt: skip
        import threading

        from labkit.plan import PDConfig

        self.on_apply = on_apply
        self.base = base if base is not None else PDConfig()
        self.hardware = hardware
        self.kv_cache_memory = kv_cache_memory
        self.threaded = threaded
        self.busy = False
        self._lock = threading.Lock()
        self.num_applies = 0
        sim = simulated if simulated is not None else (hardware is None or hardware.simulated)
        if models is None:
            from labkit.models import PRESETS

            models = list(PRESETS)
        eng = engines_of(self.base)[0]
        self.target = _row("apply to", w.ToggleButtons(
            options=["both", "prefill", "decode"] if isinstance(self.base, PDConfig) else ["both"],
            value="both"))  # fmt: skip
        from labkit.hardware import GPU_TYPES

        gpu_key = getattr(self.base, "gpu_type", None) or (
            hardware.gpu_type.key if hardware is not None else "h100")
        count = getattr(self.base, "num_gpus", None) or (
            hardware.num_gpus if hardware is not None and hardware.num_gpus else 2)
        self.gpu_type = _row("GPU type (simulated)", w.Dropdown(
            options=sorted(GPU_TYPES), value=gpu_key if gpu_key in GPU_TYPES else "h100"))
        self.num_gpus = _row("num_gpus (simulated)", w.Dropdown(
            options=sorted({*GPU_COUNTS, count}), value=count))  # fmt: skip
        if sim:
            machine: list[w.Widget] = [self.gpu_type, self.num_gpus]
        else:  # real GPUs: what is visible, not a knob
            names = f"{hardware.num_gpus} x {hardware.gpu_type.name}" if hardware else "?"
            machine = [w.HTML(f"visible GPUs: {html.escape(names)}")]
        self.simulated = sim
        self.max_num_batched_tokens = _row("max_num_batched_tokens (chunk; 0 = auto)",
                                           w.BoundedIntText(value=eng.max_num_batched_tokens or 0,
                                                            min=0, max=1 << 24, step=64))
        self.tp = _row("tensor_parallel_size (TP)", w.Dropdown(
            options=list(range(1, 9)), value=eng.tp))  # fmt: skip
        self.pp = _row("pipeline_parallel_size (PP)", w.Dropdown(
            options=list(range(1, 9)), value=eng.pp))  # fmt: skip
        self.kv_cache_dtype = _row("kv_cache_dtype", w.Dropdown(
            options=list(KV_DTYPES), value=eng.kv_cache_dtype))  # fmt: skip
        self.block_size = _row("block_size (tokens)", w.Dropdown(
            options=sorted({*BLOCK_SIZES, eng.block_size}), value=eng.block_size))  # fmt: skip
        self.gpu_memory_utilization = _row("gpu_memory_utilization (0 = auto)",
                                           w.BoundedFloatText(
            value=eng.gpu_memory_utilization or 0.0, min=0.0, max=1.0, step=0.05))  # fmt: skip
        self.pool_note = w.HTML(self._pool_text())
        self.model = _row("model", w.Dropdown(
            options=models if eng.model in models else [eng.model, *models], value=eng.model))  # fmt: skip
        wl = workload or WorkloadSettings()
        self.rate = _row("rate (req/s)", w.BoundedFloatText(value=wl.rate, min=0.0, max=1e4))
        self.prompt_len = _row("prompt tokens", w.BoundedIntText(value=wl.prompt_len, min=1, max=1 << 20))
        self.output_len = _row("output tokens", w.BoundedIntText(value=wl.output_len, min=1, max=1 << 20))
        self.shared_prefix = _row("shared-prefix share", w.FloatSlider(
            value=wl.shared_prefix, min=0.0, max=1.0, step=0.05))  # fmt: skip
        self.apply_button = w.Button(description="Apply", button_style="primary", icon="check")
        self.apply_button.on_click(lambda _b: self.click())
        self.message = w.HTML("")
        self.last_settings: LabSettings | None = None
        engine_box = w.VBox([
            *machine, self.target, self.model, self.max_num_batched_tokens, self.tp, self.pp,
            self.kv_cache_dtype, self.block_size, self.gpu_memory_utilization, self.pool_note,
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

    def _pool_text(self) -> str:
        """How the KV pool is sized, in words (a pinned block count is said, not hidden)."""
        if self.kv_cache_memory is not None:
            return (f"<small>KV pool: {self.kv_cache_memory / 1e6:.1f} MB per GPU "
                    "(kv_cache_memory): fp8 holds twice the blocks</small>")
        pinned = engines_of(self.base)[0].num_gpu_blocks_override
        if pinned:
            return (f"<small>KV pool pinned at {pinned} blocks (num_gpu_blocks): the dtype and "
                    "block size do not change the count</small>")
        return "<small>KV pool: what gpu_memory_utilization leaves (vLLM's rule)</small>"

    def config(self) -> tuple[Any, Any]:
        """(the config the widgets describe, the hardware to plan it on)."""
        from labkit.hardware import simulated

        cfg = with_engine_values(self.base, self.engine_values(), self.target.value)
        hardware = self.hardware
        if self.simulated and hasattr(cfg, "num_gpus"):
            cfg = dataclasses.replace(cfg, num_gpus=int(self.num_gpus.value),
                                      gpu_type=str(self.gpu_type.value))
            hardware = simulated(int(self.num_gpus.value), str(self.gpu_type.value))
        if self.kv_cache_memory is not None:
            from labkit.lab import kv_cache_memory_blocks

            def sized(e: Any) -> Any:
                n = kv_cache_memory_blocks(e.model, self.kv_cache_memory, tp=e.tp, pp=e.pp,
                                           kv_cache_dtype=e.kv_cache_dtype,
                                           block_size=e.block_size)
                return dataclasses.replace(e, num_gpu_blocks_override=n)

            cfg = (dataclasses.replace(cfg, prefill=sized(cfg.prefill), decode=sized(cfg.decode))
                   if hasattr(cfg, "prefill") else sized(cfg))
        return cfg, hardware

    def click(self) -> None:
        """Apply's button: one relaunch at a time; a click during one is ignored."""
        with self._lock:
            if self.busy:
                return
            self.busy = True
        self.apply_button.disabled = True
        if not self.threaded:
            try:
                self.apply()
            finally:
                self._done()
            return

        def run() -> None:
            try:
                self.apply()
            finally:
                self._done()

        apply_worker().submit(run)

    def _done(self) -> None:
        with self._lock:
            self.busy = False
        self.apply_button.disabled = False

    def apply(self) -> LabSettings | None:
        """Validate, then call on_apply; on ConfigError show it and call nothing."""
        from labkit.plan import ConfigError, validate

        try:
            cfg, hardware = self.config()
            plan = validate(cfg, hardware)
        except ConfigError as e:
            self._say(f"✗ {e}", "#c92a2a")
            return None
        settings = LabSettings(cfg, plan, self.workload())
        if (why := too_long(settings)) is not None:
            self._say(f"✗ {why}", "#c92a2a")
            return None
        self.last_settings = settings
        if self.on_apply is None:
            self._say("✓ valid (no on_apply given: nothing restarted)", "#2b8a3e")
            return settings
        self._say("… relaunching the lab with these settings", "#495057")  # no stale error
        self.num_applies += 1
        try:
            self.on_apply(settings)
        except Exception as e:  # the lab failed to apply it: say so, keep the panel alive
            self._say(f"✗ apply failed: {type(e).__name__}: {e}", "#c92a2a")
            return None
        self.base = cfg
        self.pool_note.value = self._pool_text()
        blocks = ", ".join(f"{ep.name} {ep.num_blocks:,}" for ep in plan.engines)
        self._say(f"✓ applied (KV blocks: {blocks})", "#2b8a3e")
        return settings

    def disable(self, why: str) -> None:
        """No Apply here (a replay): every knob read-only, and why."""
        self.apply_button.disabled = True
        self.busy = True
        self._say(why, "#495057")

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


def too_long(settings: LabSettings) -> str | None:
    """Why every request of the workload would be refused (400) by the planned engines, or
    None. PP > 1 (ExampleConnector, chunked prefill off) caps max_model_len at the chunk."""
    wl = settings.workload
    need = wl.prompt_len + wl.output_len
    for ep in settings.plan.engines:
        if ep.max_model_len and need > ep.max_model_len:
            return (f"{ep.name}: max_model_len is {ep.max_model_len} tokens in this plan, and "
                    f"prompt + output tokens are {need}: every request would be refused. "
                    "Send shorter prompts, or raise max_num_batched_tokens (with PP > 1 "
                    "prefill is not chunked, so a prompt must fit one step)")
    return None


_APPLY_WORKER: Any = None


def apply_worker() -> Any:
    """The one thread that runs threaded Applies, alive as long as the process. Engines die
    when the thread that started them ends (PR_SET_PDEATHSIG, labkit/engines/launch.py): a
    relaunch on a short-lived thread would lose its new engines the moment it returned."""
    global _APPLY_WORKER
    if _APPLY_WORKER is None:
        from concurrent.futures import ThreadPoolExecutor

        _APPLY_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labkit-apply")
    return _APPLY_WORKER


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
