"""How much a dashboard refresh costs: the dashboard against a synthetic in-memory source
(a PD pair with a 100k-block cache each, random churn, a full PoolSnapshot every poll).

    python -m labkit.bench.viz_refresh --refreshes 40 --num-blocks 100000

Prints refreshes/s (wall) and CPU ms per refresh (time.process_time) per stage and view.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from labkit.telemetry.observer_schema import (
    KVTransfer,
    LayerTiming,
    ObserverBatch,
    PoolSnapshot,
    RequestAllocated,
    RequestFinished,
    StepScheduled,
)
from labkit.viz.source import EngineMemory, GpuSample, MetricsSample, TelemetryDelta

GiB = 2**30
FIXTURE_METRICS = Path("/work/shared/fixtures/vllm-0.26/metrics/nixl-decode.txt")


class _Pool:
    """A toy block pool with vLLM's states: enough churn to exercise the views."""

    def __init__(self, num_blocks: int, rng: np.random.Generator) -> None:
        self.num_blocks = num_blocks
        self.state = np.zeros(num_blocks, np.uint8)
        self.rng = rng
        self.tables: dict[str, list[int]] = {}
        self.tokens: dict[str, int] = {}

    def take(self, n: int) -> list[int]:
        idle = np.flatnonzero(self.state[1:] <= 1)[:n] + 1  # block 0: the null block
        self.state[idle] = 2
        return idle.tolist()

    def free(self, req: str) -> list[int]:
        blocks = self.tables.pop(req, [])
        self.tokens.pop(req, None)
        arr = np.asarray(blocks, np.int64)
        if arr.size:
            self.state[arr] = np.where(self.rng.random(arr.size) < 0.7, 1, 0)
        return blocks


