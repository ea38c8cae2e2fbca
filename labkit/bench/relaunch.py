"""How long Apply takes: from the learner's Apply to a serving pair, against vLLM's own start.

Apply in the dashboard (`labkit.teach.session.DashboardSession.apply`) stops the running lab
and starts a new `Lab` with the changed config. This runs exactly that path, without the
widgets: `lab.stop()`, `Lab(config)`, `lab.start(progress=...)`, then one completion through
`lab.url` (a pair that answers is a serving pair). Toggles are applied one after the other,
as a learner would (each on top of the last): a chunk change, a KV-cache dtype change and a
TP change. A toggle the machine cannot run (TP=2 on one GPU) is reported as skipped with the
planner's reason, and nothing is stopped for it.

Each Apply is split into stages: stopping the old lab, planning (`Lab(...)`: validate,
detect), the model directory, each engine's own start (its process start -> /health 200:
`vllm serve` itself; the lab only waits, polling every `LogFollowingEngine.POLL_S`), the gaps
between engines, the proxy, the telemetry binding, and the first completion. "lab adds" is
the total minus the engines' own start on the critical path (their sum where the engines
start one after the other on a shared GPU, the longest where they start together). vLLM's own
start of the same engine is also read from its log's own timestamps (first line ->
"Application startup complete", whole seconds), and with `--baseline` measured bare: the same
`vllm serve` command alone, its /health polled every 0.05 s.

    python -m labkit.bench.relaunch                       # real vLLM where there is a GPU
    python -m labkit.bench.relaunch --mode sim --json relaunch.json
    python -m labkit.bench.relaunch --toggles chunk,kv-dtype,tp --baseline --num-gpus 1

Runs on the simulator too (`--mode sim`): the same stages, simulated engines (CI tests it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOGGLES = ("chunk", "kv-dtype", "tp")
_STAMP = re.compile(r"(?:INFO|WARNING|ERROR|DEBUG|CRITICAL)\s+(\d\d-\d\d \d\d:\d\d:\d\d)")


def toggled(cfg: Any, toggle: str, chunk_to: int = 1024, kv_to: str = "fp8",
            tp_to: int = 2) -> tuple[Any, str]:
    """`cfg` (a PDConfig) with one knob changed on both engines, as Apply with target "both"
    does, and a label saying from what to what."""
    pre = cfg.prefill
    if toggle == "chunk":
        to = chunk_to if pre.max_num_batched_tokens != chunk_to else 2 * chunk_to
        values: dict[str, Any] = {"max_num_batched_tokens": to}
        label = f"chunk {pre.max_num_batched_tokens or 'auto'} -> {to}"
    elif toggle == "kv-dtype":
        to_kv = kv_to if pre.kv_cache_dtype != kv_to else "auto"
        values = {"kv_cache_dtype": to_kv}
        label = f"kv {pre.kv_cache_dtype} -> {to_kv}"
    elif toggle == "tp":
        to_tp = tp_to if pre.tp != tp_to else 1
        values = {"tp": to_tp}
        label = f"tp {pre.tp} -> {to_tp}"
    else:
        raise ValueError(f"unknown toggle {toggle!r}; one of {TOGGLES}")
    new = dataclasses.replace(cfg, prefill=dataclasses.replace(cfg.prefill, **values),
                              decode=dataclasses.replace(cfg.decode, **values))
    return new, label


def _log_span(log_path: Path) -> dict[str, Any]:
    """vLLM's own start-up from its log's timestamps (whole seconds): first stamped line ->
    each stage (first time reached), and -> "Application startup complete"."""
    from labkit.telemetry.vllm_log import parse_log

    if not log_path.exists():
        return {}
    st = parse_log(log_path)

    def when(stamp: str | None) -> _dt.datetime | None:
        if not stamp:
            return None
        try:
            return _dt.datetime.strptime(f"2000-{stamp}", "%Y-%m-%d %H:%M:%S")
        except ValueError:
            return None

    first: _dt.datetime | None = None
    for line in log_path.read_text(errors="replace").splitlines():
        m = _STAMP.search(line)
        if m and (first := when(m.group(1))) is not None:
            break
    out: dict[str, Any] = {}
    if first is None:
        return out
    stages: dict[str, float] = {}
    for ev in st.events:
        t = when(ev.log_time)
        if t is not None and ev.stage not in stages:
            stages[ev.stage] = (t - first).total_seconds()
    out["stages_s"] = stages
    ready = [when(ev.log_time) for ev in st.events
             if ev.stage == "api_ready" and ev.detail.get("ready") is not None]
    ready = [t for t in ready if t is not None]
    if ready:
        out["log_start_to_ready_s"] = (ready[-1] - first).total_seconds()
    if st.init_engine_s is not None:
        out["init_engine_s"] = st.init_engine_s
    if st.weights_load_s is not None:
        out["weights_load_s"] = st.weights_load_s
    return out


def _engine_window(eng: Any) -> dict[str, Any]:
    started, ready = getattr(eng, "started_at", None), getattr(eng, "ready_at", None)
    w: dict[str, Any] = {"started_at": started, "ready_at": ready}
    if started and ready:
        w["own_start_s"] = ready - started
    lp = getattr(eng, "log_path", None)
    if lp is not None:
        w.update(_log_span(Path(lp)))
    return w


def breakdown(t_apply: float, t_stopped: float, t_planned: float, marks: list[tuple[str, float]],
              engines: dict[str, dict[str, Any]], proxy: tuple[float | None, float | None],
              t_ready: float, t_served: float, shared: bool) -> dict[str, Any]:
    """Stages of one Apply from the wall-clock marks (time.time()). Pure: tested in CI."""
    mark = {}
    for stage, t in marks:
        mark.setdefault(stage, t)
    t_model = mark.get("preparing the model directory", t_planned)
    t_engines = mark.get("starting engines", t_model)
    t_engines_done = mark.get("engines ready", t_ready)
    own = {n: w.get("own_start_s", 0.0) for n, w in engines.items()}
    critical = sum(own.values()) if shared else max(own.values(), default=0.0)
    out: dict[str, Any] = {
        "total_s": t_served - t_apply,
        "stop_s": t_stopped - t_apply,
        "plan_s": t_planned - t_stopped,
        "model_dir_s": t_engines - t_model,
        "engines_s": t_engines_done - t_engines,
        "engines_own_s": own,
        "engines_critical_s": critical,
        "engines_overhead_s": (t_engines_done - t_engines) - critical,
        "after_engines_s": t_ready - t_engines_done,
        "first_request_s": t_served - t_ready,
        "shared_gpu_sequential": shared,
    }
    p_start, p_ready = proxy
    if p_start and p_ready:
        # the proxy's share of the critical path: it starts while the engines load, so only
        # what it needs after they are ready counts (its own start: proxy_own_s)
        p_done = max(p_ready, t_engines_done)
        out["proxy_s"] = p_done - t_engines_done
        out["proxy_own_s"] = p_ready - p_start
        out["telemetry_s"] = t_ready - p_done
    out["lab_adds_s"] = out["total_s"] - critical
    out["start_s"] = t_ready - t_stopped  # Lab(...) + start(), no stop, no request
    return out


def _prompt(lab: Any, n: int = 64) -> list[int]:
    max_len = min(e.max_model_len for e in lab.plan.engines)
    n = max(1, min(n, max_len - 8))
    vocab = min(lab.plan.model.vocab_size, 30000)
    return [1000 + (i * 7919) % (vocab - 1001) for i in range(n)]


def _start_timed(cfg: Any, mode: str, run_dir: Path, speed: float,
                 t_apply: float, t_stopped: float) -> tuple[Any, dict[str, Any]]:
    from labkit.lab import Lab

    lab = Lab(cfg, mode=mode, run_dir=run_dir, speed=speed)
    t_planned = time.time()
    marks: list[tuple[str, float]] = []
    lab.start(progress=lambda stage, frac: marks.append((stage, time.time())))
    t_ready = time.time()
    lab.complete(_prompt(lab), max_tokens=4)
    t_served = time.time()
    shared = lab.kind == "vllm" and len({g for ep in lab.plan.engines for g in ep.gpus}) \
        < len(lab.plan.engines)
    engines = {n: _engine_window(e) for n, e in lab.engines.items()}
    proxy = (getattr(lab.proxy, "started_at", None), getattr(lab.proxy, "ready_at", None)) \
        if lab.proxy is not None else (None, None)
    row = breakdown(t_apply, t_stopped, t_planned, marks, engines, proxy, t_ready, t_served,
                    shared)
    row["engines"] = engines
    row["marks"] = [(s, round(t - t_apply, 3)) for s, t in marks]
    row["describe"] = lab.describe()
    return lab, row


def baseline(cfg: Any, mode: str, run_dir: Path, speed: float, name: str = "decode",
             poll_s: float = 0.05) -> dict[str, Any]:
    """One engine of `cfg` started alone (the same command the lab runs, observer endpoint
    included), /health polled every `poll_s`: vLLM's own start without the lab around it."""
    from labkit.lab import Lab
    from labkit.plan.ports import free_port

    lab = Lab(cfg, mode=mode, run_dir=run_dir, speed=speed)
    if name not in {e.name for e in lab.plan.engines}:
        name = lab.plan.engines[-1].name
    model_dir = lab._model_dir()
    lab._observer_endpoint = f"tcp://127.0.0.1:{free_port()}"
    eng = lab._engine(name, model_dir)
    t0 = time.time()
    eng.start()
    try:
        own = eng.wait_ready(600, poll_s)
    finally:
        t1 = time.time()
        eng.stop()
        stop_s = time.time() - t1
    out = {"engine": name, "own_start_s": own, "wall_s": t1 - t0, "stop_s": stop_s,
           "poll_s": poll_s}
    out.update(_log_span(Path(eng.log_path)))
    return out


