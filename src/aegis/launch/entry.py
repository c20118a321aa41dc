"""`aegis launch`: be one rank when already under MPI; else run a one-node plan here, or start
the MPI job of launcher ranks (one per node) on a resolved copy of the config."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

from ..config import DEFAULT_PORT_START, Config, ConfigError
from ..files import FileTooLarge, read_small_file, why_unreadable
from ..layout import RunLayout
from ..plan import make_plan
from ..platforms import Platform, get_platform
from . import rundir
from .allocation import MAX_NODEFILE_BYTES, AllocationError, check_enough, find_allocation
from .messages import log_line, print_error
from .options import EXIT_BAD_INPUT, EXIT_FAILED, LaunchOptions, Prepared, UsageError
from .processes import port_in_use
from .rank import run_rank

# Set in the environment of the ranks `aegis launch` starts, so they never start another job.
RANK_MARKER = "AEGIS_LAUNCH_RANKS"
# What MPI launchers set in every rank; each batch system adds its own (Backend.rank_count_vars).
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def prepare(config: Config, options: LaunchOptions, env, config_path: str | None) -> Prepared:
    """Plan and find the nodes: the same answer on every rank. Raises UsageError, ConfigError
    or AllocationError."""
    platform = get_platform(config.platform)  # validated by load_config
    plan = make_plan(config, platform)
    nodefile_text = None
    if options.nodefile:
        try:
            nodefile_text = read_small_file(options.nodefile, MAX_NODEFILE_BYTES)
        except (OSError, UnicodeDecodeError, FileTooLarge) as e:
            raise UsageError(f"--nodefile {options.nodefile}: {why_unreadable(e)}") from None
    allocation = find_allocation(
        nodes=options.nodes, nodefile_text=nodefile_text, nodefile_name=options.nodefile,
        env=env, read_file=lambda p: read_small_file(p, MAX_NODEFILE_BYTES),
        local_count=plan.nodes_needed)
    check_enough(allocation, plan.nodes_needed)
    api_key = None
    if config.api_key_env:
        api_key = env.get(config.api_key_env)
        if not api_key:
            raise UsageError(f"api_key_env: environment variable {config.api_key_env} is not "
                             "set or empty")
    return Prepared(options, config, platform, plan, allocation, config_path, api_key)


def under_mpi(env) -> bool:
    if env.get(RANK_MARKER):
        return True
    from ..scheduler import BACKENDS

    for var in (*_SIZE_VARS, *(v for b in BACKENDS.values() for v in b.rank_count_vars)):
        try:
            if int(env.get(var, "0")) > 1:
                return True
        except ValueError:
            pass
    return False


def rank_launch_argv(platform: Platform, nodes: int, argv: list[str]) -> list[str]:
    """The MPI job that runs one `python -m aegis.launch` per node."""
    return [*platform.launcher_argv(nodes), sys.executable, "-m", "aegis.launch", *argv]


def free_port_start(count: int, host: str = "127.0.0.1", first: int = DEFAULT_PORT_START) -> int:
    """The first port of `count` consecutive free ones, searching up from `first`."""
    port = first
    while port + count <= 65536:
        taken = next((p for p in range(port, port + count) if port_in_use(host, p)), None)
        if taken is None:
            return port
        port = taken + 1
    raise UsageError(f"no {count} consecutive free ports from {first} on {host}; set port_start")


def launch(config: Config, options: LaunchOptions, *, config_path: str | None = None,
           env=None) -> int:
    """`aegis launch`: be one rank when already under MPI; else run a one-node plan here or
    start the MPI job of launcher ranks (one per node) on a resolved copy of the config.
    Exit codes: aegis.launch.options."""
    env = os.environ if env is None else env
    try:
        prepared = prepare(config, options, env, config_path)
        if under_mpi(env):
            return run_rank(prepared)
        if config.port_start is None and config.platform == "local":
            # No ports given: free ones on this machine (every local "node" is this machine).
            config = config.replace(port_start=free_port_start(config.http_ports))
            prepared = dataclasses.replace(prepared, config=config, movable_ports=True,
                                           plan=make_plan(config, prepared.platform))
    except (UsageError, ConfigError, AllocationError) as e:
        print_error(str(e))
        return EXIT_BAD_INPUT
    plan, platform = prepared.plan, prepared.platform
    if plan.nodes_needed <= 1:
        return run_rank(prepared)
    cmd0 = platform.launcher_argv(plan.nodes_needed)[0]
    if shutil.which(cmd0) is None:
        print_error(f"rank launcher {cmd0!r} (platform {platform.name}) not found on PATH")
        return EXIT_BAD_INPUT
    # The ranks run the resolved config (flags, free ports) from the run directory's
    # config.yaml, written here first.
    run_dir = os.path.abspath(options.run_dir or os.path.join(config.run_dir,
                                                               rundir.job_id(env)))
    problems = rundir.problems(run_dir, Path(RunLayout(run_dir).endpoints(config.endpoints_file)),
                               "--run-dir" if options.run_dir else "run_dir")
    if problems:
        for line in problems:
            print_error(line)
        return EXIT_BAD_INPUT
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    layout = RunLayout(run_dir)
    rundir.write_config(config, layout)
    argv = ["--config", layout.config, *dataclasses.replace(options, run_dir=run_dir).argv()]
    cmd = rank_launch_argv(platform, plan.nodes_needed, argv)
    log_line(None, f"starting {plan.nodes_needed} ranks: {' '.join(cmd[:-len(argv)])} ...")
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, {**env, RANK_MARKER: str(plan.nodes_needed)})
    return EXIT_FAILED  # not reached