class SyntheticSource:
    """A `TelemetrySource` that makes up a busy PD pair: prefill and decode engines on one GPU.

    Args:
        num_blocks: blocks per engine.
        steps_per_poll: scheduler steps generated per poll (per engine).
        kind: the label it reports ("sim" by default: it is made up).
    """

    def __init__(self, num_blocks: int = 100_000, steps_per_poll: int = 8, block_size: int = 16,
                 token_budget: int = 2048, seed: int = 0, kind: str = "sim") -> None:  # fmt: skip
        self.rng = np.random.default_rng(seed)
        self.num_blocks, self.block_size, self.budget = num_blocks, block_size, token_budget
        self.steps_per_poll, self.kind = steps_per_poll, kind
        self.pools = {"prefill-0": _Pool(num_blocks, self.rng), "decode-0": _Pool(num_blocks, self.rng)}
        self.step = 0
        self.next_req = 0
        self.clock = 1_000.0
        self.metrics = None
        if FIXTURE_METRICS.is_file():
            from labkit.telemetry.metrics import MetricsSnapshot

            self.metrics = MetricsSnapshot.parse(FIXTURE_METRICS.read_text())
        self._sent_memory = False

    def describe(self) -> dict[str, Any]:
        engines = [
            {"name": n, "role": n.split("-")[0], "kind": self.kind, "gpus": [0],
             "num_blocks": self.num_blocks, "block_size": self.block_size}
            for n in self.pools
        ]  # fmt: skip
        gpus = [{"index": 0, "name": "Synthetic GPU", "total_bytes": 80 * GiB}]
        return {"kind": self.kind, "engines": engines, "gpus": gpus, "link": None}

    def _engine_steps(self, name: str, timeline: list[dict[str, Any]]) -> ObserverBatch:
        pool, rng, bs = self.pools[name], self.rng, self.block_size
        events: list[Any] = []
        for _ in range(self.steps_per_poll):
            self.step += 1
            self.clock += 0.01
            sched: dict[str, int] = {}
            new_blocks: dict[str, list[int]] = {}
            computed: dict[str, int] = {}
            finished: list[str] = []
            free_frac = np.count_nonzero(pool.state <= 1) / pool.num_blocks
            if free_frac > 0.2:  # admit a new request with a fresh prompt
                req = f"req-{self.next_req}"
                self.next_req += 1
                prompt = int(rng.integers(64, 4000))
                blocks = pool.take(-(-prompt // bs))
                pool.tables[req], pool.tokens[req] = blocks, prompt
                events.append(RequestAllocated(self.clock, req, blocks, 0))
                sched[req], new_blocks[req], computed[req] = min(prompt, self.budget), blocks, 0
                if name == "prefill-0":
                    timeline += [{"req_id": req, "ts": self.clock, "event": e}
                                 for e in ("arrival", "prefill_start")]  # fmt: skip
            for req in list(pool.tables)[-64:]:  # decodes of the newest requests
                if req in sched:
                    continue
                pool.tokens[req] += 1
                sched[req], computed[req] = 1, pool.tokens[req] - 1
                if pool.tokens[req] % bs == 1:
                    new_blocks[req] = pool.take(1)
                    pool.tables[req] += new_blocks[req]
                timeline.append({"req_id": req, "ts": self.clock, "event": "token"})
                if rng.random() < 0.03:
                    finished.append(req)
            for req in finished:
                events.append(RequestFinished(self.clock, req, pool.free(req), False))
                timeline.append({"req_id": req, "ts": self.clock, "event": "finish"})
            events.append(StepScheduled(self.step, self.clock, self.budget, sched, new_blocks,
                                        computed, [], finished))  # fmt: skip
        events.append(self._transfer_events(name))
        events.extend(self._layer_events(name))
        num_free = int(np.count_nonzero(pool.state <= 1))
        events.append(PoolSnapshot(self.clock, pool.num_blocks, num_free, pool.state.tobytes()))
        role = name.split("-")[0]
        return ObserverBatch(name, role, self.kind, self.clock, events)

    def _transfer_events(self, name: str) -> KVTransfer:
        n_tok = int(self.rng.integers(256, 4096))
        t = self.clock - 0.02
        return KVTransfer(self.clock, f"req-{self.next_req - 1}",
                          "send" if name == "prefill-0" else "recv", n_tok, n_tok * 65536,
                          t, t + n_tok * 65536 / 20e9, "ExampleConnector")  # fmt: skip

    def _layer_events(self, name: str) -> list[LayerTiming]:
        op = "save" if name == "prefill-0" else "load"
        t = self.clock - 0.02
        return [LayerTiming(self.clock, op, f"model.layers.{i}.self_attn.attn", t + i * 1e-3,
                            t + (i + 0.8) * 1e-3, 4 << 20, [f"req-{self.next_req - 1}"])
                for i in range(16)]  # fmt: skip

    def poll(self) -> TelemetryDelta:
        timeline: list[dict[str, Any]] = []
        batches = [self._engine_steps(n, timeline) for n in self.pools]
        req = f"req-{self.next_req - 1}"
        timeline += [{"req_id": req, "ts": self.clock + d, "event": e} for d, e in
                     ((0.001, "prefill_end"), (0.001, "kv_transfer_start"),
                      (0.004, "kv_transfer_end"), (0.005, "first_token"))]  # fmt: skip
        used = {n: int(10 * GiB + np.count_nonzero(p.state >= 2) * 65536) for n, p in self.pools.items()}
        samples = [GpuSample(self.clock, 0, sum(used.values()) + GiB, 80 * GiB, used, "Synthetic GPU", self.kind)]
        memory = [] if self._sent_memory else [
            EngineMemory(n, 0, 2 * GiB, 7 * GiB, n.split("-")[0], self.kind) for n in self.pools
        ]  # fmt: skip
        self._sent_memory = True
        metrics = [MetricsSample("decode-0", self.clock, self.metrics, "decode", self.kind)] if self.metrics else []
        return TelemetryDelta(batches, timeline, metrics, samples, memory)


def run(refreshes: int = 40, num_blocks: int = 100_000, steps_per_poll: int = 8,
        screenshots: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Build the dashboard on a SyntheticSource and time `refreshes` refreshes
    (then write each view as `<screenshots>/<view>.png` if asked)."""
    from labkit.viz.dashboard import Dashboard

    source = SyntheticSource(num_blocks=num_blocks, steps_per_poll=steps_per_poll)
    dash = Dashboard(source)
    dash.refresh()  # first draw builds every trace: not what a live refresh costs
    totals: dict[str, float] = {}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(refreshes):
        for k, v in dash.refresh().items():
            totals[k] = totals.get(k, 0.0) + v
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if screenshots:
        from labkit.viz.export import save_png

        for name, view in dash.views.items():
            save_png(view.figure, Path(screenshots) / f"{name}.png")
    return {"refreshes": refreshes, "num_blocks": num_blocks, "wall_s": wall, "cpu_s": cpu,
            "per_stage_ms": {k: 1e3 * v / refreshes for k, v in totals.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refreshes", type=int, default=40)
    p.add_argument("--num-blocks", type=int, default=100_000)
    p.add_argument("--steps-per-poll", type=int, default=8)
    p.add_argument("--screenshots", metavar="DIR", help="also write each view as DIR/<view>.png")
    a = p.parse_args(argv)
    r = run(a.refreshes, a.num_blocks, a.steps_per_poll, a.screenshots)
    print(f"dashboard refresh, {r['num_blocks']:,} blocks x 2 engines, {r['refreshes']} refreshes")
    print(f"{'stage / view':<14}{'CPU ms/refresh':>16}")
    for k, v in r["per_stage_ms"].items():
        print(f"{k:<14}{v:>16.2f}")
    print(f"{'total':<14}{1e3 * r['cpu_s'] / r['refreshes']:>16.2f}")
    print(f"refreshes/s (wall): {r['refreshes'] / r['wall_s']:.1f}")


if __name__ == "__main__":
    main()
