"""The backend interface and what PBS and Slurm share: Jinja rendering, running commands.

render() is pure (text from config + plan + platform + paths); submit/state/cancel run the
batch system's commands (argv lists, never a shell) and raise SchedulerError on failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any, Mapping, Sequence

from ..version import __version__
from ..config import Config, ConfigError
from ..layout import RunLayout
from ..plan import Plan
from ..platforms import Platform
from ..render import render_template

# What state() returns, whatever the batch system calls it.
JOB_STATES = ("queued", "held", "running", "exiting", "completed", "failed", "cancelled",
              "unknown")

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\[\]@-]*")


class SchedulerError(RuntimeError):
    """The batch system refused or failed (exit 1): one line, the command's stderr inside."""


class SchedulerNotFound(SchedulerError):
    """The batch system's command is not on PATH (not a login node of that system)."""


def model_summaries(config: Config, plan: Plan) -> list[str]:
    """One comment line per model (names are validated free of control characters)."""
    lines = []
    for index, model in enumerate(config.models):
        ports = [i.port for i in plan.instances if i.model_index == index]
        span = f"{ports[0]}" if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"
        lines.append(f"model {index}: {model.name} x{model.instances}, tensor_parallel_size "
                     f"{model.tensor_parallel_size}, ports {span}")
    return lines


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ConfigError(f"job id: {job_id!r} is not a job id (e.g. '12345' or "
                          "'12345.aurora-pbs-0001')")
    return job_id


def one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


class Backend:
    name = ""
    template = "job.sh.j2"
    submit_command = ""
    cancel_command = ""
    state_command = ""  # its presence on PATH says which batch system a login node has
    directive_prefix = ""
    env_transport = ""  # how named variables reach the job, for the script's comment
    # The in-job side: the variable holding this job's id, and variables that say the
    # process is one task of a parallel step (a rank), not the batch script itself.
    job_id_var = ""
    rank_count_vars: tuple[str, ...] = ()

    # -- pure ------------------------------------------------------------------------------
    def render(self, config: Config, plan: Plan, platform: Platform, run_dir: str,
               python: str | None = None, chain: dict | None = None) -> str:
        """The batch script for `plan`, writing into the absolute directory `run_dir`.
        `chain`: {"dir", "generation", "total"} for one generation of `submit --chain`."""
        if not os.path.isabs(run_dir):
            raise ValueError(f"run_dir must be absolute, got {run_dir!r}")
        if python is None:
            # Inside a conda env the env's python has aegis; otherwise the interpreter that
            # ran `aegis submit` (same install on a shared file system).
            python = "python" if config.conda_env else sys.executable
        context: dict[str, Any] = {
            "aegis_version": __version__,
            "config": config,
            "plan": plan,
            "platform": platform,
            "run_dir": run_dir,
            "config_path": RunLayout(run_dir).config,
            "launcher_argv": platform.launcher_argv(plan.nodes_needed),
            "python": python,
            "model_lines": model_summaries(config, plan),
            "directives": self.directives(config, plan, platform, run_dir),
            "directive_prefix": self.directive_prefix,
            "env_transport": self.env_transport,
            "chain": chain,
        }
        return render_template(self.template, **context)

    def directives(self, config: Config, plan: Plan, platform: Platform,
                   run_dir: str) -> list[str]:
        raise NotImplementedError

    def submit_argv(self, script_path: str, env_names: Sequence[str],
                    after: Sequence[str] = ()) -> list[str]:
        """`after`: options placing the job after another (see successor_args)."""
        raise NotImplementedError

    def successor_args(self, predecessor: str, start_after_s: float) -> list[str]:
        """Submit options that queue a job to start `start_after_s` seconds after
        `predecessor` starts (aegis submit --chain)."""
        raise NotImplementedError

    def release_successor(self, successor: str, start_at: float) -> None:
        """In the running predecessor: let a held successor start at `start_at` (epoch s).
        Nothing to do where successor_args already says when."""

    def parse_job_id(self, stdout: str) -> str:
        lines = [line.strip() for line in stdout.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    # -- inside the job ---------------------------------------------------------------------
    def job_id_in(self, env) -> str | None:
        """This job's id when running inside one of this batch system's jobs."""
        return env.get(self.job_id_var) or None

    def nodes_in(self, env, read_file):
        """The job's nodes in rank order (an aegis.launch.allocation.Allocation), or None
        outside such a job. `read_file(path) -> str` is injected so this stays testable."""
        raise NotImplementedError

    # -- side effects ----------------------------------------------------------------------
    def available(self) -> bool:
        from shutil import which

        return which(self.submit_command) is not None

    def submit(self, script_path: str, env_names: Sequence[str] = (),
               env: Mapping[str, str] | None = None, cwd: str | None = None,
               after: Sequence[str] = ()) -> str:
        """Submit the script; `env_names` are variables the job must receive by name."""
        result = run(self.submit_argv(script_path, env_names, after), env=env, cwd=cwd)
        if result.returncode != 0:
            raise SchedulerError(f"{self.submit_command} failed (exit {result.returncode}): "
                                 f"{one_line(result.stderr) or one_line(result.stdout) or 'no output'}")
        job_id = self.parse_job_id(result.stdout)
        if not job_id:
            raise SchedulerError(f"{self.submit_command} printed no job id: "
                                 f"{one_line(result.stdout) or 'no output'}")
        return job_id

    def state(self, job_id: str) -> str:
        raise NotImplementedError

    def run_dir_of(self, job_id: str) -> str | None:
        """The directory the job was submitted from (aegis submits from its run directory),
        when the batch system still knows the job."""
        return None

    def cancel(self, job_id: str) -> None:
        check_job_id(job_id)
        result = run([self.cancel_command, job_id])
        if result.returncode != 0:
            raise SchedulerError(f"{self.cancel_command} {job_id} failed (exit {result.returncode}): "
                                 f"{one_line(result.stderr) or one_line(result.stdout)}")


def run(argv: list[str], env: Mapping[str, str] | None = None, cwd: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, env=None if env is None else dict(env), cwd=cwd, text=True,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              check=False)
    except FileNotFoundError:
        hint = " (aegis submit --dry-run prints the script without submitting)" \
            if argv[0] in ("qsub", "sbatch") else ""
        raise SchedulerNotFound(f"{argv[0]} not found on PATH: not a login node of this batch "
                                f"system?{hint}") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"{argv[0]} did not answer within {timeout:.0f} s") from None
