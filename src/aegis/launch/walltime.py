"""The job's end and what the launcher does before it. Pure.

The batch script records when the job started (AEGIS_JOB_START, `date +%s`); with the
config's walltime that is the end the scheduler enforces, on PBS (which sends no warning
signal) and Slurm alike. Before it, the launcher marks its instances `draining` in the
endpoints file (clients and routers stop sending them new requests; in-flight requests
finish), then stops everything cleanly while the scheduler would still wait.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

# EXIT_MARGIN_S: after the stop begins, stop_grace for TERM -> KILL, then this much for the
# launcher to write its last endpoints file and exit before the scheduler's kill. The config
# refuses a walltime that leaves no time to serve (aegis.config.timing_problems).
from ..config import EXIT_MARGIN_S, ConfigError, walltime_seconds

__all__ = ["EXIT_MARGIN_S", "JOB_START_VAR", "Schedule", "job_end", "job_start", "schedule",
           "walltime_seconds"]

JOB_START_VAR = "AEGIS_JOB_START"
# A Unix time, in seconds: what `date +%s` prints (up to the year 2286).
MAX_JOB_START = 1e10


def job_start(env: Mapping[str, str]) -> float | None:
    """When the batch script says this job started (AEGIS_JOB_START), or None when it is not
    set (a launch by hand). Anything but a Unix time in seconds is refused: ConfigError, one
    line (nan, inf or 1e300 would make every time computed from it meaningless)."""
    text = env.get(JOB_START_VAR, "")
    if not text.strip():
        return None
    shown = repr(text[:40] + ("..." if len(text) > 40 else ""))
    start = float(text) if re.fullmatch(r"\s*[0-9]{1,11}(\.[0-9]{0,9})?\s*", text) else math.nan
    if not (math.isfinite(start) and 0 <= start <= MAX_JOB_START):
        raise ConfigError(f"{JOB_START_VAR}: {shown} is not a Unix time in seconds (the batch "
                          "script sets it with `date +%s`); unset it for a launch by hand")
    return start


def job_end(env: Mapping[str, str], walltime: str) -> float | None:
    """Epoch seconds when the scheduler ends this job, or None when unknown (a launch
    by hand, outside a batch script aegis wrote). ConfigError for a bad AEGIS_JOB_START."""
    start = job_start(env)
    return None if start is None else start + walltime_seconds(walltime)


@dataclass(frozen=True)
class Schedule:
    drain_at: float  # mark instances draining
    stop_at: float  # stop them (TERM, then KILL after stop_grace)
    end: float


def schedule(end: float, *, drain_seconds: float, stop_grace: float) -> Schedule:
    stop_at = end - EXIT_MARGIN_S - stop_grace
    return Schedule(drain_at=stop_at - drain_seconds, stop_at=stop_at, end=end)
