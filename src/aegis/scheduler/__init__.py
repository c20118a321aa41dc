"""Scheduler backends: render a batch script, submit it, ask a job's state, cancel it.

One small interface (aegis.scheduler.base.Backend), one module per batch system. The backend
comes from the platform record (aurora -> pbs, frontier -> slurm), overridable by
`scheduler:` / --scheduler.
"""

from __future__ import annotations

from .base import JOB_STATES, Backend, SchedulerError, SchedulerNotFound, check_job_id
from .pbs import PBSBackend
from .slurm import SlurmBackend

BACKENDS: dict[str, type[Backend]] = {"pbs": PBSBackend, "slurm": SlurmBackend}


def job_id_in(env) -> str | None:
    """Inside a batch job: its id, from whichever batch system runs it."""
    return next((i for b in BACKENDS.values() if (i := b().job_id_in(env))), None)


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise KeyError(f"unknown scheduler {name!r}; known: {', '.join(BACKENDS)}") from None


__all__ = ["BACKENDS", "JOB_STATES", "Backend", "PBSBackend", "SchedulerError",
           "SchedulerNotFound", "SlurmBackend", "check_job_id", "get_backend", "job_id_in"]
