"""Which nodes this job has, in rank order. Pure parsing plus one small reader of the environment.

Sources, first match wins: --nodes, --nodefile, PBS_NODEFILE, SLURM_JOB_NODELIST, the local
machine (every "node" is 127.0.0.1, so 2-4 MPI ranks on one host can play nodes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

LOCAL_HOST = "127.0.0.1"


class AllocationError(ValueError):
    """The node list is missing, malformed or too short: one line, exit 2."""


@dataclass(frozen=True)
class Allocation:
    nodes: tuple[str, ...]
    source: str  # where the list came from, for the log line


def unique_in_order(names) -> list[str]:
    seen: set[str] = set()
    out = []
    for name in names:
        if name and name not in seen:
            seen.add(name)
            out.append(name)
    return out


def parse_nodefile(text: str) -> list[str]:
    """PBS_NODEFILE repeats a host once per rank slot; keep each host once, in order."""
    return unique_in_order(line.split()[0] for line in text.splitlines() if line.strip()
                           and not line.lstrip().startswith("#"))


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]: 'a[1-2],b' -> ['a[1-2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise AllocationError(f"SLURM_JOB_NODELIST: unbalanced ']' in {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise AllocationError(f"SLURM_JOB_NODELIST: unbalanced '[' in {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range_list(spec: str, whole: str) -> list[str]:
    """'1-3,05,7' -> ['1','2','3','05','7'], keeping zero padding of the range's start."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise AllocationError(f"SLURM_JOB_NODELIST: bad range {item!r} in {whole!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise AllocationError(f"SLURM_JOB_NODELIST: descending range {item!r} in {whole!r}")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_one(pattern: str, whole: str) -> list[str]:
    """Expand every [...] group in one host pattern (cartesian product, left to right)."""
    m = re.search(r"\[([^\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [head + num + rest for num in _expand_range_list(m.group(1), whole)
            for rest in _expand_one(tail, whole)]


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list -> host names: 'node[1-3,5],gpu-[01-02]' -> node1..node5, gpu-01, gpu-02."""
    text = nodelist.strip()
    if not text:
        raise AllocationError("SLURM_JOB_NODELIST is empty")
    hosts = []
    for part in _split_top_level(text):
        part = part.strip()
        if not part:
            raise AllocationError(f"SLURM_JOB_NODELIST: empty entry in {nodelist!r}")
        hosts.extend(_expand_one(part, nodelist))
    return unique_in_order(hosts)


def find_allocation(*, nodes: str | None, nodefile_text: str | None, nodefile_name: str | None,
                    env: Mapping[str, str], read_file, local_count: int) -> Allocation:
    """Pick the node list. `read_file(path) -> str` is injected so this stays testable."""
    if nodes:
        # --nodes a,b,c; Slurm compact forms work too (--nodes node[1-4])
        return Allocation(tuple(expand_slurm_nodelist(nodes)), "--nodes")
    if nodefile_text is not None:
        hosts = parse_nodefile(nodefile_text)
        if not hosts:
            raise AllocationError(f"--nodefile {nodefile_name}: no host names in it")
        return Allocation(tuple(hosts), f"--nodefile {nodefile_name}")
    if env.get("PBS_NODEFILE"):
        path = env["PBS_NODEFILE"]
        try:
            hosts = parse_nodefile(read_file(path))
        except OSError as e:
            raise AllocationError(f"PBS_NODEFILE {path}: cannot read it ({e.strerror})") from None
        if not hosts:
            raise AllocationError(f"PBS_NODEFILE {path}: no host names in it")
        return Allocation(tuple(hosts), "PBS_NODEFILE")
    if env.get("SLURM_JOB_NODELIST"):
        return Allocation(tuple(expand_slurm_nodelist(env["SLURM_JOB_NODELIST"])), "SLURM_JOB_NODELIST")
    return Allocation((LOCAL_HOST,) * max(1, local_count), "local machine")


def check_enough(allocation: Allocation, nodes_needed: int) -> None:
    if len(allocation.nodes) < nodes_needed:
        raise AllocationError(
            f"the plan needs {nodes_needed} node(s) but the allocation ({allocation.source}) has "
            f"{len(allocation.nodes)}: {', '.join(allocation.nodes[:8])}"
            f"{' ...' if len(allocation.nodes) > 8 else ''}")
