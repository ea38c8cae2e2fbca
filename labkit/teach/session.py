"""A running lab and its live dashboard in one widget (what notebook 08 and Voila show).

Apply in the dashboard's controls restarts the lab with the validated config, rebuilds the
dashboard on the new lab's telemetry and sends the workload the controls describe. The
previous run's dashboard is kept, frozen, under "Previous runs" (with what its traffic
measured), so a learner compares before and after. Traffic runs on a background thread, so
the dashboard keeps refreshing while requests flow.
"""

from __future__ import annotations

import asyncio
import math
import threading
from concurrent.futures import Future
from typing import Any


def workload_from(settings: Any, num_requests: int = 24, seed: int = 0) -> Any:
    """A labkit.bench workload from the controls' WorkloadSettings."""
    from labkit.bench import workloads

    rate = settings.rate if settings.rate > 0 else math.inf
    if settings.shared_prefix > 0:
        prefix = max(16, int(settings.prompt_len * settings.shared_prefix))
        suffix = max(1, settings.prompt_len - prefix)
        return workloads.shared_prefix(
            num_requests,
            rate=rate,
            seed=seed,
            prefix_len=prefix,
            share=1.0,
            suffix=(suffix, suffix),
            output=(settings.output_len, settings.output_len),
        )
    return workloads.fixed(
        num_requests, settings.prompt_len, settings.output_len, rate=rate, seed=seed
    )


def take_over_dashboard_labs() -> int:
    """Stop the labs earlier dashboard pages started (`labkit status` lists them, owner
    "dashboard"): one lab per dashboard and GPU set. A reloaded Voila page gets a new kernel;
    the old kernel's lab would otherwise hold the (simulated or real) GPUs beside the new one.
    The old kernel is ended too (its page is gone), which ends whatever it still held.
    Returns how many were stopped."""
    import os
    import signal

    from labkit import service

    n = 0
    for st in service.running_labs():
        if st.get("owner") != "dashboard" or int(st.get("pid", -1)) == os.getpid():
            continue
        for e in st["engines"].values():
            if e.get("pgid"):
                try:
                    os.killpg(int(e["pgid"]), signal.SIGTERM)
                except OSError:
                    pass
        try:
            os.kill(int(st["pid"]), signal.SIGTERM)
        except (OSError, KeyError, ValueError):
            pass
        n += 1
    return n


def dashboard_lab(**knobs: Any) -> Any:
    """The dashboard's lab: earlier dashboard labs taken over, then a Lab(**knobs) started,
    marked as the dashboard's (owner "dashboard")."""
    from labkit.lab import Lab

    stopped = take_over_dashboard_labs()
    lab = Lab(owner="dashboard", **knobs)
    lab.taken_over = stopped
    return lab.start(progress=False)


