"""Slurm (Frontier, the local test cluster): #SBATCH directives, sbatch / squeue+sacct /
scancel."""

from __future__ import annotations

import re
from shutil import which
from typing import Sequence

from ..config import Config
from ..plan import Plan
from ..platforms import Platform
from ..layout import RunLayout
from .base import Backend, check_job_id, run
from .nodelist import Allocation, expand_slurm_nodelist

_STATES = {
    "PENDING": "queued", "CONFIGURING": "queued", "REQUEUED": "queued",
    "REQUEUE_FED": "queued",
    "REQUEUE_HOLD": "held", "RESV_DEL_HOLD": "held", "SUSPENDED": "held", "STOPPED": "held",
    "RUNNING": "running", "RESIZING": "running", "SIGNALING": "running",
    "STAGE_OUT": "exiting", "COMPLETING": "exiting",
    "COMPLETED": "completed",
    "CANCELLED": "cancelled",
    "FAILED": "failed", "TIMEOUT": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed",
    "BOOT_FAIL": "failed", "DEADLINE": "failed", "PREEMPTED": "failed",
    "REVOKED": "failed", "SPECIAL_EXIT": "failed",
}


def normalize_state(word: str) -> str:
    # sacct prints "CANCELLED by 1000"; squeue may print "PENDING" etc.
    parts = word.strip().split()
    return _STATES.get(parts[0].rstrip("+"), "unknown") if parts else "unknown"


class SlurmBackend(Backend):
    name = "slurm"
    cancel_command = "scancel"
    state_command = "squeue"
    submit_command = "sbatch"
    directive_prefix = "#SBATCH"
    job_id_var = "SLURM_JOB_ID"
    rank_count_vars = ("SLURM_STEP_NUM_TASKS",)  # set in an srun step, not in the batch script
    env_transport = "sbatch --export=ALL"

    def directives(self, config: Config, plan: Plan, platform: Platform,
                   run_dir: str) -> list[str]:
        lines = [f"-J {config.job_name}", f"-N {plan.nodes_needed}", f"-t {config.walltime}"]
        if config.account:
            lines.append(f"-A {config.account}")
        if config.queue:
            lines.append(f"-p {config.queue}")
        lines += [f"-o {RunLayout(run_dir).job_log}", "--exclusive", *platform.directives]
        return lines

    def submit_argv(self, script_path: str, env_names: Sequence[str],
                    after: Sequence[str] = ()) -> list[str]:
        # --export=ALL hands the job sbatch's environment, so the named variables (HF_TOKEN,
        # the API key) travel without their values being on a command line.
        return ["sbatch", "--parsable", "--export=ALL", *after, script_path]

    def successor_args(self, predecessor: str, start_after_s: float) -> list[str]:
        # after:<id>+<minutes>: eligible that many minutes after the predecessor starts.
        check_job_id(predecessor)
        return [f"--dependency=after:{predecessor}+{max(0, int(start_after_s // 60))}"]

    def parse_job_id(self, stdout: str) -> str:
        return super().parse_job_id(stdout).split(";")[0]  # "123;cluster" on federations

    def nodes_in(self, env, read_file):
        """SLURM_JOB_NODELIST, Slurm's compact host list, expanded."""
        nodelist = env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            return None
        return Allocation(tuple(expand_slurm_nodelist(nodelist, "SLURM_JOB_NODELIST")),
                          "SLURM_JOB_NODELIST")

    def run_dir_of(self, job_id: str) -> str | None:
        check_job_id(job_id)
        if not which("scontrol"):
            return None
        result = run(["scontrol", "-o", "show", "job", job_id])
        match = re.search(r"\bWorkDir=(\S+)", result.stdout) if result.returncode == 0 else None
        return match.group(1) if match else None

    def state(self, job_id: str) -> str:
        check_job_id(job_id)
        result = run(["squeue", "-h", "-j", job_id, "-o", "%T"])
        words = result.stdout.split() if result.returncode == 0 else []
        if words:
            return normalize_state(words[0])
        # Gone from the queue: accounting knows how it ended, when the site has it.
        if which("sacct"):
            result = run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
            lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
            if result.returncode == 0 and lines:
                return normalize_state(lines[0])
        # No accounting (small clusters): slurmctld remembers finished jobs for MinJobAge.
        if not which("scontrol"):
            return "unknown"
        result = run(["scontrol", "-o", "show", "job", job_id])
        match = re.search(r"\bJobState=(\S+)", result.stdout) if result.returncode == 0 else None
        return normalize_state(match.group(1)) if match else "unknown"
