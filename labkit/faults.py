"""Fault injection and process bookkeeping for a lab: kill an engine, find what is left.

The reliability tests (tests/test_reliability_*.py) and a curious learner use the same calls:

    from labkit import faults
    pgid = faults.kill_engine(lab, "prefill")        # kill -9 the whole process group
    faults.wait_groups_gone([pgid], timeout=5)       # ... and wait until no pid is left in it
    lab.restart_engine("prefill")

Process trees, environments and sockets come from psutil (a vLLM dependency too).
Processes are found by an environment tag (`tag_children()`): every engine, proxy and
supervisor a lab starts inherits the parent's environment, so a tag set before the start
finds them even after they were re-parented to init (their parent died).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import psutil

TAG_ENV = "LABKIT_FAULT_TAG"
_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


# ---------------------------------------------------------------- finding processes
def tag_children(tag: str | None = None) -> str:
    """Set $LABKIT_FAULT_TAG in this process (inherited by every child started later)."""
    tag = tag or uuid.uuid4().hex
    os.environ[TAG_ENV] = tag
    return tag


def tagged_pids(tag: str, *, exclude_self: bool = True) -> list[int]:
    """Live (non-zombie) pids whose environment holds LABKIT_FAULT_TAG=`tag`."""
    out = []
    for p in _live():
        if exclude_self and p.pid == os.getpid():
            continue
        try:
            if p.environ().get(TAG_ENV) == tag:
                out.append(p.pid)
        except _GONE:  # gone meanwhile, or another user's process
            continue
    return sorted(out)


def pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


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
    return sorted(p.pid for p in _live() if pgid_of(p.pid) in wanted)


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
    return " ".join(argv_of(pid))


def argv_of(pid: int) -> list[str]:
    """A process's argument vector exactly as exec'd ([] when it is gone)."""
    try:
        return psutil.Process(pid).cmdline()
    except _GONE:
        return []


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid`, 0 when it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except _GONE:
        return 0


# ---------------------------------------------------------------- sockets
def listening_sockets(pids: Iterable[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state that `pids` hold."""
    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except _GONE:
            continue
        out += [(c.laddr.ip, c.laddr.port, pid) for c in conns
                if c.status == psutil.CONN_LISTEN]
    return sorted(out)


# ---------------------------------------------------------------- faults
def kill_engine(lab: Any, name: str, sig: int = signal.SIGKILL) -> int:
    """Send `sig` (default kill -9) to the whole process group of engine `name` (or "proxy");
    returns the group id. The lab is not told: it finds out as a real crash would show."""
    handle = lab.proxy if name == "proxy" else lab.engines[name]
    if handle is None or handle.pgid is None:
        raise ValueError(f"{name} is not running")
    os.killpg(handle.pgid, sig)
    return int(handle.pgid)


def _live() -> Iterator[psutil.Process]:
    """Every process that is not a zombie (nor gone while we looked)."""
    for p in psutil.process_iter(["status"]):
        if p.info["status"] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            yield p
