"""Which nodes this job has, in rank order. The formats are parsed in aegis.scheduler.nodelist;
where a batch job lists its nodes is the batch system's knowledge (Backend.nodes_in).

Sources, first match wins: --nodes, --nodefile, the batch job's list (PBS_NODEFILE,
SLURM_JOB_NODELIST), the local machine (every "node" is 127.0.0.1, so 2-4 MPI ranks on one
host can play nodes).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..scheduler import BACKENDS
from ..scheduler.nodelist import (LOCAL_HOST, MAX_NODEFILE_BYTES, Allocation, AllocationError,
                                  expand_slurm_nodelist, parse_nodefile)

__all__ = ["LOCAL_HOST", "MAX_NODEFILE_BYTES", "Allocation", "AllocationError", "check_enough",
           "find_allocation"]


def find_allocation(*, nodes: str | None, nodefile_text: str | None, nodefile_name: str | None,
                    env: Mapping[str, str], read_file, local_count: int) -> Allocation:
    """Pick the node list. `read_file(path) -> str` is injected so this stays testable."""
    if nodes:
        # --nodes a,b,c; Slurm compact forms work too (--nodes node[1-4])
        return Allocation(tuple(expand_slurm_nodelist(nodes, "--nodes")), "--nodes")
    if nodefile_text is not None:
        hosts = parse_nodefile(nodefile_text, f"--nodefile {nodefile_name}")
        if not hosts:
            raise AllocationError(f"--nodefile {nodefile_name}: no host names in it")
        return Allocation(tuple(hosts), f"--nodefile {nodefile_name}")
    # each batch system knows where its job lists its nodes (Backend.nodes_in)
    for backend in BACKENDS.values():
        allocation = backend().nodes_in(env, read_file)
        if allocation is not None:
            return allocation
    return Allocation((LOCAL_HOST,) * max(1, local_count), "local machine")


def check_enough(allocation: Allocation, nodes_needed: int) -> None:
    if len(allocation.nodes) < nodes_needed:
        raise AllocationError(
            f"the plan needs {nodes_needed} node(s) but the allocation ({allocation.source}) has "
            f"{len(allocation.nodes)}: {', '.join(allocation.nodes[:8])}"
            f"{' ...' if len(allocation.nodes) > 8 else ''}")