def run(mode: str = "auto", model: str = "lab-1b", num_gpus: int | None = None,
        connector: str = "auto", toggles: tuple[str, ...] = TOGGLES, chunk_to: int = 1024,
        do_baseline: bool = False, run_dir: Path | None = None, speed: float = 0.0,
        budget_s: float | None = None,
        log: Callable[[str], None] = lambda s: print(s, flush=True),
        **knobs: Any) -> dict[str, Any]:
    """Start a lab, apply each toggle in turn (stop -> new Lab -> start -> one completion),
    optionally time one bare engine start, stop. Returns every row (see `breakdown`)."""
    from labkit.lab import Lab, build_config
    from labkit.plan import ConfigError

    t_begin = time.time()
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="labkit-relaunch-"))
    cfg = build_config(model, num_gpus=num_gpus, connector=connector, **knobs)
    probe = Lab(cfg, mode=mode, run_dir=run_dir / "probe", speed=speed)
    mode = probe.kind if mode == "auto" else mode
    out: dict[str, Any] = {"mode": mode, "kind": probe.kind, "describe": probe.describe(),
                           "gpu_type": probe.plan.gpu_type.name, "num_gpus": probe.plan.num_gpus,
                           "rows": []}
    t0 = time.time()
    lab, row = _start_timed(cfg, mode, run_dir / "r0-initial", speed, t0, t0)
    row.update(toggle="initial", label="initial start", config=_knobs(cfg))
    out["rows"].append(row)
    log(_line(row))
    try:
        for i, tog in enumerate(toggles, 1):
            new_cfg, label = toggled(cfg, tog, chunk_to=chunk_to)
            try:
                Lab(new_cfg, mode=mode, run_dir=run_dir / "check", speed=speed)
            except ConfigError as e:  # Apply validates first: nothing is stopped
                out["rows"].append({"toggle": tog, "label": label, "skipped": str(e)})
                log(f"{label:<22} skipped: {e}")
                continue
            if budget_s is not None and time.time() - t_begin + row["total_s"] > budget_s:
                out["rows"].append({"toggle": tog, "label": label,
                                    "skipped": f"time budget ({budget_s:.0f} s) would be passed"})
                log(f"{label:<22} skipped: time budget")
                continue
            t_apply = time.time()
            lab.stop()
            lab = None
            t_stopped = time.time()
            lab, row = _start_timed(new_cfg, mode, run_dir / f"r{i}-{tog}", speed, t_apply,
                                    t_stopped)
            row.update(toggle=tog, label=label, config=_knobs(new_cfg))
            out["rows"].append(row)
            log(_line(row))
            cfg = new_cfg
    finally:
        if lab is not None:
            lab.stop()
    if do_baseline:
        last = out["rows"][-1] if "total_s" in out["rows"][-1] else out["rows"][0]
        if budget_s is not None and time.time() - t_begin + last["total_s"] / 2 > budget_s:
            out["baseline"] = {"skipped": f"time budget ({budget_s:.0f} s) would be passed"}
        else:
            out["baseline"] = baseline(cfg, mode, run_dir / "baseline", speed)
        log(f"baseline: {json.dumps(out['baseline'], default=str)[:300]}")
    out["wall_s"] = time.time() - t_begin
    return out


