"""The runs under a run directory (`aegis list`): each entry opened as an `aegis.Run`, newest
first; a chain directory (`aegis submit --chain`) is one entry. Entries that are not runs, or
cannot be read, are left out with a note, never a traceback."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from ..run import ConfigError, Run, RunError


@dataclass(frozen=True)
class RunEntry:
    name: str  # the entry's name in the run directory
    path: str
    kind: str  # "run" | "chain"
    job_id: str | None  # None for a run started by `aegis launch`; a chain: its serving job
    scheduler: str | None
    job_state: str
    phase: str  # aegis.run.PHASES, or "unknown" when the state could not be read
    reason: str
    ready: int
    total: int
    created: float  # when it was submitted or launched (its config's mtime), epoch seconds
    generations: int = 0  # a chain's number of jobs

    @property
    def age(self) -> float:
        return max(0.0, time.time() - self.created)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "age_s": round(self.age, 1)}


def _entry(parent: str, name: str) -> RunEntry:
    path = os.path.join(parent, name)
    if not os.path.isdir(path):
        raise ConfigError("not a directory")
    run = Run.open(path)
    created = os.stat(run.layout.config).st_mtime
    try:
        st = run.state()
        job_state, phase, reason, ready, total = (st.job_state, st.phase, st.reason, st.ready,
                                                  st.total)
    except Exception as err:  # noqa: BLE001 (squeue/qstat failing must not hide the run)
        job_state, phase, reason, ready, total = ("unknown", "unknown", _one_line(err), 0,
                                                  run.config.total_instances)
    return RunEntry(name=name, path=path, kind="chain" if run.chain_dir else "run",
                    job_id=run.job_id, scheduler=run.backend.name if run.backend else None,
                    job_state=job_state, phase=phase, reason=reason, ready=ready, total=total,
                    created=created, generations=len(run.chain_jobs))


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or err.__class__.__name__


def list_runs(parent: str | os.PathLike, *, workers: int = 8,
              ) -> tuple[list[RunEntry], list[str]]:
    """(runs newest first, notes on the entries left out). Raises ConfigError when `parent`
    is not a readable directory."""
    parent = os.fspath(parent)
    try:
        names = sorted(n for n in os.listdir(parent) if not n.startswith("."))
    except FileNotFoundError:
        raise ConfigError(f"{parent}: no such directory (runs are made there by aegis "
                          "submit; --run-dir DIR to look elsewhere)") from None
    except NotADirectoryError:
        raise ConfigError(f"{parent}: not a directory") from None
    except OSError as err:
        raise ConfigError(f"{parent}: cannot list it ({err.strerror})") from None

    def one(name: str):
        try:
            return _entry(parent, name)
        except (ConfigError, RunError, OSError, ValueError, KeyError, TypeError) as err:
            return f"{name}: skipped ({_one_line(err)})"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # one squeue/qstat each
        found = list(pool.map(one, names))
    runs = sorted((r for r in found if isinstance(r, RunEntry)),
                  key=lambda r: (r.created, r.name), reverse=True)
    return runs, [n for n in found if isinstance(n, str)]


def age_text(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 86400}d{seconds // 3600 % 24:02d}h"


def table(runs: list[RunEntry]) -> str:
    rows = [("NAME", "JOB", "PHASE", "READY", "AGE")]
    for r in runs:
        name = r.name + (f" (chain of {r.generations})" if r.kind == "chain" else "")
        rows.append((name, r.job_id or "-", r.phase, f"{r.ready}/{r.total}", age_text(r.age)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in rows)
