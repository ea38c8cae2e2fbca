"""Record one short REAL PD session for the lab's shipped recordings, keeping every engine log.

    source .gpu-carry/on-device.sh && PYTHONPATH=$PWD python3 tests/gpu/record_toggles.py \
        $OUT real-h200x2-nixl-chunk256 num_gpus=2 connector=nixl chunk=256 [duration_s=14]

`key=value` pairs go to `labkit.Lab` (ints and floats parsed); `duration_s` is the recorded
time. The recording lands in OUT/NAME.lkrec; the Lab's run directory (engine and proxy logs)
in OUT/NAME-logs.tgz whether or not the run worked, so a failing engine can be read after.
"""
from __future__ import annotations

import sys
import tarfile
import time
import traceback
from pathlib import Path

from labkit.bench.record_session import record_demo_session


def _value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv: list[str]) -> int:
    out, name, *pairs = argv
    knobs = {k: _value(v) for k, v in (p.split("=", 1) for p in pairs)}
    duration = float(knobs.pop("duration_s", 14))
    run_dir = Path("/tmp/lkruns") / name
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rc = 0
    try:
        path = record_demo_session(Path(out) / f"{name}.lkrec", mode=knobs.pop("mode", "vllm"),
                                   duration_s=duration,
                                   model=knobs.pop("model", "lab-1b"), run_dir=run_dir, **knobs)
        print(f"{name}: {path.stat().st_size} B in {time.time() - t0:.0f} s", flush=True)
    except Exception:  # keep going: the logs below say why
        traceback.print_exc()
        print(f"{name}: FAILED after {time.time() - t0:.0f} s", flush=True)
        rc = 1
    with tarfile.open(Path(out) / f"{name}-logs.tgz", "w:gz") as tar:
        for log in run_dir.rglob("*.log"):
            if log.stat().st_size < 8 << 20:
                tar.add(log, arcname=str(log.relative_to(run_dir)))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
