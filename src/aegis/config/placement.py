"""Placement rules that need the platform: TP placeable on its nodes, at most MAX_NODES nodes,
HTTP and internal port ranges inside 1..65535 and apart. The limits plan.py builds with."""

from __future__ import annotations

from ..platforms import Platform
from .errors import ConfigError
from .model import Config

INTERNAL_PORTS_PER_SLOT = 16
# More nodes than any machine has: plans and node lists above it are refused before they are built.
MAX_NODES = 100_000


def nodes_per_instance(tp: int, devices_per_node: int) -> int:
    """Whole nodes an instance of tensor parallel size `tp` spans (1 when it fits on one)."""
    return -(-tp // devices_per_node)


def check_placement(config: Config, platform: Platform) -> None:
    """placement_problems as a ConfigError (one line each), when there are any."""
    problems = placement_problems(config, platform)
    if problems:
        raise ConfigError("\n".join(problems))


def placement_problems(config: Config, platform: Platform) -> list[str]:
    """Platform-dependent rules: TP placeable, a plan of at most MAX_NODES nodes, ports inside
    1..65535 and not overlapping. One line per broken rule."""
    problems: list[str] = []
    dpn = platform.devices_per_node
    single = len(config.models) == 1
    nodes = 0
    for i, model in enumerate(config.models):
        tp = model.tensor_parallel_size
        path = "tensor_parallel_size" if single else f"models[{i}].tensor_parallel_size"
        if tp > dpn and tp % dpn:
            problems.append(
                f"{path}: {tp} cannot be placed on {platform.name} ({dpn} devices per node); "
                f"allowed: 1-{dpn}, or a multiple of {dpn} (whole nodes)")
        nodes += model.instances * nodes_per_instance(tp, dpn)  # an upper bound of the plan's
    if nodes > MAX_NODES:  # checked before make_plan builds anything of that size
        problems.append(f"instances: the models need up to {nodes} nodes of {platform.name}; "
                     f"at most {MAX_NODES} are supported")
    http_ports = config.http_ports
    http_first, http_last = config.first_port, config.first_port + http_ports - 1
    if http_last > 65535:
        routers = len(config.routed_models)
        problems.append(
            f"port_start: {config.first_port} + {config.total_instances} instances"
            + (f" and {routers} router(s)" if routers else "")
            + f" runs past 65535 (last port {http_last}); allowed: port_start <= "
            f"{65536 - http_ports}")
    internal_first = config.internal_port_start
    internal_last = internal_first + dpn * INTERNAL_PORTS_PER_SLOT - 1
    if internal_last > 65535:
        problems.append(
            f"internal_port_start: {internal_first} + {dpn} slots x {INTERNAL_PORTS_PER_SLOT} "
            f"ports runs past 65535; allowed: internal_port_start <= "
            f"{65536 - dpn * INTERNAL_PORTS_PER_SLOT}")
    elif http_first <= internal_last and internal_first <= http_last:
        http = f"{http_first}" if http_first == http_last else f"{http_first}-{http_last}"
        problems.append(
            f"port_start: HTTP ports {http} overlap the internal port range "
            f"{internal_first}-{internal_last} (internal_port_start); move one of them")
    return problems
