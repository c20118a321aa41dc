"""`aegis submit` as an API: make a run directory, write the script and resolved config,
hand the script to the batch system. The only module here that writes files.

Order matters for "nothing half-done": everything that can be checked (config, account,
the batch command on PATH) is checked before the run directory is created; once it exists it
is kept, also when the submission fails, so the user can inspect the script.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..config import (DIRECTIVE_SAFE_PATH, INTERNAL_PORTS_PER_SLOT, Config, ConfigError,
                      check_placement, check_submittable, dump_yaml, walltime_seconds)
from ..files import write_atomic
from ..layout import CHAIN_NAME, RunLayout
from ..plan import Plan, make_plan
from ..platforms import Platform
from .base import Backend, SchedulerError, SchedulerNotFound

_DIRECTIVE_SAFE_PATH = re.compile(DIRECTIVE_SAFE_PATH)


@dataclass(frozen=True)
class Submission:
    job_id: str
    run_dir: str
    script_path: str
    warnings: tuple[str, ...] = field(default=())


def run_dir_parent(config: Config, cwd: str | None = None) -> str:
    parent = os.path.expanduser(config.run_dir)
    parent = os.path.normpath(os.path.join(cwd or os.getcwd(), parent))
    # The path lands in a #PBS -o / #SBATCH -o directive, which no shell quotes.
    if not _DIRECTIVE_SAFE_PATH.fullmatch(parent):
        raise ConfigError(f"run_dir: resolves to {parent!r}, which has characters a batch "
                          "directive cannot carry (spaces, quotes, shell characters); set "
                          "run_dir to a plain absolute path")
    return parent


def run_dir_name(config: Config, now: _dt.datetime) -> str:
    return f"{config.job_name}-{now:%Y%m%d-%H%M%S}"


def resolved_for_run(config: Config, run_dir: str) -> Config:
    """The config the launcher re-loads: relative endpoints_file pinned inside the run dir,
    the ports pinned (what the script's comments and `aegis plan` said)."""
    return config.replace(endpoints_file=RunLayout(run_dir).endpoints(config.endpoints_file),
                          port_start=config.first_port)


def write_resolved_config(config: Config, layout: RunLayout) -> None:
    """config.yaml in the run directory: what the launcher runs and `aegis status` reads.
    Written atomically (temp file + rename): whatever was there (`aegis launch --run-dir` into
    an existing directory), even a FIFO, is replaced, never opened."""
    write_atomic(layout.config, dump_yaml(resolved_for_run(config, layout.root).to_mapping()),
                 0o644)


def job_environment(config: Config, environ: Mapping[str, str]) -> tuple[list[str], dict[str, str], list[str]]:
    """(names the job must receive, environment for qsub/sbatch, warnings)."""
    names: list[str] = []
    env = dict(environ)
    warnings: list[str] = []
    if config.hf_token:
        env["HF_TOKEN"] = config.hf_token  # in the child's environment only, never argv
        names.append("HF_TOKEN")
    elif environ.get("HF_TOKEN"):
        names.append("HF_TOKEN")
    if config.api_key_env:
        if config.api_key_env in environ:
            names.append(config.api_key_env)
        else:
            warnings.append(f"api_key_env: {config.api_key_env} is not set here; the job gets "
                            "it only if the platform setup sets it")
    return names, env, warnings


def dry_run(config: Config, platform: Platform, backend: Backend,
            now: _dt.datetime | None = None, python: str | None = None) -> str:
    """The script `submit` would write, for the run directory it would create. No writes."""
    plan = make_plan(config, platform)
    run_dir = os.path.join(run_dir_parent(config), run_dir_name(config, now or _dt.datetime.now()))
    return backend.render(config, plan, platform, run_dir, python=python)


def _create_run_dir(parent: str, name: str) -> Path:
    Path(parent).mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        candidate = Path(parent) / (name if attempt == 0 else f"{name}-{attempt + 1}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise SchedulerError(f"cannot create a new run directory under {parent}")


def submit(config: Config, platform: Platform, backend: Backend, *,
           environ: Mapping[str, str] | None = None, now: _dt.datetime | None = None,
           python: str | None = None) -> Submission:
    plan: Plan = make_plan(config, platform)
    parent, names, env, warnings = _before_writing(config, platform, backend, environ)
    run_dir = _create_run_dir(parent, run_dir_name(config, now or _dt.datetime.now()))
    return _submit_into(run_dir, config, platform, backend, plan, names, env, warnings, python)


def _before_writing(config: Config, platform: Platform, backend: Backend, environ):
    """Everything a submission checks before it writes: -> (run_dir parent, variable names
    the job gets, the batch command's environment, warnings)."""
    check_submittable(config, platform)
    parent = run_dir_parent(config)
    if not backend.available():
        raise SchedulerNotFound(f"{backend.submit_command} not found on PATH: not a "
                                f"{backend.name.upper()} login node? (use --dry-run to print the "
                                "script without submitting)")
    names, env, warnings = job_environment(config, os.environ if environ is None else environ)
    return parent, names, env, warnings


def _submit_into(run_dir: Path, config: Config, platform: Platform, backend: Backend, plan: Plan,
                 names, env, warnings, python, *, chain: dict | None = None,
                 after: list[str] = ()) -> Submission:
    layout = RunLayout(str(run_dir))
    script = backend.render(config, plan, platform, str(run_dir), python=python, chain=chain)
    write_resolved_config(config, layout)
    script_path = Path(layout.script)
    script_path.write_text(script, encoding="utf-8")
    script_path.chmod(0o755)
    try:
        job_id = backend.submit(str(script_path), names, env=env, cwd=str(run_dir), after=after)
    except SchedulerError as err:
        raise type(err)(f"{err} (run directory kept: {run_dir})") from None
    Path(layout.job_id).write_text(job_id + "\n", encoding="utf-8")
    return Submission(job_id=job_id, run_dir=str(run_dir), script_path=str(script_path),
                      warnings=tuple(warnings))


def check_chain(config: Config, generations: int) -> float:
    """-> seconds after a generation's start that its successor may start."""
    if generations < 1:
        raise ConfigError(f"--chain {generations}: must be >= 1")
    walltime = walltime_seconds(config.walltime)
    if generations > 1 and config.chain_overlap >= walltime:
        raise ConfigError(f"chain_overlap: {config.chain_overlap:g}s is not shorter than the "
                          f"walltime {config.walltime}; a successor must start after its "
                          "predecessor")
    return walltime - config.chain_overlap


def generation_config(config: Config, platform: Platform, generation: int) -> Config:
    """Even generations use the port blocks right after odd ones' (HTTP and internal), so a
    successor that shares a node with its still-serving predecessor (a non-exclusive
    allocation; a test cluster on one machine) can bind. Clients read the endpoints file."""
    if generation % 2:
        return config

    shifted = config.replace(
        port_start=config.first_port + config.http_ports,
        internal_port_start=config.internal_port_start
        + platform.devices_per_node * INTERNAL_PORTS_PER_SLOT)
    try:
        check_placement(shifted, platform)
    except ConfigError as err:
        raise ConfigError(f"--chain: the second generation's ports (the block after the "
                          f"first's) do not fit: {err}") from None
    return shifted


def submit_chain(config: Config, platform: Platform, backend: Backend, generations: int, *,
                 environ: Mapping[str, str] | None = None, now: _dt.datetime | None = None,
                 python: str | None = None) -> list[Submission]:
    """`aegis submit --chain N`: N jobs, generation k+1 queued to start chain_overlap seconds
    before generation k's end, so it stages and warms up while k still serves. One chain
    directory holds gen-1 ... gen-N (each a run directory), chain.json (generation -> job id)
    and the chain's endpoints file, which names the newest generation that serves. If a
    submission fails, the generations already queued are cancelled."""
    start_after = check_chain(config, generations)
    if generations > 1:
        generation_config(config, platform, 2)  # fails before anything is written
    parent, names, env, warnings = _before_writing(config, platform, backend, environ)
    chain_dir = _create_run_dir(parent, run_dir_name(config, now or _dt.datetime.now()))
    done: list[Submission] = []
    record = {"generations": [], "walltime": config.walltime,
              "chain_overlap": config.chain_overlap}
    try:
        for generation in range(1, generations + 1):
            run_dir = chain_dir / f"gen-{generation}"
            run_dir.mkdir()
            after = backend.successor_args(done[-1].job_id, start_after) if done else []
            gen_config = generation_config(config, platform, generation)
            done.append(_submit_into(
                run_dir, gen_config, platform, backend, make_plan(gen_config, platform),
                names, env, warnings, python,
                chain={"dir": str(chain_dir), "generation": generation, "total": generations},
                after=after))
            record["generations"].append({"generation": generation, "job_id": done[-1].job_id,
                                          "run_dir": str(run_dir)})
            write_atomic(chain_dir / CHAIN_NAME, json.dumps(record, indent=1) + "\n", 0o644)
    except SchedulerError as err:
        for queued in done:
            try:
                backend.cancel(queued.job_id)
            except SchedulerError:
                pass
        cancelled = f"; cancelled {', '.join(s.job_id for s in done)}" if done else ""
        raise type(err)(f"{err}{cancelled}") from None
    return done
