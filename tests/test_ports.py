"""labkit.plan.ports.free_port: ports a lab hands to servers it starts later."""

from __future__ import annotations

import socket

from labkit.plan.ports import ephemeral_range, free_port


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    lo, hi = ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)  # never twice in a process
    assert all(not lo <= p <= hi for p in ports)
    with socket.socket() as s:  # free when handed out
        s.bind(("127.0.0.1", ports[-1]))

