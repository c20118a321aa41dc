"""Node lists as batch systems and users write them, parsed (pure): a PBS node file (a host
per rank slot), Slurm's compact lists (node[01-04,07],gpu-a[1-2]), a comma list. The backends
read their job's list with these (Backend.nodes_in); aegis.launch.allocation picks the source.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import MAX_NODES

LOCAL_HOST = "127.0.0.1"
# A node file of MAX_NODES hosts, each repeated per rank slot, fits easily.
MAX_NODEFILE_BYTES = 64 << 20
_HOST = re.compile(r"[A-Za-z0-9_.:-]{1,255}")


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


def _checked_hosts(hosts: list[str], source: str) -> list[str]:
    for host in hosts:
        if not _HOST.fullmatch(host):
            raise AllocationError(f"{source}: {host[:60]!r} is not a host name")
    if len(hosts) > MAX_NODES:
        raise AllocationError(f"{source}: {len(hosts)} nodes; at most {MAX_NODES} are supported")
    return hosts


def parse_nodefile(text: str, source: str = "node file") -> list[str]:
    """PBS_NODEFILE repeats a host once per rank slot; keep each host once, in order."""
    return _checked_hosts(unique_in_order(line.split()[0] for line in text.splitlines()
                                          if line.strip() and not line.lstrip().startswith("#")),
                          source)


def _split_top_level(text: str, source: str) -> list[str]:
    """Split on commas that are not inside [...]: 'a[1-2],b' -> ['a[1-2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise AllocationError(f"{source}: unbalanced ']' in {text[:60]!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise AllocationError(f"{source}: unbalanced '[' in {text[:60]!r}")
    parts.append(text[start:])
    return parts


def _ranges(spec: str, whole: str, source: str) -> list[tuple[int, int, int]]:
    """'1-3,05,7' -> [(1, 3, 1), (5, 5, 2), (7, 7, 1)]: (first, last, zero-padded width)."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d{1,18})(?:-(\d{1,18}))?", item.strip())
        if not m:
            raise AllocationError(f"{source}: bad range {item[:60]!r} in {whole!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise AllocationError(f"{source}: descending range {item!r} in {whole!r}")
        out.append((int(lo), int(hi), len(lo)))
    return out


def _expand_one(pattern: str, whole: str, source: str) -> list[str]:
    """Expand every [...] group in one host pattern (cartesian product, left to right).
    The count is computed first, so 'n[1-100000000]' is refused without building it."""
    pieces = re.split(r"\[([^\]]*)\]", pattern)  # text, ranges, text, ranges, ..., text
    groups = [_ranges(spec, whole, source) for spec in pieces[1::2]]
    count = 1
    for ranges in groups:
        count *= sum(hi - lo + 1 for lo, hi, _ in ranges)
        if count > MAX_NODES:
            raise AllocationError(f"{source}: {pattern[:60]!r} names more than "
                                  f"{MAX_NODES} nodes; at most {MAX_NODES} are supported")
    hosts = [pieces[0]]
    for ranges, text in zip(groups, pieces[2::2]):
        hosts = [host + str(n).zfill(width) + text for host in hosts
                 for lo, hi, width in ranges for n in range(lo, hi + 1)]
    return hosts


def expand_slurm_nodelist(nodelist: str, source: str = "node list") -> list[str]:
    """Slurm's compact host list -> host names: 'node[1-3,5],gpu-[01-02]' -> node1..node5, gpu-01, gpu-02."""
    text = nodelist.strip()
    if not text:
        raise AllocationError(f"{source} is empty")
    hosts: list[str] = []
    for part in _split_top_level(text, source):
        part = part.strip()
        if not part:
            raise AllocationError(f"{source}: empty entry in {nodelist[:60]!r}")
        hosts.extend(_expand_one(part, nodelist[:60], source))
        if len(hosts) > MAX_NODES:
            raise AllocationError(f"{source}: more than {MAX_NODES} nodes; at most "
                                  f"{MAX_NODES} are supported")
    return _checked_hosts(unique_in_order(hosts), source)
