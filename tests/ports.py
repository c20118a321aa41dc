"""Free loopback ports for tests that start servers."""

from __future__ import annotations

import random
import socket


def free_port_block(n: int) -> int:
    """A base port with n free ports after it, below the ephemeral range (32768+) so that
    client sockets of the probes cannot take them in the meantime."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000 - n)
        if all(port_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port block")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
