"""The job's end and what the launcher does before it. Pure.

The batch script records when the job started (AEGIS_JOB_START, `date +%s`); with the
config's walltime that is the end the scheduler enforces, on PBS (which sends no warning
signal) and Slurm alike. Before it, the launcher marks its instances `draining` in the
endpoints file (clients and routers stop sending them new requests; in-flight requests
finish), then stops everything cleanly while the scheduler would still wait.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

JOB_START_VAR = "AEGIS_JOB_START"
# After the stop begins: stop_grace for TERM -> KILL, then this much for the launcher to write
# its last endpoints file and exit before the scheduler's kill.
EXIT_MARGIN_S = 10.0


def walltime_seconds(walltime: str) -> int:
    hours, minutes, seconds = (int(part) for part in walltime.split(":"))
    return hours * 3600 + minutes * 60 + seconds


def job_end(env: Mapping[str, str], walltime: str) -> float | None:
    """Epoch seconds when the scheduler ends this job, or None when unknown (a launch
    by hand, outside a batch script aegis wrote)."""
    start = env.get(JOB_START_VAR, "")
    try:
        return float(start) + walltime_seconds(walltime) if start else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Schedule:
    drain_at: float  # mark instances draining
    stop_at: float  # stop them (TERM, then KILL after stop_grace)
    end: float


def schedule(end: float, *, drain_seconds: float, stop_grace: float) -> Schedule:
    stop_at = end - EXIT_MARGIN_S - stop_grace
    return Schedule(drain_at=stop_at - drain_seconds, stop_at=stop_at, end=end)
