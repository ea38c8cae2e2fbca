"""How much a dashboard refresh costs: the dashboard against a synthetic in-memory source
(labkit.viz.synthetic: a made-up PD pair with a 100k-block cache each, chunked prefills,
shared prefixes, KV hand-over, decodes; a full PoolSnapshot per engine every poll).

    python -m labkit.bench.viz_refresh --refreshes 40 --num-blocks 100000

Prints refreshes/s (wall) and CPU ms per refresh (time.process_time) per stage and view.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from labkit.viz.synthetic import SyntheticSource


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
    return {"refreshes": refreshes, "num_blocks": num_blocks, "steps_per_poll": steps_per_poll,
            "wall_s": wall, "cpu_s": cpu,
            "per_stage_ms": {k: 1e3 * v / refreshes for k, v in totals.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refreshes", type=int, default=40)
    p.add_argument("--num-blocks", type=int, default=100_000)
    p.add_argument("--steps-per-poll", type=int, default=8)
    p.add_argument("--screenshots", metavar="DIR", help="also write each view as DIR/<view>.png")
    a = p.parse_args(argv)
    r = run(a.refreshes, a.num_blocks, a.steps_per_poll, a.screenshots)
    print(f"dashboard refresh, {r['num_blocks']:,} blocks x 2 engines, {r['refreshes']} refreshes, {r['steps_per_poll']} steps/poll")
    print(f"{'stage / view':<14}{'CPU ms/refresh':>16}")
    for k, v in r["per_stage_ms"].items():
        print(f"{k:<14}{v:>16.2f}")
    print(f"{'total':<14}{1e3 * r['cpu_s'] / r['refreshes']:>16.2f}")
    print(f"refreshes/s (wall): {r['refreshes'] / r['wall_s']:.1f}")


if __name__ == "__main__":
    main()
