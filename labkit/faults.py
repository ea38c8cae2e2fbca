"""Fault injection and process bookkeeping for a lab: kill an engine, find what is left.

The reliability tests (tests/test_reliability_*.py) and a curious learner use the same calls:

    from labkit import faults
    pgid = faults.kill_engine(lab, "prefill")        # kill -9 the whole process group
    faults.wait_groups_gone([pgid], timeout=5)       # ... and wait until no pid is left in it
    lab.restart_engine("prefill")

Everything here reads Linux /proc (no psutil); elsewhere the functions return empty answers.
Processes are found by an environment tag (`tag_children()`): every engine, proxy and
supervisor a lab starts inherits the parent's environment, so a tag set before the start
finds them even after they were re-parented to init (their parent died).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TAG_ENV = "LABKIT_FAULT_TAG"
_PROC = Path("/proc")


# ---------------------------------------------------------------- finding processes
def tag_children(tag: str | None = None) -> str:
    """Set $LABKIT_FAULT_TAG in this process (inherited by every child started later)."""
    tag = tag or uuid.uuid4().hex
    os.environ[TAG_ENV] = tag
    return tag


def tagged_pids(tag: str, *, exclude_self: bool = True) -> list[int]:
    """Live (non-zombie) pids whose environment holds LABKIT_FAULT_TAG=`tag`."""
    needle = f"{TAG_ENV}={tag}".encode()
    out = []
    for entry in _pid_dirs():
        pid = int(entry.name)
        if exclude_self and pid == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and _state(pid) not in ("Z", "X", None):
            out.append(pid)
    return sorted(out)


def pgid_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields else None


def groups_of(pids: Iterable[int]) -> set[int]:
    """The process groups of `pids` (those still alive)."""
    return {g for g in (pgid_of(p) for p in pids) if g is not None}


def lab_groups(lab: Any) -> dict[str, int]:
    """name -> process group of every engine and the proxy of a started Lab."""
    handles = {**lab.engines, **({"proxy": lab.proxy} if lab.proxy is not None else {})}
    return {name: h.pgid for name, h in handles.items() if h.pgid is not None}


def pids_in_groups(pgids: Iterable[int]) -> list[int]:
    """Live pids in any of `pgids`."""
    wanted = set(pgids)
    return sorted(
        int(e.name)
        for e in _pid_dirs()
        if (f := _stat_fields(int(e.name))) and int(f[2]) in wanted and f[0] != "Z"
    )


def wait_groups_gone(pgids: Iterable[int], timeout: float = 10.0) -> float:
    """Wait until no live pid is left in `pgids`; return the seconds it took.

    Raises:
        TimeoutError: naming the survivors (pid, command line) after `timeout` seconds.
    """
    pgids = list(pgids)
    t0 = time.monotonic()
    while True:
        left = pids_in_groups(pgids)
        if not left:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            names = ", ".join(f"{p} ({cmdline(p)[:80]})" for p in left)
            raise TimeoutError(f"still alive after {timeout:g} s in groups {pgids}: {names}")
        time.sleep(0.05)


def wait_tag_gone(tag: str, timeout: float = 10.0) -> float:
    """Wait until no process carries `tag`; return the seconds it took (TimeoutError else)."""
    t0 = time.monotonic()
    while left := tagged_pids(tag):
        if time.monotonic() - t0 > timeout:
            names = ", ".join(f"{p} ({cmdline(p)[:80]})" for p in left)
            raise TimeoutError(f"still alive after {timeout:g} s: {names}")
        time.sleep(0.05)
    return time.monotonic() - t0


def cmdline(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def argv_of(pid: int) -> list[str]:
    """A process's argument vector exactly as exec'd (NUL-separated in /proc)."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (VmRSS), 0 when it is gone."""
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


# ---------------------------------------------------------------- sockets
def listening_sockets(pids: Iterable[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state that `pids` hold.

    Read from /proc/net/tcp and tcp6 (state 0A) joined with each pid's fd links
    `socket:[inode]`. IPv4 addresses are dotted quads, IPv6 ones hex as the kernel writes them.
    """
    inode_pid: dict[str, int] = {}
    for pid in pids:
        fd_dir = _PROC / str(pid) / "fd"
        try:
            for fd in fd_dir.iterdir():
                try:
                    link = os.readlink(fd)
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inode_pid[link[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != "0A" or f[9] not in inode_pid:
                continue
            addr_hex, port_hex = f[1].split(":")
            out.append((_addr(addr_hex), int(port_hex, 16), inode_pid[f[9]]))
    return sorted(out)


def _addr(hex_addr: str) -> str:
    if len(hex_addr) == 8:  # IPv4, little-endian
        return ".".join(str(int(hex_addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
    return hex_addr


# ---------------------------------------------------------------- faults
def kill_engine(lab: Any, name: str, sig: int = signal.SIGKILL) -> int:
    """Send `sig` (default kill -9) to the whole process group of engine `name` (or "proxy");
    returns the group id. The lab is not told: it finds out as a real crash would show."""
    handle = lab.proxy if name == "proxy" else lab.engines[name]
    if handle is None or handle.pgid is None:
        raise ValueError(f"{name} is not running")
    os.killpg(handle.pgid, sig)
    return int(handle.pgid)


def _pid_dirs() -> list[Path]:
    try:
        return [e for e in _PROC.iterdir() if e.name.isdigit()]
    except OSError:
        return []


def _stat_fields(pid: int) -> list[str] | None:
    """Fields after `comm` of /proc/PID/stat: state, ppid, pgrp, session, ..."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def _state(pid: int) -> str | None:
    f = _stat_fields(pid)
    return f[0] if f else None
