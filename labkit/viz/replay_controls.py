"""A replay's time controls: play / pause, a seek slider, the speed, and the config the run
was recorded with (from the recording's header). The replay's own clock
(labkit/telemetry/replay.py: pause, resume, seek, speed) is the state; the widgets drive it
and `sync()` (called on every dashboard refresh) shows where it stands.

A replay that reaches its end pauses there: the views keep what it drew, and play starts
it again from the beginning.
"""
from __future__ import annotations

import html
from typing import Any

import ipywidgets as w

SPEEDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Recorded engine knobs shown, vLLM's names (labkit.plan.EngineConfig fields).
KNOBS = ("max_num_batched_tokens", "tp", "pp", "kv_cache_dtype", "block_size")


def recorded_config_html(header: dict[str, Any]) -> str:
    """The recorded lab in words and a table of its engines' knobs (header["lab"]), or the
    engines the source described when the recording has no lab section."""
    lab = header.get("lab") or {}
    cfg = lab.get("config") or {}
    blocks = {e.get("name"): e.get("num_blocks") for e in header.get("source", {}).get("engines", [])}
    engines = {r: cfg[r] for r in ("prefill", "decode") if isinstance(cfg.get(r), dict)}
    if not engines and cfg.get("model"):
        engines = {"engine": cfg}
    out = ["<b>Recorded with</b>"]
    if lab.get("describe"):
        out.append(f"<div><small>{html.escape(str(lab['describe']))}</small></div>")
    if engines:
        head = "".join(f"<th>{html.escape(k)}</th>" for k in ("engine", *KNOBS, "num_blocks"))
        rows = []
        for name, e in engines.items():
            vals = [e.get(k) for k in KNOBS] + [blocks.get(name)]
            cells = "".join(f"<td>{html.escape('auto' if v is None else str(v))}</td>" for v in vals)
            rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
        out.append(f'<table class="labkit-recorded" style="font-size:11px"><tr>{head}</tr>'
                   f'{"".join(rows)}</table>')
    elif blocks:
        out.append("<div><small>" + html.escape(", ".join(
            f"{n}: {b} blocks" for n, b in blocks.items())) + "</small></div>")
    return "".join(out)


class ReplayControls:
    """Play / pause, seek and speed for a `labkit.telemetry.replay.Replay`.

    Args:
        replay: the Replay the dashboard polls. Its speed None (one frame per poll) becomes 1.
        autoplay: start playing at once; False: wait for `play()` (the dashboard page calls
            it when the page is first seen, so a short recording does not end unseen).
    """

    def __init__(self, replay: Any, autoplay: bool = True) -> None:
        self.replay = replay
        if replay.speed is None:
            replay.speed = 1.0
        if not autoplay:
            replay.pause()
        elif replay.paused:
            replay.resume()
        self.ended = False
        self._syncing = False
        duration = max(float(replay.duration), 0.1)
        self.play_button = w.Button(layout=w.Layout(width="110px"))
        self.play_button.on_click(lambda _b: self.toggle())
        self.position = w.FloatSlider(value=0.0, min=0.0, max=duration, step=0.1,
                                      description="time (s)", continuous_update=False,
                                      readout_format=".1f", layout=w.Layout(width="98%"))
        self.position.observe(self._on_slider, "value")
        speed = replay.speed if replay.speed in SPEEDS else 1.0
        self.speed = w.Dropdown(options=[(f"{s:g}×", s) for s in SPEEDS], value=speed,
                                description="speed", layout=w.Layout(width="160px"))
        self.speed.observe(lambda c: self.set_speed(c["new"]), "value")
        self.clock = w.HTML()
        self.config = w.HTML(recorded_config_html(replay.header))
        self.widget = w.VBox([
            w.HTML("<b>Replay</b>"), w.HBox([self.play_button, self.speed, self.clock]),
            self.position, self.config,
        ])  # fmt: skip
        self.sync()

    # -- what the widgets do ---------------------------------------------------------------------
    @property
    def playing(self) -> bool:
        return not self.replay.paused

    def play(self) -> None:
        """Resume; from the start when the replay had ended."""
        if self.ended or self.replay.position >= self.replay.duration:
            self.replay.seek(0.0)
            self.ended = False
        self.replay.resume()
        self.sync()

    def pause(self) -> None:
        self.replay.pause()
        self.sync()

    def toggle(self) -> None:
        self.pause() if self.playing else self.play()

    def seek(self, t: float) -> None:
        """Move the replay to `t` s; backwards rebuilds the views from the start (the
        replay's next delta says reset)."""
        self.replay.seek(t)
        self.ended = False
        self.sync()

    def set_speed(self, speed: float) -> None:
        self.replay.speed = float(speed)
        self.sync()

    def _on_slider(self, change: dict[str, Any]) -> None:
        if not self._syncing and abs(change["new"] - self.replay.position) > 0.05:
            self.seek(change["new"])

    # -- what the widgets show -------------------------------------------------------------------
    def sync(self) -> None:
        """Show the replay's position and state; pause it at its end (the views keep it)."""
        rp = self.replay
        if rp.done and not rp.paused and rp.position >= rp.duration:
            rp.pause()
            self.ended = True
        self._syncing = True
        try:
            self.position.value = round(rp.position, 1)
        finally:
            self._syncing = False
        if self.ended:
            state, self.play_button.description, self.play_button.icon = "ended", "replay", "repeat"
        elif rp.paused:
            state, self.play_button.description, self.play_button.icon = "paused", "play", "play"
        else:
            state, self.play_button.description, self.play_button.icon = "playing", "pause", "pause"
        self.clock.value = (f'<span class="labkit-replay-clock">{rp.position:.1f} / '
                            f"{rp.duration:.1f} s · {state}</span>")
