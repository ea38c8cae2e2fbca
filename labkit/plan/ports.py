"""Ports on this host: the one place the planner and the engines get a free one."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

# Ports handed out by this process: never twice (two engines of a lab asking in turn).
_ISSUED: set[int] = set()
_LOCK = threading.Lock()
_RNG = random.SystemRandom()
_LOW = 20000  # below every OS's ephemeral range (Linux 32768-60999, macOS/Windows 49152-)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux: from /proc)."""
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, for a server the lab starts later.

    Taken at random from below the kernel's ephemeral range, not from it (binding port 0 gave
    one inside it): between this call and the server's bind, any outgoing connection on the
    machine (an HTTP client, a ZMQ peer) could take an ephemeral port as its local port, and
    the server then failed with "Address already in use" (seen under load: a lab's telemetry
    reader). Never the same port twice in a process."""
    lo, hi = ephemeral_range()
    start, stop = (_LOW, lo) if lo - _LOW >= 2000 else (hi + 1, 65536)
    with _LOCK:
        for _ in range(500):
            port = _RNG.randrange(start, stop)
            if port not in _ISSUED and _bindable(host, port):
                _ISSUED.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a crowded range: any port
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on (host, port) now (SO_REUSEADDR, as uvicorn binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True
