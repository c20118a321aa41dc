"""The run's directory as the launcher sees it: its name (the job id), whether it can be
written before anything is (a refused launch leaves no half-made run directory), and the
resolved config copy in it."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ..config import Config
from ..layout import RunLayout


def job_id(env) -> str:
    """The batch job's id, or a local one (`aegis launch` outside a batch job)."""
    from ..scheduler import job_id_in

    return job_id_in(env) or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def cannot_write(directory: Path) -> str | None:
    """Why files cannot be created in `directory` (made later if missing), or None. Creates
    nothing that stays."""
    existing = directory
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as e:
        return f"cannot look at {existing} ({e.strerror or e})"
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"cannot write in {existing} ({e.strerror or e})"
    return None


def problems(run_dir: str, endpoints: Path, run_dir_flag: str) -> list[str]:
    """Before anything starts: the run directory and the endpoints file must be writable (a
    launch that cannot report its endpoints is of no use)."""
    problem = cannot_write(Path(run_dir))
    if problem:
        return [f"{run_dir_flag} {run_dir}: {problem}"]
    problem = cannot_write(endpoints.parent)
    if problem:
        return [f"endpoints_file {endpoints}: {problem}"]
    return [f"endpoints_file {endpoints}: {path} is a directory"
            for path in (endpoints, endpoints.with_suffix(".txt")) if path.is_dir()]


def write_config(config: Config, layout: RunLayout) -> None:
    """config.yaml in the run directory: what the ranks run and `aegis status` reads."""
    from ..scheduler.submit import write_resolved_config

    write_resolved_config(config, layout)


def same_file(a: str | None, b: str) -> bool:
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False
