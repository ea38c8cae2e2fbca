"""Crafted .lkrec files: refused with one printable line, fast, in little memory.

Each file is read by `labkit.telemetry.recording.read_recording` in ONE child process (its
peak RSS is the figure); every refusal must be a ValueError of one line without control
characters, within 1 s; the child's peak RSS stays under 200 MB. A header carrying ANSI / OSC
escapes is read, with every string made printable.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zlib
from pathlib import Path

import msgspec

from labkit.telemetry.recording import FORMAT, MAGIC, Frame, MetricsRecord, read_recording
from labkit.telemetry.replay import title_of

ESC = "\x1b]0;owned\x07\x1b[2J\x1b[31m"


def _rec(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def _header(**kw) -> bytes:
    return msgspec.msgpack.encode({"format": FORMAT, "version": 1, "kind": "sim", **kw})


def _gz(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def _bomb(path: Path, zeros: int = 1 << 30) -> None:
    """MAGIC + header, then `zeros` zero bytes: ~1 MB of gzip that inflates to 1 GB."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(16 << 20)
    with open(path, "wb") as f:
        f.write(comp.compress(MAGIC + _rec(_header())))
        for _ in range(zeros // len(chunk)):
            f.write(comp.compress(chunk))
        f.write(comp.flush())


def hostile_files(d: Path) -> dict[str, Path]:
    files: dict[str, bytes] = {}
    tiny = b"\xdd" + (10_000_000).to_bytes(4, "big") + b"\x80" * 10_000_000
    files["10 M empty timeline events"] = _gz(
        MAGIC + _rec(_header()) + _rec(b"\x93\xcb" + b"\0" * 8 + b"\x90" + tiny))
    files["record declares 4 GB"] = _gz(MAGIC + _rec(_header()) + b"\xff\xff\xff\xff" + b"x" * 64)
    files["header declares 4 GB"] = _gz(MAGIC + b"\xff\xff\xff\xff" + b"x" * 64)
    files["header a list"] = _gz(MAGIC + _rec(msgspec.msgpack.encode([1, 2, 3])))
    files["version a string"] = _gz(MAGIC + _rec(_header(version="9")))
    files["format with escapes"] = _gz(MAGIC + _rec(msgspec.msgpack.encode(
        {"format": ESC, "version": 1})))
    files["gpus not a list of GPUs"] = _gz(MAGIC + _rec(_header(source={"gpus": [1, "x"]})))
    bad_metrics = msgspec.msgpack.encode(Frame(0.0, metrics=[MetricsRecord(
        "e", "decode", "sim", 0.0, ids=[99], values=[1.0])]))
    files["metrics id past the table"] = _gz(MAGIC + _rec(_header()) + _rec(bad_metrics))
    files["frame of garbage"] = _gz(MAGIC + _rec(_header()) + _rec(b"\xc1" * 100))
    files["not gzip inside"] = b"\x1f\x8b\x08\x00" + b"\xff" * 200
    files["nested 100,000 deep"] = _gz(MAGIC + _rec(b"\x91" * 100_000 + b"\x00"))
    files["empty"] = b""
    out = {}
    for i, (name, raw) in enumerate(files.items()):
        out[name] = d / f"h{i}.lkrec"
        out[name].write_bytes(raw)
    out["gzip bomb (1 GB of zeros)"] = d / "bomb.lkrec"
    _bomb(out["gzip bomb (1 GB of zeros)"])
    return out


CHILD = r"""
import json, sys, time
from labkit.telemetry.recording import read_recording
out = {}
for name, path in json.loads(sys.argv[1]).items():
    t0 = time.perf_counter()
    try:
        read_recording(path)
        msg = None
    except ValueError as exc:
        msg = str(exc)
    out[name] = {"s": time.perf_counter() - t0, "error": msg}
# VmHWM: this process's own peak (ru_maxrss would carry the forking parent's over exec)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
out["_maxrss_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(out))
"""


def test_hostile_recordings_are_refused_fast_in_little_memory(tmp_path) -> None:
    files = hostile_files(tmp_path)
    assert (tmp_path / "bomb.lkrec").stat().st_size < 2 << 20
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps({k: str(v) for k, v in
                                                                  files.items()})],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    rss = out.pop("_maxrss_mb")
    for name, r in out.items():
        print(f"{name:<28} {r['s'] * 1000:7.1f} ms  {r['error']}")
        assert r["error"], f"{name}: read without an error"
        assert "\n" not in r["error"] and r["error"].isprintable(), (name, r["error"])
        assert r["s"] < 1.0, (name, r["s"])
    print(f"peak RSS of the reader: {rss:.0f} MB")
    assert rss < 200, rss


def test_escapes_in_a_header_are_never_printed(tmp_path) -> None:
    path = tmp_path / "esc.lkrec"
    path.write_bytes(_gz(MAGIC + _rec(_header(kind=ESC, created=ESC, describe={ESC: ESC},
                                              source={"gpus": [{"name": ESC}]}))))
    rec = read_recording(path)
    shown = json.dumps(rec.header, ensure_ascii=False) + title_of(rec.header)
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b" in title_of(rec.header)  # shown as an escape, not swallowed


def test_shipped_recordings_still_read() -> None:
    for path in sorted((Path(__file__).parents[1] / "labkit/data/recordings").glob("*.lkrec")):
        rec = read_recording(path)
        assert rec.frames and not rec.truncated