class DashboardSession:
    """`lab` + `labkit.viz.Dashboard` on its telemetry, displayed in one box whose content is
    swapped for a new dashboard when Apply restarts the lab.

    Args:
        lab: a started labkit.Lab.
        interval: dashboard refresh period (seconds).
    """

    def __init__(self, lab: Any, interval: float = 0.25) -> None:
        import ipywidgets as w

        from labkit.viz.controls import WorkloadSettings

        self.lab = lab
        self.interval = interval
        self.workload = WorkloadSettings()  # the controls' workload, kept across Apply
        self.sent: list[Any] = []  # WorkloadSettings of each run, oldest first
        self.box = w.VBox()
        self.dashboard: Any = None
        self.loads: list[Future] = []
        self.previous: list[tuple[str, Any]] = []  # (title, frozen dashboard widget), newest first
        from labkit.teach.page import PageWatch

        self.watch = PageWatch(on_gone=self.stop)  # `labkit dashboard`: a closed page stops it
        self._show()
        self.watch.start()

    def _hardware(self) -> Any:
        if self.lab.kind != "sim":
            return None
        from labkit import hardware

        return hardware.simulated(self.lab.plan.num_gpus, self.lab.plan.gpu_type.key)

    def _show(self) -> None:
        from labkit.viz import Dashboard

        if self.dashboard is not None:
            self.dashboard.stop()
        self.dashboard = Dashboard(
            self.lab.telemetry(),
            on_apply=self.apply,
            config=self.lab.config,
            hardware=self._hardware(),
            interval=self.interval,
            controls={"kv_cache_memory": getattr(self.lab, "kv_cache_memory", None),
                      "workload": self.workload, "threaded": True},
        )
        # The heartbeat first: the box keeps its view (and its timer) when the rest changes.
        self.box.children = (self.watch.beat, self.dashboard.widget, *self._history())
        self.dashboard.start()

    def _history(self) -> tuple[Any, ...]:
        """The frozen dashboards of earlier runs, newest first, in an accordion."""
        if not self.previous:
            return ()
        import ipywidgets as w

        acc = w.Accordion(children=[widget for _, widget in self.previous])
        for i, (title, _) in enumerate(self.previous):
            acc.set_title(i, title)
        acc.selected_index = None
        differ = len({(s.rate, s.prompt_len, s.output_len, s.shared_prefix)
                      for s in self.sent}) > 1
        note = (" <b style='color:#c92a2a'>The runs had different workloads: compare their "
                "times with care.</b>" if differ else "")
        return (w.HTML(f"<b>Previous runs</b> (frozen at Apply; open one to compare).{note}"),
                acc)

    def _freeze(self) -> None:
        """Keep the current dashboard (stopped) with a title saying what ran and measured."""
        if self.dashboard is None:
            return
        self.dashboard.stop()
        c = self.lab.config.prefill
        what = (f"{self.lab.describe().split(' PD pair')[0]} · max_num_batched_tokens "
                f"{c.max_num_batched_tokens or 'auto'} · TP {c.tp} · PP {c.pp} · "
                f"{c.kv_cache_dtype} KV · block {c.block_size}")
        if self.sent:
            s = self.sent[-1]
            what += (f" · workload {s.prompt_len}+{s.output_len} tokens at {s.rate:g}/s"
                     + (f", {s.shared_prefix:.0%} shared" if s.shared_prefix else ""))
        if self.loads and self.loads[-1].done() and not self.loads[-1].exception():
            row = load_summary(self.loads[-1].result(), kind=self.lab.kind).rows[0]
            what += (f" · TTFT p50 {row['ttft_p50_ms']:.0f} ms · ITL p99 "
                     f"{row['itl_p99_ms']:.1f} ms ({row['finished']} requests)")
        self.previous.insert(0, (what, self.dashboard.widget))

    def send(self, workload: Any, max_duration_s: float | None = 150.0) -> Future:
        """Send `workload` (a labkit.bench Workload) through the lab on a daemon thread (the
        kernel can exit while it runs); the Future's result is the loadgen's LoadResult."""
        from labkit.bench.loadgen import load

        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        coro = load(
            self.lab.url,
            workload,
            model=self.lab.plan.model.name,
            max_duration_s=max_duration_s,
            request_timeout_s=60.0,
            vocab_size=min(self.lab.plan.model.vocab_size, 30000),
        )

        def run() -> None:
            try:
                fut.set_result(asyncio.run(coro))
            except BaseException as e:  # the Future carries it to whoever asks
                fut.set_exception(e)

        threading.Thread(target=run, name="labkit-traffic", daemon=True).start()
        self.loads.append(fut)
        return fut

    def summary(self) -> Any:
        """What the client measured of the last traffic (a Result), or where it stands."""
        if not self.loads:
            return "no traffic sent yet"
        fut = self.loads[-1]
        if not fut.done():
            return "traffic still running: watch the dashboard, then run this cell again"
        return load_summary(fut.result(), kind=self.lab.kind)

    def apply(self, settings: Any) -> None:
        """Dashboard Apply: restart the lab with `settings.config`, then send its workload."""
        from labkit.lab import Lab

        progress = self.dashboard.progress if self.dashboard is not None else None
        self._freeze()
        self.lab.stop()  # running traffic fails fast once the engines are gone
        new = Lab(settings.config, mode=self.lab.mode, speed=getattr(self.lab, "speed", 1.0),
                  owner=getattr(self.lab, "owner", "python"))
        new.kv_cache_memory = getattr(self.lab, "kv_cache_memory", None)
        new.start(progress=(lambda s, f: progress.update(s, f)) if progress else False)
        self.lab = new
        self.workload = settings.workload
        self._show()
        self.send_settings(settings.workload)

    def send_settings(self, settings: Any, num_requests: int = 24) -> Future:
        """Send the workload the controls describe (and remember it for "Previous runs")."""
        self.sent.append(settings)
        return self.send(workload_from(settings, num_requests=num_requests))

    def stop(self) -> None:
        """Stop refreshing and stop the lab (traffic still running then fails fast)."""
        self.watch.stop()
        if self.dashboard is not None:
            self.dashboard.stop()
        self.lab.stop()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.box._repr_mimebundle_(**kwargs)


def load_summary(result: Any, kind: str = "sim") -> Any:
    """Client-side figures of a LoadResult: requests finished, TTFT and ITL p50/p99 (ms)."""
    import numpy as np

    from labkit.teach.result import Result

    ok = [r for r in result.records if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itls]

    def ms(v: list[float], q: float) -> float:
        return float(np.percentile(v, q) * 1e3) if v else float("nan")

    rows = [
        {
            "requests": len(result.records),
            "finished": len(ok),
            "ttft_p50_ms": ms(ttft, 50),
            "ttft_p99_ms": ms(ttft, 99),
            "itl_p50_ms": ms(itl, 50),
            "itl_p99_ms": ms(itl, 99),
            "duration_s": result.duration_s,
        }
    ]
    return Result(
        f"traffic '{result.workload}' as the client saw it",
        kind,
        rows,
        note="times measured by the client (streamed tokens), wall clock",
    )
