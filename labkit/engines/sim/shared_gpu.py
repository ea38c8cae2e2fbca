"""Engines that share a GPU take turns on it: their GPU work is serialized, their launches are not.

Two vLLM engines on one GPU (the PD pair with num_gpus=1) are two processes with two CUDA
contexts. Without MPS the GPU runs one context's kernels at a time, so when both engines
have GPU work at the same moment, one waits for the other. Each engine's CPU side (the
engine-core thread scheduling and launching kernels, ExampleConnector's file I/O) runs on
its own cores and is not slowed down.

The model, per engine step (CostModel.step_parts): the launch part runs first, on the
engine's own CPU; then the GPU part needs `gpu_s` seconds of the GPU. `SharedGPU.reserve`
places it at the first moment, not before the launch ends, when every GPU of the engine is
free of the OTHER engines' GPU work already placed there, and returns when it ends: the
step is stretched by the wait. Work is placed in the order the steps start (the cluster's
event order); an engine's own steps never overlap each other. Engines on GPUs no other
engine uses are not attached, so a cluster with one engine per GPU times exactly as before.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class SharedGPU:
    """The GPU work placed on each shared GPU, as (start, end, owner) intervals."""

    def __init__(self) -> None:
        self._busy: dict[int, list[tuple[float, float, int]]] = {}  # gpu -> intervals by start
        self._gpus: dict[int, tuple[int, ...]] = {}  # id(engine) -> its shared GPUs
        self.waited_s: dict[int, float] = {}  # id(engine) -> total seconds its GPU work waited

    def attach(self, engines: Sequence[Any], gpus_of: Sequence[Sequence[int]]) -> int:
        """Make the engines that share a GPU with another engine reserve their GPU work here.

        Returns the number of engines attached (0: every engine has its GPUs to itself).
        """
        if len(engines) != len(gpus_of):
            raise ValueError(f"{len(engines)} engines but {len(gpus_of)} GPU lists")
        users: dict[int, int] = {}
        for gpus in gpus_of:
            for g in set(gpus):
                users[g] = users.get(g, 0) + 1
        n = 0
        for engine, gpus in zip(engines, gpus_of, strict=True):
            shared = tuple(sorted(g for g in set(gpus) if users[g] > 1))
            if not shared:
                continue
            self._gpus[id(engine)] = shared
            self.waited_s[id(engine)] = 0.0
            for g in shared:
                self._busy.setdefault(g, [])
            engine.gpu_share = self.reserve
            n += 1
        return n

    def reserve(self, engine: Any, start: float, launch_s: float, gpu_s: float) -> float:
        """Place the GPU part of `engine`'s step starting at `start`; return when it ends.

        The GPU part (`gpu_s`) begins once the launch (`launch_s`) is over and the GPUs are
        free of the other engines' work.
        """
        owner = id(engine)
        gpus = self._gpus[owner]
        earliest = t = start + launch_s
        moved = True
        while moved:  # first fit: skip past every other engine's interval that overlaps
            moved = False
            for g in gpus:
                for s, e, who in self._busy[g]:
                    if who != owner and s < t + gpu_s and t < e:
                        t, moved = e, True
        end = t + gpu_s
        self.waited_s[owner] += t - earliest
        for g in gpus:
            busy = self._busy[g]
            # Steps start in time order and place work after their start, so work that ended
            # before this step started can no longer overlap anything.
            if busy and busy[0][1] <= start:
                busy[:] = [iv for iv in busy if iv[1] > start]
            busy.append((t, end, owner))
            busy.sort()
        return end
