"""ConfigError: the one error the planner raises, in a leaf module every part may import."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration vLLM would refuse (or get wrong): what is wrong and what to do."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem} — {fix}")