def _knobs(cfg: Any) -> dict[str, Any]:
    e = cfg.prefill
    return {"chunk": e.max_num_batched_tokens, "kv_cache_dtype": e.kv_cache_dtype, "tp": e.tp,
            "pp": e.pp, "connector": cfg.connector, "num_gpus": cfg.num_gpus}


def _line(row: dict[str, Any]) -> str:
    own = " + ".join(f"{n} {v:.1f}" for n, v in row["engines_own_s"].items())
    return (f"{row['label']:<22} total {row['total_s']:6.1f} s  engines' own start {own} s "
            f"({'one after the other' if row['shared_gpu_sequential'] else 'together'})  "
            f"lab adds {row['lab_adds_s']:.2f} s")


COLS = (("total_s", "total"), ("stop_s", "stop"), ("plan_s", "plan"), ("model_dir_s", "model dir"),
        ("engines_critical_s", "engines' own"), ("engines_overhead_s", "between/poll"),
        ("proxy_s", "proxy"), ("telemetry_s", "telemetry"), ("first_request_s", "1st request"),
        ("lab_adds_s", "lab adds"))


def format_table(result: dict[str, Any]) -> str:
    what = "REAL vLLM" if result["kind"] == "vllm" else "SIMULATED"
    lines = [f"relaunch on Apply (stop -> Lab -> start -> one completion), seconds: {what} on "
             f"{result['num_gpus']}x {result['gpu_type']}",
             f"{result['describe']}",
             f"{'':<22}" + "".join(f"{h:>13}" for _, h in COLS) + "   each engine's own start "
             "(process -> /health | log first line -> ready)"]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"{row['label']:<22} skipped: {row['skipped']}")
            continue
        cells = "".join(f"{row[k]:>13.2f}" if k in row else f"{'-':>13}" for k, _ in COLS)
        own = ", ".join(
            f"{n} {w.get('own_start_s', float('nan')):.1f}|"
            f"{w.get('log_start_to_ready_s', float('nan')):.0f}"
            for n, w in row["engines"].items())
        lines.append(f"{row['label']:<22}{cells}   {own}")
    b = result.get("baseline")
    if b:
        if "skipped" in b:
            lines.append(f"bare engine start: skipped ({b['skipped']})")
        else:
            lines.append(f"bare engine start ({b['engine']} alone, /health every {b['poll_s']} s): "
                         f"{b['own_start_s']:.2f} s (log first line -> ready "
                         f"{b.get('log_start_to_ready_s', float('nan')):.0f} s), stop "
                         f"{b['stop_s']:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.bench.relaunch",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="auto", choices=("auto", "sim", "vllm"))
    p.add_argument("--model", default="lab-1b")
    p.add_argument("--num-gpus", type=int, default=None)
    p.add_argument("--connector", default="auto")
    p.add_argument("--toggles", default=",".join(TOGGLES),
                   help=f"comma-separated, applied in order, each on the last: {','.join(TOGGLES)}")
    p.add_argument("--chunk-to", type=int, default=1024)
    p.add_argument("--baseline", action="store_true",
                   help="also start one engine of the last config alone (vLLM's own start)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip a toggle (or the baseline) that would end past this many seconds")
    p.add_argument("--speed", type=float, default=0.0, help="simulated engines only")
    p.add_argument("--run-dir", type=Path)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    toggles = tuple(t for t in a.toggles.split(",") if t)
    for t in toggles:
        if t not in TOGGLES:
            p.error(f"unknown toggle {t!r}; one of {', '.join(TOGGLES)}")
    result = run(a.mode, a.model, a.num_gpus, a.connector, toggles, a.chunk_to, a.baseline,
                 a.run_dir, a.speed, a.budget_s)
    print(format_table(result), flush=True)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
