"""PBS Pro (Aurora, Polaris): #PBS directives, qsub / qstat -f / qdel."""

from __future__ import annotations

import os
import re
import time
from typing import Sequence

from ..config import Config
from ..plan import Plan
from ..platforms import Platform
from ..layout import RunLayout
from ..files import why_unreadable
from .base import Backend, SchedulerError, check_job_id, one_line, run
from .nodelist import Allocation, AllocationError, parse_nodefile

# PBS one-letter job states -> aegis states (qstat -f prints "job_state = R").
_STATES = {
    "Q": "queued", "W": "queued", "T": "queued",
    "H": "held", "S": "held", "U": "held",
    "R": "running", "B": "running",
    "E": "exiting",
    "F": "completed", "C": "completed", "X": "completed",
}


def parse_qstat_full(text: str) -> dict[str, str]:
    """`qstat -f` attribute lines ("    name = value") as a dict; continuation lines skipped."""
    attrs: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"\s+([A-Za-z_.]+) = (.*)$", line)
        if match:
            attrs.setdefault(match.group(1), match.group(2).strip())
    return attrs


def state_from_attrs(attrs: dict[str, str]) -> str:
    state = _STATES.get(attrs.get("job_state", ""), "unknown")
    if state == "completed":
        exit_status = attrs.get("Exit_status", attrs.get("exit_status", "0"))
        if exit_status.lstrip("-").isdigit() and int(exit_status) != 0:
            return "failed"
    return state


class PBSBackend(Backend):
    name = "pbs"
    cancel_command = "qdel"
    state_command = "qstat"
    submit_command = "qsub"
    directive_prefix = "#PBS"
    job_id_var = "PBS_JOBID"
    env_transport = "qsub -v NAME"

    def directives(self, config: Config, plan: Plan, platform: Platform,
                   run_dir: str) -> list[str]:
        # One -l item per line: sbatch (reading #PBS lines) rejects "select=2,walltime=...".
        lines = [f"-N {config.job_name}", f"-l select={plan.nodes_needed}",
                 f"-l walltime={config.walltime}"]
        if config.filesystems:
            lines.append(f"-l filesystems={config.filesystems}")
        if config.account:
            lines.append(f"-A {config.account}")
        if config.queue:
            lines.append(f"-q {config.queue}")
        lines += ["-j oe", f"-o {RunLayout(run_dir).job_log}", *platform.directives]
        return lines

    def submit_argv(self, script_path: str, env_names: Sequence[str],
                    after: Sequence[str] = ()) -> list[str]:
        # -v NAME (no value) copies the variable from qsub's environment: secrets travel by
        # name, never on a command line or in the script.
        # -j/-o again on the command line: PBS-compatible wrappers (Slurm's qsub) pass their
        # own -o, which would override the script's #PBS -o.
        log = RunLayout(os.path.dirname(os.path.abspath(script_path))).job_log
        argv = ["qsub", "-j", "oe", "-o", log]
        if env_names:
            argv += ["-v", ",".join(env_names)]
        return [*argv, *after, script_path]

    def successor_args(self, predecessor: str, start_after_s: float) -> list[str]:
        # PBS cannot say "N minutes after that job starts": queue it after the predecessor's
        # start, held (-h); the running predecessor computes the start and releases it
        # (release_successor).
        check_job_id(predecessor)
        return ["-W", f"depend=after:{predecessor}", "-h"]

    def release_successor(self, successor: str, start_at: float) -> None:
        check_job_id(successor)
        when = time.strftime("%Y%m%d%H%M.%S", time.localtime(start_at))
        for argv in (["qalter", "-a", when, successor], ["qrls", successor]):
            result = run(argv)
            if result.returncode != 0:
                raise SchedulerError(f"{' '.join(argv)} failed (exit {result.returncode}): "
                                     f"{one_line(result.stderr) or one_line(result.stdout)}")

    def nodes_in(self, env, read_file):
        """PBS_NODEFILE: one line per rank slot; each host once, in file order."""
        path = env.get("PBS_NODEFILE")
        if not path:
            return None
        try:
            text = read_file(path)
        except (OSError, ValueError) as e:  # ValueError: not UTF-8, or too large
            raise AllocationError(f"PBS_NODEFILE {path}: cannot read it ({why_unreadable(e)})"
                                  ) from None
        hosts = parse_nodefile(text, f"PBS_NODEFILE {path}")
        if not hosts:
            raise AllocationError(f"PBS_NODEFILE {path}: no host names in it")
        return Allocation(tuple(hosts), "PBS_NODEFILE")

    def run_dir_of(self, job_id: str) -> str | None:
        check_job_id(job_id)
        result = run(["qstat", "-x", "-f", job_id])
        if result.returncode != 0:
            return None
        # qstat -f folds long values onto indented continuation lines: join them first.
        text = re.sub(r"\n\t", "", result.stdout)
        match = re.search(r"PBS_O_WORKDIR=([^,\n]+)", text)
        return match.group(1).strip() if match else None

    def state(self, job_id: str) -> str:
        check_job_id(job_id)
        result = run(["qstat", "-f", job_id])
        if result.returncode != 0:
            # Finished jobs leave the live list; PBS Pro keeps them in the history (-x).
            result = run(["qstat", "-x", "-f", job_id])
            if result.returncode != 0:
                return "unknown"
        return state_from_attrs(parse_qstat_full(result.stdout))
