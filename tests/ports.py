"""Free loopback ports for tests and benchmarks that start servers."""

from __future__ import annotations

import random

from aegis.launch.processes import port_in_use


def free_port_block(n: int) -> int:
    """A base port with n free ports after it, below the ephemeral range (32768+) so that
    client sockets of the probes cannot take them in the meantime."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000 - n)
        if not any(port_in_use("127.0.0.1", base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port block")
