"""Measured peak of each path KV can take on this machine, to read connector GB/s against.

    python -m labkit.bench.link_peak [--mib 1024] [--repeats 5] [--json PATH]

Copies one large buffer with torch (the fastest a connector could move KV on that path):
- same GPU: device-to-device on GPU 0 (HBM read + write);
- GPU 0 -> GPU 1: peer copy (NVLink where the GPUs have it, else PCIe), when 2+ GPUs;
- GPU -> host and host -> GPU with pinned host memory (the path a host-staged transfer uses).
Each figure is the median of `repeats` timed copies (CUDA events) after one warm-up.
Needs a CUDA GPU; prints a table and exits 2 without one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any


def _time_copy(dst: Any, src: Any, repeats: int, torch: Any) -> float:
    """Median seconds of dst.copy_(src) over `repeats` timed copies (after a warm-up)."""
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure(mib: int = 1024, repeats: int = 5) -> list[dict[str, Any]]:
    """One row per path: name, bytes, seconds, GB/s (1e9 bytes per second)."""
    import torch

    n = mib << 20
    rows = []

    def row(path: str, dst: Any, src: Any) -> None:
        s = _time_copy(dst, src, repeats, torch)
        rows.append({"path": path, "bytes": n, "seconds": s, "gb_per_s": n / s / 1e9})

    g0 = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    row("same GPU (GPU 0 -> GPU 0)", torch.empty_like(g0), g0)
    if torch.cuda.device_count() >= 2:
        g1 = torch.empty(n, dtype=torch.uint8, device="cuda:1")
        peer = torch.cuda.can_device_access_peer(0, 1)
        row(f"GPU 0 -> GPU 1 ({'peer' if peer else 'no peer access: staged'})", g1, g0)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    row("GPU 0 -> host (pinned)", host, g0)
    row("host (pinned) -> GPU 0", g0, host)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.bench.link_peak", description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=1024, help="buffer size in MiB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, metavar="PATH")
    a = p.parse_args(argv)
    try:
        import torch

        ok = torch.cuda.is_available()
    except ImportError:
        ok = False
    if not ok:
        print("error: no CUDA GPU here; this measures real links only", file=sys.stderr)
        return 2
    rows = measure(a.mib, a.repeats)
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"REAL: {len(names)}x {names[0]}, {a.mib} MiB per copy, median of {a.repeats}")
    print(f"{'path':40}  {'ms':>8}  {'GB/s':>8}")
    for r in rows:
        print(f"{r['path']:40}  {r['seconds'] * 1e3:8.2f}  {r['gb_per_s']:8.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpus": names, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
