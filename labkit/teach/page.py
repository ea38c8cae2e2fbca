"""The dashboard as a page (Voila, JupyterLab): whether a page still shows it (a heartbeat
from the page), a recording with time controls, and what labkit/data/dashboard.ipynb shows.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from typing import Any

PAGE_TIMEOUT_ENV = "LABKIT_PAGE_TIMEOUT_S"  # set by `labkit dashboard` (labkit/cli/lab.py)
REPLAY_ENV = "LABKIT_DASHBOARD_REPLAY"  # `labkit dashboard --replay NAME`


class PageWatch:
    """Whether a page shows this kernel's widgets: a heartbeat from the page.

    Its widget is an ipywidgets Play (hidden) whose timer runs in the page, in the widget
    model, so its value moves only while a page holds it; every move reaches the kernel.
    The kernel starts the timer (toggles `playing`) until the first beat comes, since a
    timer started before the page drew never runs. Nothing but the page sends beats: the
    dashboard's own 4 Hz updates, which keep Jupyter's kernel culler from ever seeing the
    kernel idle, do not count.

    Args:
        on_seen: called once, at the first beat (a replay starts playing then).
        on_gone: called once when no beat came for `timeout_s` after at least one did (or
            none came in `timeout_s` + 60 s): the page was closed. Then the beats stop being
            asked for, the caller stops what it runs, and the idle kernel is culled.
        timeout_s: None: never gone (JupyterLab, where a tab in the background is throttled);
            default: $LABKIT_PAGE_TIMEOUT_S, which `labkit dashboard` sets.
        interval_ms: the page's beat period.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, on_seen: Callable[[], Any] | None = None,
                 on_gone: Callable[[], Any] | None = None, timeout_s: float | None = -1.0,
                 interval_ms: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        import ipywidgets as w

        if timeout_s is not None and timeout_s < 0:
            env = os.environ.get(PAGE_TIMEOUT_ENV)
            timeout_s = float(env) if env else None
        self.on_seen, self.on_gone, self.timeout_s = on_seen, on_gone, timeout_s
        self.clock = clock
        self.beat = w.Play(value=0, min=0, max=1 << 30, step=1, interval=interval_ms,
                           repeat=True, show_repeat=False, layout=w.Layout(display="none"))
        self.beat.observe(self._on_beat, "value")
        self.started = clock()
        self.last_beat: float | None = None
        self.num_beats = 0
        self.gone = False
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _on_beat(self, _change: dict[str, Any]) -> None:
        self.last_beat = self.clock()
        self.num_beats += 1
        if self.num_beats == 1 and self.on_seen is not None:
            self.on_seen()

    def check(self) -> bool:
        """Ask for beats if none came lately; call on_gone once the page is gone. Returns
        whether the page is gone."""
        if self.gone:
            return True
        now = self.clock()
        quiet = now - (self.last_beat if self.last_beat is not None else self.started)
        if self.timeout_s is not None and (
            (self.last_beat is not None and quiet > self.timeout_s)
            or (self.last_beat is None and quiet > self.timeout_s + 60)
        ):
            self.gone = True
            self.beat.playing = False
            if self.on_gone is not None:
                self.on_gone()
            return True
        if quiet > 3 * self.beat.interval / 1e3:  # (re)start the page's timer
            self.beat.playing = False
            self.beat.playing = True
        return False

    def start(self, period_s: float = 1.0) -> None:
        """check() every `period_s` on the running asyncio loop (a kernel) or a thread."""
        async def run_async() -> None:
            while not self._stop.is_set() and not self.check():
                await asyncio.sleep(period_s)

        def run_thread() -> None:
            while not self._stop.is_set() and not self.check():
                self._stop.wait(period_s)

        try:
            self._task = asyncio.get_running_loop().create_task(run_async())
        except RuntimeError:
            self._thread = threading.Thread(target=run_thread, name="labkit-page-watch",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._task is not None and self._task is not _current_task():
            self._task.cancel()


def _current_task() -> asyncio.Task | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


class ReplayPage:
    """A shipped (or any) recording in the dashboard, with its time controls; it starts
    playing when a page first shows it, so a short recording is not over before it is seen.

    Args:
        name: a shipped recording's name or a path (labkit.telemetry.replay.resolve).
        interval: dashboard refresh period (seconds).
    """

    def __init__(self, name: str, interval: float = 0.25) -> None:
        import ipywidgets as w

        from labkit.telemetry.replay import replay
        from labkit.viz import Dashboard

        self.replay = replay(name, speed=1.0, paused=True)
        self.dashboard = Dashboard(self.replay, interval=interval, autoplay=False)
        controls = self.dashboard.replay_controls
        self.watch = PageWatch(on_seen=controls.play if controls else None,
                               on_gone=self.stop)
        self.box = w.VBox([self.watch.beat, self.dashboard.widget])
        self.dashboard.start()
        self.watch.start()

    def stop(self) -> None:
        self.watch.stop()
        self.dashboard.stop()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.box._repr_mimebundle_(**kwargs)


def dashboard_page(**knobs: Any) -> Any:
    """What the dashboard page (labkit/data/dashboard.ipynb) shows: the recording named in
    $LABKIT_DASHBOARD_REPLAY (`labkit dashboard --replay NAME`), else the dashboard's lab
    (earlier dashboard labs taken over) started with `knobs`, its default workload sent."""
    name = os.environ.get(REPLAY_ENV)
    if name:
        return ReplayPage(name)
    from labkit.teach.session import DashboardSession, dashboard_lab

    live = DashboardSession(dashboard_lab(**knobs))
    live.send_settings(live.workload)
    return live
