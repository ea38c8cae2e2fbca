"""Simulated time: as fast as possible (benchmarks, tests) or paced to the wall clock (live views).

Every simulated engine reads time from a `SimClock`. In "fast" mode time only moves when
someone calls `advance_to`; in "paced" mode simulated time follows the wall clock times a
speed factor, and `advance_to(t)` sleeps until the wall clock has caught up with `t`, so a
step that the cost model says takes 12 ms takes 12 ms / speed of real time.
"""
from __future__ import annotations

import time


class SimClock:
    """A clock shared by simulated engines.

    Args:
        paced: follow the wall clock (True) or jump (False).
        speed: simulated seconds per wall second when paced (2.0: twice as fast as real).
        start: simulated time at creation.
    """

    def __init__(self, paced: bool = False, speed: float = 1.0, start: float = 0.0) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.paced = paced
        self.speed = speed
        self._now = start
        self._wall0 = time.monotonic()
        self._sim0 = start

    def now(self) -> float:
        """Current simulated time in seconds."""
        if self.paced:
            wall_now = self._sim0 + (time.monotonic() - self._wall0) * self.speed
            if wall_now > self._now:
                self._now = wall_now
        return self._now

    def advance_to(self, t: float) -> None:
        """Move simulated time to `t` (never backwards); paced: sleep until the wall catches up."""
        if self.paced:
            wall_target = self._wall0 + (t - self._sim0) / self.speed
            delay = wall_target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if t > self._now:
            self._now = t

    def advance(self, dt: float) -> None:
        """Advance by `dt` seconds of simulated time."""
        self.advance_to(self.now() + dt)

    def set_speed(self, speed: float) -> None:
        """Change the pace without jumping: re-anchor at the current time."""
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        now = self.now()
        self._sim0, self._wall0, self.speed = now, time.monotonic(), speed

    def __repr__(self) -> str:
        mode = f"paced x{self.speed:g}" if self.paced else "fast"
        return f"SimClock({mode}, now={self._now:.6f})"
