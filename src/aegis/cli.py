"""The `aegis` command: parses arguments and calls the API, nothing else.

Config flags are generated from aegis.config.KEYS (one flag per key), so every key has a flag.
Errors: bad input -> one line "aegis: error: ..." on stderr, exit 2; a failed run (qsub/sbatch
missing or failing, staging failed) -> one line, exit 1. No tracebacks for either.
Logs and warnings go to stderr; data (scripts, job ids, JSON, tables) to stdout.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .config import (KEYS, MAX_TOKEN_BYTES, Config, ConfigError, FileTooLarge, Key,
                     _scheduler_names, load_config, read_small_file, why_unreadable)
from .model_source import check_models
from .platforms import get_platform, platform_names

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


def _warn(message: str) -> None:
    click.echo(f"aegis: warning: {message}", err=True)


class AegisGroup(click.Group):
    """Turns every known failure into one line on stderr and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from .scheduler import SchedulerError

        try:
            code = super().main(args=args, prog_name=prog_name or "aegis",
                                complete_var=complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("aegis: aborted", err=True)
            code = EXIT_FAILED
        except click.ClickException as err:  # bad flags: click's own message, one line
            click.echo(f"aegis: error: {' '.join(err.format_message().split())}", err=True)
            code = err.exit_code
        except ConfigError as err:  # one line per problem
            for line in str(err).splitlines():
                click.echo(f"aegis: error: {line}", err=True)
            code = EXIT_BAD_INPUT
        except SchedulerError as err:
            click.echo(f"aegis: error: {err}", err=True)
            code = EXIT_FAILED
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


# ------------------------------------------------------------------ config flags from KEYS


def _option_for(key: Key) -> Callable:
    help_text = f"{key.help} [config key: {key.name}]"
    if key.kind == "bool":
        dashed = key.name.replace("_", "-")
        return click.option(f"--{dashed}/--no-{dashed}", key.name, default=None, help=help_text)
    if key.kind == "file":
        return click.option(key.flag, key.name, metavar="FILE", help=help_text,
                            type=click.Path(exists=True, dir_okay=False))
    kinds: dict[str, Any] = {"str": str, "int": click.INT, "float": click.FLOAT}
    if key.kind == "choice":
        assert key.choices is not None
        param_type: Any = click.Choice(key.choices())
    else:
        param_type = kinds[key.kind]
    return click.option(key.flag, key.name, type=param_type, default=None, help=help_text)


def config_options(command: Callable) -> Callable:
    command = click.option("--config", "-c", "config_path", metavar="FILE",
                           help="Deployment YAML (optional: flags alone can describe a "
                                "single-model deployment).")(command)
    for key in reversed(KEYS):
        command = _option_for(key)(command)
    return command


def config_from_flags(config_path: str | None, flag_values: dict[str, Any]) -> Config:
    overrides = {k.name: flag_values.get(k.name) for k in KEYS}
    token_file = overrides.get("hf_token")
    if token_file is not None:
        try:
            overrides["hf_token"] = read_small_file(token_file, MAX_TOKEN_BYTES).strip()
        except (OSError, UnicodeDecodeError, FileTooLarge) as err:
            raise ConfigError(f"--hf-token-file: cannot read {token_file}: "
                              f"{why_unreadable(err)}") from None
    config = load_config(config_path, overrides)
    for key in config.ignored_keys:
        _warn(f"ignoring legacy key {key!r} (accepted for old configs; this Aegis does not "
              "use it)")
    return config


# ------------------------------------------------------------------ commands


@click.group(cls=AegisGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aegis", prog_name="aegis")
def main() -> None:
    """Launch fleets of vLLM inference servers on HPC allocations (PBS, Slurm)."""


@main.command()
@config_options
@click.option("--dry-run", is_flag=True, help="Print the batch script; write and submit nothing.")
@click.option("--chain", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Submit N jobs, each queued to start chain_overlap seconds before its "
              "predecessor's end; the chain directory's endpoints file names the newest "
              "generation that serves.")
def submit(config_path: str | None, dry_run: bool, chain: int, **flags: Any) -> int:
    """Render the batch script and submit it (qsub or sbatch); print the job id."""
    from .scheduler import get_backend
    from .scheduler import submit as submission

    config = config_from_flags(config_path, flags)
    platform = get_platform(config.platform)
    backend = get_backend(config.effective_scheduler)
    _, problems, notes = check_models(config.models, skip_missing=True)  # before any byte moves
    if problems:
        raise ConfigError("\n".join(problems))
    for note in notes:
        _warn(note)
    if dry_run:
        if platform.requires_account and not config.account:
            _warn("account is not set; the script has no -A line and a real submit will refuse")
        if chain > 1:
            submission.check_chain(config, chain)
        click.echo(submission.dry_run(config, platform, backend), nl=False)
        return 0
    if chain > 1:
        results = submission.submit_chain(config, platform, backend, chain)
        for message in results[0].warnings:
            _warn(message)
        chain_dir = str(Path(results[0].run_dir).parent)
        click.echo(f"aegis: submitted {chain} chained jobs {', '.join(r.job_id for r in results)}"
                   f"; chain directory {chain_dir} (endpoints: {chain_dir}/endpoints.json)",
                   err=True)
        for r in results:
            click.echo(r.job_id)
        return 0
    result = submission.submit(config, platform, backend)
    for message in result.warnings:
        _warn(message)
    click.echo(f"aegis: submitted job {result.job_id}; run directory {result.run_dir}", err=True)
    click.echo(result.job_id)
    return 0


@main.command()
@config_options
@click.option("--format", "output_format", type=click.Choice(["table", "json"]),
              default="table", show_default=True, help="Output format.")
def plan(config_path: str | None, output_format: str, **flags: Any) -> int:
    """Print where every instance goes: node, devices, ports."""
    from .plan import make_plan

    config = config_from_flags(config_path, flags)
    placement = make_plan(config, get_platform(config.platform))
    if output_format == "json":
        click.echo(json.dumps({"platform": config.platform, **placement.to_dict()}, indent=2))
        return 0
    click.echo(f"# {len(placement.instances)} instance(s) on {placement.nodes_needed} node(s) "
               f"of {config.platform} ({placement.devices_per_node} devices per node)")
    click.echo(f"{'id':>5} {'node':>9} {'devices':<14} {'port':>5} {'vllm_port':>9} "
               f"{'master':>6}  model")
    for inst in placement.instances:
        nodes = (str(inst.nodes[0]) if len(inst.nodes) == 1
                 else f"{inst.nodes[0]}-{inst.nodes[-1]}")
        devices = (f"{inst.devices[0]}-{inst.devices[-1]}" if len(inst.devices) > 1
                   else str(inst.devices[0]))
        click.echo(f"{inst.id:>5} {nodes:>9} {devices:<14} {inst.port:>5} {inst.vllm_port:>9} "
                   f"{inst.master_port:>6}  {inst.served_name}")
    return 0


class ByteSize(click.ParamType):
    name = "SIZE"
    _UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", str(value))
        if not match or int(match.group(1)) == 0:
            self.fail(f"{value!r} is not a size such as 64M, 4MiB or 1048576", param, ctx)
        return int(match.group(1)) * self._UNITS[match.group(2).lower()]


@main.command()
@click.argument("source")
@click.argument("dest")
@click.option("--chunk-size", type=ByteSize(), help="Broadcast chunk size, e.g. 64M.  [default: 16M]")
@click.option("--depth", type=click.IntRange(min=1),
              help="Chunks in flight (1 = serial read, broadcast, write).  [default: 4]")
@click.option("--writers", type=click.Choice(["node", "all"]),
              help="One writer per node (node) or every rank writes (all).  [default: node]")
@click.option("--readers", type=click.IntRange(min=1, max=256),
              help="Ranks (one per node first) that each read a share of SOURCE.  [default: 1]")
@click.option("--stall-timeout", type=click.FloatRange(min=0.001, max=1e6),
              help="Seconds a reader or writer may sit on one piece of I/O before the stage "
                   "fails on every rank.  [default: 300]")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every writer's copy of each chunk against the reader's CRC32C.")
@click.option("--force", is_flag=True, help="Stage again even if DEST is already up to date.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def stage(source: str, dest: str, chunk_size: int | None, depth: int | None,
          writers: str | None, readers: int | None, stall_timeout: float | None, verify: bool,
          force: bool, quiet: bool) -> int:
    """Copy SOURCE (a directory or one file) to node-local DEST on every node: read once,
    broadcast over MPI.

    Run it under the MPI launcher, one rank per node (e.g. mpiexec -n N --ppn 1 aegis stage)."""
    from . import bcast  # needs mpi4py and the C extension: only for this command

    tuning = {name: value for name, value in
              (("chunk_size", chunk_size), ("depth", depth), ("writers", writers),
               ("readers", readers), ("stall_timeout", stall_timeout))
              if value is not None}
    try:
        result = bcast.stage(source, dest, verify=verify, force=force, progress=not quiet,
                             **tuning)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        raise ConfigError(f"stage: {err}") from None
    except bcast.StagingError as err:
        # Failing before any byte moved means a bad SOURCE or DEST (exit 2); later, the run.
        click.echo(f"aegis: error: stage failed: {err}", err=True)
        return EXIT_BAD_INPUT if err.code in (bcast.E_ARGS, bcast.E_PREPARE) else EXIT_FAILED
    from mpi4py import MPI  # already loaded by bcast

    if MPI.COMM_WORLD.Get_rank() == 0:  # one result per job, not one per rank
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    return 0


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def launch(args: tuple[str, ...]) -> int:
    """Inside an allocation: start, verify and supervise the planned instances.

    All arguments go to the launcher (see `aegis launch --help`)."""
    from .launch import main as launch_main

    return launch_main(list(args))


def _job_and_backend(job: str, scheduler: str | None, platform: str):
    """JOB is a job id or a run directory made by `aegis submit` (job.id + config.yaml)."""
    from .scheduler import get_backend
    from .scheduler.base import CONFIG_NAME
    from .scheduler.submit import JOB_ID_NAME

    if os.path.isdir(job):
        try:
            with open(os.path.join(job, JOB_ID_NAME), encoding="utf-8") as f:
                job_id = f.read().strip()
        except OSError:
            raise ConfigError(f"{job}: not a submitted run directory (no {JOB_ID_NAME})") from None
        if scheduler is None:
            scheduler = load_config(os.path.join(job, CONFIG_NAME)).effective_scheduler
        job = job_id
    if scheduler is None and platform is not None:
        scheduler = get_platform(platform).scheduler
    return job, get_backend(scheduler or _scheduler_on_path())


def _scheduler_on_path() -> str:
    """A bare job id: ask the batch system this login node has."""
    from shutil import which

    from .scheduler import BACKENDS

    found = [name for name, backend in BACKENDS.items() if which(backend.state_command)]
    if len(found) != 1:
        why = "both qstat and squeue are" if found else "neither qstat nor squeue is"
        raise ConfigError(f"job id: {why} on PATH; say which with --scheduler pbs|slurm")
    return found[0]


def _job_command(name: str, summary: str, action: Callable[[Any, str], int]) -> None:
    @main.command(name=name, help=summary)
    @click.argument("job")
    @click.option("--scheduler", type=click.Choice(_scheduler_names()),
                  help="Batch system (default: the run directory's; for a job id, the one "
                  "whose qstat or squeue is on PATH).")
    @click.option("--platform", type=click.Choice(platform_names()),
                  help="Platform whose batch system to ask when --scheduler is not given.")
    def command(job: str, scheduler: str | None, platform: str | None) -> int:
        job_id, backend = _job_and_backend(job, scheduler, platform)
        return action(backend, job_id)  # the backend checks the id


def _print_state(backend, job_id: str) -> int:
    click.echo(backend.state(job_id))
    return 0


def _cancel(backend, job_id: str) -> int:
    backend.cancel(job_id)
    click.echo(f"aegis: cancelled job {job_id}", err=True)
    return 0


_job_command("status", "Print the state of JOB (a job id or run directory): queued, held, "
             "running, exiting, completed, failed, cancelled or unknown.", _print_state)
_job_command("cancel", "Cancel JOB (a job id or run directory): qdel or scancel.", _cancel)


if __name__ == "__main__":  # pragma: no cover
    main()
