"""Count observer events per engine and type in recordings (what a GPU batch prints):
    python3 tests/gpu/count_events.py REC.lkrec [...]"""
from __future__ import annotations

import collections
import sys

from labkit.telemetry.recording import read_recording


def main(paths: list[str]) -> int:
    for path in paths:
        rec = read_recording(path)
        n: collections.Counter[tuple[str, str]] = collections.Counter()
        dropped: dict[str, int] = {}
        for _, delta in rec.frames:
            for batch in delta.observer:
                dropped[batch.engine_id] = max(dropped.get(batch.engine_id, 0),
                                               int(getattr(batch, "num_dropped", 0) or 0))
                for ev in batch.events:
                    n[(batch.engine_id, type(ev).__name__)] += 1
        print(f"{path}: {rec.duration:.1f} s, {rec.num_bytes} B, dropped {dropped}")
        for (eng, kind), c in sorted(n.items()):
            print(f"  {eng:>12} {kind:<18} {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
