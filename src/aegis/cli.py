"""The `aegis` command: parses arguments and calls the API, nothing else.

Config flags are generated from aegis.config.KEYS (one flag per key), so every key has a flag.
Errors: bad input -> one line "aegis: error: ..." on stderr, exit 2 (also a run directory that
is missing, not the caller's, unreadable or damaged: aegis.run.RunDirError); a failed run
(qsub/sbatch missing or failing, staging failed, the run failed or ended, a launcher cancel
cannot verify) -> one line, exit 1; `wait` running out of time -> exit 3 (EXIT_TIMEOUT). No
tracebacks for any of them.
Logs and warnings go to stderr; data (scripts, job ids, JSON, tables, URLs) to stdout.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from .config import (KEYS, LOGIN_KEYS, MAX_TOKEN_BYTES, Config, ConfigError, Key, ModelConfig,
                     byte_size, load_config, scheduler_names)
from .files import FileTooLarge, read_small_file, why_unreadable
from .layout import CONFIG_NAME, RunLayout
from .model_source import check_models
from .platforms import get_platform, platform_names

EXIT_BAD_INPUT, EXIT_FAILED, EXIT_TIMEOUT = 2, 1, 3


def _warn(message: str) -> None:
    click.echo(f"aegis: warning: {message}", err=True)


# click >= 8.2 raises this (a UsageError whose message is the whole help) for a bare group.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class AegisGroup(click.Group):
    """Turns every known failure into one line on stderr and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from .remote import EXIT_REMOTE, RemoteError
        from .run import RunError, WaitTimeout
        from .scheduler import SchedulerError
        from .weights import FetchError

        try:
            code = super().main(args=args, prog_name=prog_name or "aegis",
                                complete_var=complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("aegis: aborted", err=True)
            code = EXIT_FAILED
        except _NO_ARGS_IS_HELP as err:  # a bare `aegis`: the help as it is, not squeezed
            click.echo(err.format_message(), err=True)
            code = err.exit_code
        except click.ClickException as err:  # bad flags: click's own message, one line
            click.echo(f"aegis: error: {' '.join(err.format_message().split())}", err=True)
            code = err.exit_code
        except ConfigError as err:  # one line per problem
            for line in str(err).splitlines():
                click.echo(f"aegis: error: {line}", err=True)
            code = EXIT_BAD_INPUT
        except WaitTimeout as err:
            click.echo(f"aegis: error: {err}", err=True)
            code = EXIT_TIMEOUT
        except RemoteError as err:  # the login node: not reached, or the connection lost
            click.echo(f"aegis: error: remote {err}", err=True)
            code = EXIT_REMOTE
        except (SchedulerError, RunError, FetchError) as err:
            click.echo(f"aegis: error: {err}", err=True)
            code = EXIT_FAILED
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


# ------------------------------------------------------------------ config flags from KEYS


def _default_shown(key: Key) -> str:
    """The dataclass default of a key, for its help ("" when unset or computed)."""
    import dataclasses as dc

    owner = ModelConfig if key.scope == "model" else Config
    fields_ = {f.name: f for f in dc.fields(owner)}
    default = getattr(fields_.get(key.field_name), "default", None)
    if default in (None, (), dc.MISSING) or key.secret or key.name == "hf_home":
        return ""
    if isinstance(default, bool):
        default = str(default).lower()
    return f"  [default: {default:g}]" if isinstance(default, float) else f"  [default: {default}]"


def _option_for(key: Key) -> Callable:
    help_text = f"{key.help} [config key: {key.name}]{_default_shown(key)}"
    if key.kind == "bool":
        dashed = key.name.replace("_", "-")
        return click.option(f"--{dashed}/--no-{dashed}", key.name, default=None, help=help_text)
    if key.kind == "file":
        return click.option(key.flag, key.name, metavar="FILE", help=help_text,
                            type=click.Path(exists=True, dir_okay=False))
    kinds: dict[str, Any] = {"str": str, "int": click.INT, "float": click.FLOAT, "size": str}
    if key.kind == "choice":
        assert key.choices is not None
        param_type: Any = click.Choice(key.choices())
    else:
        param_type = kinds[key.kind]
    return click.option(key.flag, key.name, type=param_type, default=None, help=help_text)


def config_options(command: Callable, skip: tuple[str, ...] = (), login: bool = False
                   ) -> Callable:
    """A flag per config key; the login side's own keys (remote, remote_aegis,
    download_weights) only with `login` (aegis submit)."""
    command = click.option("--config", "-c", "config_path", metavar="FILE",
                           help="Deployment YAML (optional: flags alone can describe a "
                                "single-model deployment).")(command)
    for key in reversed(KEYS):
        if key.name not in skip and (login or key not in LOGIN_KEYS):
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


# ------------------------------------------------------------------ --remote (docs/laptop.md)

_OVER_SSH = False  # this aegis runs for one on a laptop (--over-ssh): never hop again
_SENT = {"config_path": ("config.yaml", 256 << 10), "hf_token": ("hf-token", MAX_TOKEN_BYTES)}


def remote_option(command: Callable) -> Callable:
    """--remote [USER@]HOST and --remote-aegis CMD on a login-side command (one line each):
    given a login node (--remote, else the config's `remote`, else $AEGIS_REMOTE; `--remote ''`
    runs here), the same command runs there over ssh, and its output and exit status are this
    one's. Paths on its command line and in its config name files there."""
    own = {p.name for p in getattr(command, "__click_params__", [])}

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        ctx = click.get_current_context()
        target, remote_aegis = _remote_of(kwargs)
        if target is None:
            return command(**{k: v for k, v in kwargs.items()
                              if k in own or k not in ("remote", "remote_aegis")})
        return _run_remote(ctx, target, remote_aegis)

    if "remote_aegis" not in own:
        wrapper = click.option(
            "--remote-aegis", metavar="CMD",
            help="How to start aegis on the login node, its arguments appended (e.g. 'module "
            "load frameworks; aegis').  [default: $AEGIS_REMOTE_AEGIS, else aegis]")(wrapper)
    if "remote" not in own:
        wrapper = click.option(
            "--remote", metavar="[USER@]HOST",
            help="Run this on a login node over ssh (your ~/.ssh/config applies; one login per "
            "session); paths name files there. '' runs here.  [default: $AEGIS_REMOTE]"
        )(wrapper)
    return wrapper


def _remote_of(kwargs: dict[str, Any]) -> tuple[str | None, str]:
    """(the login node or None, how to start aegis there)."""
    from .remote import resolve, resolve_aegis

    if _OVER_SSH:
        return None, "aegis"
    configured = _login_keys_in(kwargs.get("config_path"))
    target = resolve(kwargs.get("remote"), configured.get("remote"))
    if target is None:
        return None, "aegis"
    return target, resolve_aegis(kwargs.get("remote_aegis"), configured.get("remote_aegis"))


def _login_keys_in(path: str | None) -> dict[str, str]:
    """`remote` and `remote_aegis` of a config file (its other problems: when it loads)."""
    from .config import MAX_CONFIG_BYTES, parse_yaml

    if not path:
        return {}
    try:
        data = parse_yaml(read_small_file(path, MAX_CONFIG_BYTES), path)
    except (OSError, ValueError, ConfigError):
        return {}
    return {k: v for k, v in (data.items() if isinstance(data, dict) else ())
            if k in ("remote", "remote_aegis") and isinstance(v, str)}


def _run_remote(ctx: click.Context, target: str, remote_aegis: str) -> int:
    from .remote import Remote, Uploads, incoming_dir

    run_dir = "aegis-runs"
    if "config_path" in ctx.params:  # submit: the config is checked here before it travels
        run_dir = _check_config_for_remote(ctx.params).run_dir
    remote = Remote(target, remote_aegis)
    with Uploads(remote, incoming_dir(run_dir)) as uploads:
        code, _ = remote.run(_remote_argv(ctx, uploads))
    return code


def _check_config_for_remote(params: dict[str, Any]) -> Config:
    from .config import MAX_CONFIG_BYTES, parse_yaml
    from .config.load import PATH_KEYS
    from .remote import relative_paths

    path = params.get("config_path")
    if path:
        try:
            data = parse_yaml(read_small_file(path, MAX_CONFIG_BYTES), path)
        except (OSError, UnicodeDecodeError, FileTooLarge) as err:
            raise ConfigError(f"{path}: cannot read config file: {why_unreadable(err)}") \
                from None
        relative = relative_paths(data, PATH_KEYS)
        if relative:
            raise ConfigError("\n".join(
                f"{path}: {line}: a relative path; with --remote, paths name files on the "
                "login node: give it absolute" for line in relative))
    return config_from_flags(path, {k: v for k, v in params.items() if k != "hf_token"})


def _remote_argv(ctx: click.Context, uploads) -> list[str]:
    """The command line the remote aegis gets: this command and the parameters given on this
    command line (not defaults: the remote's own apply), options as --name=value, arguments
    after --; the files in _SENT travel first and are named by their path there."""
    from click.core import ParameterSource

    options: list[str] = []
    arguments: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if name in ("remote", "remote_aegis") or \
                ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[name]
        if name in _SENT and value is not None:
            label, limit = _SENT[name]
            try:
                text = read_small_file(value, limit)
            except (OSError, UnicodeDecodeError, FileTooLarge) as err:
                raise ConfigError(f"{value}: cannot read it: {why_unreadable(err)}") from None
            value = uploads.send(text.encode(), label)
        if isinstance(param, click.Argument):
            if name == "input_path" and value == "-":
                raise ConfigError("INPUT -: standard input cannot go to --remote; the batch "
                                  "runs on the login node: copy the file there (docs/laptop.md)")
            arguments.append(str(value))
            continue
        opt = max((o for o in param.opts if o.startswith("--")), key=len, default=param.opts[0])
        if isinstance(param, click.Option) and param.is_flag:
            if param.secondary_opts:
                options.append(opt if value else max(param.secondary_opts, key=len))
            elif value:
                options.append(opt)
        elif isinstance(param, click.Option) and param.multiple:
            options += [f"{opt}={v}" for v in value]
        else:
            options.append(f"{opt}={value}")
    return [ctx.info_name or "", *options, *(["--", *arguments] if arguments else [])]


# ------------------------------------------------------------------ commands


@click.group(cls=AegisGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aegis", prog_name="aegis")
@click.option("--over-ssh", is_flag=True, hidden=True,
              help="Run for an aegis on a laptop (aegis.remote): no --remote hop from here; "
              "stop when standard input ends.")
def main(over_ssh: bool) -> None:
    """Launch fleets of vLLM inference servers on HPC allocations (PBS, Slurm).

    From a laptop, --remote [USER@]HOST (or AEGIS_REMOTE) runs submit, status, wait,
    endpoints, key, cancel, list, batch and fetch on a login node over ssh; aegis forward
    opens a tunnel to a run's router (docs/laptop.md)."""
    global _OVER_SSH
    if over_ssh:
        from .remote import watch_caller

        _OVER_SSH = True
        watch_caller()


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf (click's compares them with its bounds,
    and every comparison with nan is false: --timeout nan would wait for ever)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


APPEAR_TIMEOUT = 300.0  # seconds `wait` waits, without --timeout, for a run directory to appear
CANCEL_WAIT = 120.0  # seconds `cancel --wait` waits by default


def _wait_options(command: Callable) -> Callable:
    command = click.option("--min-ready", type=click.IntRange(min=1), metavar="N",
                           help="Ready when N instances are (default: all of them while the "
                           "run starts; once it serves, one: a run with some instances down "
                           "is ready, degraded).")(command)
    return click.option("--timeout", type=FiniteRange(min=0), metavar="S",
                        help="Give up after S seconds (exit 3; the run keeps going).  "
                        "[default: no limit once the run exists (its launcher ends the wait: "
                        f"ready, failed or ended); {APPEAR_TIMEOUT:g}s for a run directory "
                        "that does not exist yet]")(command)


@main.command()
@remote_option
@functools.partial(config_options, login=True)
@click.option("--dry-run", is_flag=True, help="Print the batch script; write and submit nothing.")
@click.option("--chain", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Submit N jobs, each queued to start chain_overlap seconds before its "
              "predecessor's end; the chain directory's endpoints file names the newest "
              "generation that serves.")
@click.option("--wait", "wait_ready", is_flag=True,
              help="Then wait until the run (with --chain: the first generation) is ready, "
              "like `aegis wait`.")
@_wait_options
def submit(config_path: str | None, dry_run: bool, chain: int, wait_ready: bool,
           timeout: float | None, min_ready: int | None, **flags: Any) -> int:
    """Render the batch script and submit it (qsub or sbatch); print the job id.

    With --wait: print the endpoints once ready instead (exit 0), 1 if the run failed or
    ended, 3 on --timeout."""
    from .scheduler import get_backend
    from .scheduler import submit as submission

    config = config_from_flags(config_path, flags)
    platform = get_platform(config.platform)
    backend = get_backend(config.effective_scheduler)
    if config.download_weights:
        _download_weights(config, platform, dry_run)
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
        if wait_ready:
            from .clients import Run

            return _wait(Run.open(results[0].run_dir), timeout, min_ready)
        for r in results:
            click.echo(r.job_id)
        return 0
    result = submission.submit(config, platform, backend)
    for message in result.warnings:
        _warn(message)
    click.echo(f"aegis: submitted job {result.job_id}; run directory {result.run_dir}", err=True)
    if not wait_ready:
        click.echo(result.job_id)
        return 0
    from .clients import Run

    return _wait(Run.open(result.run_dir), timeout, min_ready)


def _download_weights(config: Config, platform, dry_run: bool) -> None:
    """download_weights: fetch every model into its model_source here (the login node),
    after what a submission needs is checked, so no download precedes a refusal."""
    from .config import check_submittable
    from .weights import fetch_models

    if dry_run:
        _warn("download_weights: --dry-run fetches nothing")
        return
    check_submittable(config, platform)
    for done in fetch_models(config, say=lambda line: click.echo(f"aegis: {line}", err=True)):
        click.echo(f"aegis: {done.model}: {_fetched(done)}", err=True)


def _fetched(done) -> str:
    size = done.fetched_bytes
    shown = next((f"{size / scale:.1f} {unit}" for scale, unit in ((1e9, "GB"), (1e6, "MB"),
                                                                   (1e3, "kB"))
                  if size >= scale), f"{size} B")
    return (f"{done.fetched} of {done.files} file(s) fetched ({shown}), revision "
            f"{done.revision[:12]}; model_source {done.model_source}")


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

    def convert(self, value, param, ctx):
        try:
            return byte_size(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


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
              help="Check each chunk that crossed MPI against its reader's CRC32C.")
@click.option("--share-ring/--no-share-ring", default=True, show_default=True,
              help="Ranks on one host share one ring of chunk buffers in /dev/shm, so a chunk "
                   "crosses MPI once per host; --no-share-ring if /dev/shm is too small.")
@click.option("--force", is_flag=True, help="Stage again even if DEST is already up to date.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def stage(source: str, dest: str, chunk_size: int | None, depth: int | None,
          writers: str | None, readers: int | None, stall_timeout: float | None, verify: bool,
          share_ring: bool, force: bool, quiet: bool) -> int:
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
                             share_ring=share_ring, **tuning)
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        raise ConfigError(f"stage: {err}") from None
    except bcast.StagingError as err:
        if err.code == bcast.E_CANCELLED:  # SIGTERM (scancel) or Ctrl-C on some rank
            click.echo(f"aegis: error: stage cancelled: {err}", err=True)
            return 128 + (err.signum or signal.SIGTERM)
        # Failing before any byte moved means a bad SOURCE or DEST (exit 2); later, the run.
        click.echo(f"aegis: error: stage failed: {err}", err=True)
        return EXIT_BAD_INPUT if err.code in (bcast.E_ARGS, bcast.E_PREPARE) else EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C that came too late to cancel: DEST is complete
        click.echo("aegis: error: interrupted by SIGINT (the stage had completed)", err=True)
        return 128 + signal.SIGINT
    from mpi4py import MPI  # already loaded by bcast

    if MPI.COMM_WORLD.Get_rank() == 0:  # one result per job, not one per rank
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    return 0


@main.command()
@functools.partial(config_options, skip=("run_dir",))  # --run-dir is this run's directory
@click.option("--once", "--exit-when-ready", "once", is_flag=True,
              help="Start, verify, write the endpoints, stop everything, exit with the status.")
@click.option("--bind-host", metavar="ADDR",
              help="Address the instances listen on.  [default: each node's address]")
@click.option("--run-dir", "launch_run_dir", metavar="DIR",
              help="This run's directory (scripts, logs, endpoints).  "
              "[default: <run_dir key>/<job id>]")
@click.option("--nodefile", metavar="FILE", type=click.Path(dir_okay=False),
              help="File with one node name per line (duplicates folded).")
@click.option("--nodes", metavar="LIST",
              help="Node names in rank order (a,b or node[1-4]).  [default: the batch "
              "system's node list, else this machine]")
def launch(config_path: str | None, nodes: str | None, nodefile: str | None,
           launch_run_dir: str | None, bind_host: str | None, once: bool, **flags: Any) -> int:
    """Inside an allocation: start, verify and supervise the planned instances.

    Starts one launcher rank per node (the platform's MPI launcher) unless already one of
    them, or the plan needs one node. Exit 0 all ready (or allow_partial), 1 failed, 2 bad
    input, 128+N stopped by signal N."""
    from .launch import EXIT_BAD_INPUT, LaunchOptions, print_error
    from .launch import launch as start

    if nodes and nodefile:
        raise click.UsageError("--nodes and --nodefile: give one of them")
    from .launch.walltime import job_start

    try:  # the launcher's errors, also the config's, read "aegis launch: error: ..."
        config = config_from_flags(config_path, flags)
        job_start(os.environ)  # the batch script's AEGIS_JOB_START: a Unix time, or unset
    except ConfigError as err:
        print_error(str(err))
        return EXIT_BAD_INPUT
    return start(config, LaunchOptions(nodes=nodes, nodefile=nodefile, run_dir=launch_run_dir,
                                       bind_host=bind_host, once=once),
                 config_path=config_path)


def _exists(path: str) -> bool:
    """Whether anything is at `path` (a file of any kind, a dangling link, or something this
    user cannot look at): then Run.open says what is wrong with it, one line."""
    try:
        os.lstat(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError):
        return True


def _open_run(run: str, scheduler: str | None, platform: str | None):
    """RUN is a run directory, or a job id whose run directory the batch system knows.
    Returns a Run, or (job id, backend) for a job with no run directory to read (or one that
    is not this user's: the batch system's word, and its permissions, alone)."""
    from .clients import Run
    from .scheduler import check_job_id, get_backend

    path_like = os.sep in run or run.startswith(".")
    if os.path.isdir(run) or (path_like and _exists(run)):
        return Run.open(run, scheduler=scheduler)
    if path_like:
        raise ConfigError(f"{run}: no such run directory")
    try:
        job_id = check_job_id(run)
        if scheduler is None and platform is not None:
            scheduler = get_platform(platform).scheduler
        backend = get_backend(scheduler or _scheduler_on_path())
    except ConfigError as err:  # a mistyped run directory lands here too: say both
        raise ConfigError(f"{run}: no such run directory; as a {err}") from None
    run_dir = backend.run_dir_of(job_id)
    if run_dir and _owned_run_dir(run_dir):
        return Run.open(run_dir, scheduler=backend.name)
    return job_id, backend


def _owned_run_dir(path: str) -> bool:
    """A directory of this user's holding a config.yaml (the batch system names the job's
    working directory, which may be anyone's)."""
    try:
        st = os.stat(path)
        return (os.path.isdir(path) and st.st_uid == os.getuid()
                and os.path.lexists(RunLayout(path).config))
    except (OSError, ValueError):
        return False


def _scheduler_on_path() -> str:
    """A bare job id: ask the batch system this login node has."""
    from shutil import which

    from .scheduler import BACKENDS

    found = [name for name, backend in BACKENDS.items() if which(backend.state_command)]
    if len(found) != 1:
        why = "both qstat and squeue are" if found else "neither qstat nor squeue is"
        raise ConfigError(f"job id: {why} on PATH; say which with --scheduler pbs|slurm")
    return found[0]


def _run_command(name: str, **settings: Any) -> Callable:
    """A command taking RUN (a run directory or job id) and --scheduler/--platform."""
    def decorate(function: Callable) -> Callable:
        function = click.option(
            "--platform", type=click.Choice(platform_names()),
            help="Platform whose batch system to ask when RUN is a job id and --scheduler is "
            "not given.")(function)
        function = click.option(
            "--scheduler", type=click.Choice(scheduler_names()),
            help="Batch system (default: the run directory's; for a job id, the one whose "
            "qstat or squeue is on PATH).")(function)
        function = click.argument("run", metavar="RUN")(function)
        return main.command(name=name, **settings)(function)
    return decorate


def _need_run(opened, what: str):
    if isinstance(opened, tuple):
        job_id, backend = opened
        raise ConfigError(f"job {job_id}: no run directory found for it ({backend.name} does "
                          f"not name one that aegis made); give the run directory to {what}")
    return opened


def _instance_table(status) -> str:
    rows = [("MODEL", "NODE", "HOST", "URL", "STATE", "RESTARTS")]
    rows += [(e.model, str(e.node), e.host, e.url, e.state, str(e.restarts))
             for e in status.instances]
    rows += [(r.model, str(r.node), r.host, r.url, f"router {r.state}", str(r.restarts))
             for r in status.routers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


@_run_command("status")
@remote_option
@click.option("--json", "as_json", is_flag=True, help="The full status as JSON (schema: "
              "docs/using-endpoints.md).")
def status(run: str, scheduler: str | None, platform: str | None, as_json: bool) -> int:
    """State of RUN (a run directory or job id): the job, then one line per instance.

    Job states: queued, held, running, exiting, completed, failed, cancelled, unknown (a run
    started by `aegis launch`: running or ended)."""
    opened = _open_run(run, scheduler, platform)
    if isinstance(opened, tuple):  # a job with no run directory: the scheduler's word only
        job_id, backend = opened
        state = backend.state(job_id)
        if state == "unknown" and not run[:1].isdigit():
            # job ids start with a digit: this was a run directory's name, and a mistyped one
            raise ConfigError(f"{run}: no run directory or {backend.name} job has that name")
        click.echo(json.dumps({"job_id": job_id, "scheduler": backend.name, "job_state": state})
                   if as_json else state)
        return 0
    st = opened.state()
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=2))
        return 0
    job = f"job {st.job_id} ({st.scheduler})" if st.job_id else "launched run"
    click.echo(f"{job}: {st.job_state}; {st.ready}/{st.total} instance(s) ready; {st.phase}"
               + (f" ({st.reason})" if st.reason else ""))
    if st.instances or st.routers:
        click.echo(_instance_table(st))
    return 0


def _wait(run, timeout: float | None, min_ready: int | None) -> int:
    def progress(st) -> None:
        click.echo(f"aegis: {st.phase}" + (f": {st.reason}" if st.reason else ""), err=True)

    st = run.wait_ready(timeout=timeout, min_ready=min_ready, on_change=progress)
    for url in _urls(run.models(), st):
        click.echo(url)
    return 0


def _urls(models: list[str], st) -> list[str]:
    """Per model: its router's URL if up, else its ready instances' URLs."""
    urls = []
    for model in models:
        routers = [r.url for r in st.routers if r.model == model and r.state == "ready"]
        urls += routers or [e.url for e in st.instances if e.model == model and e.state == "ready"]
    return urls


@_run_command("wait")
@remote_option
@_wait_options
def wait(run: str, scheduler: str | None, platform: str | None, timeout: float | None,
         min_ready: int | None) -> int:
    """Wait until RUN is ready; print its URLs (per model: its router's, else its ready
    instances').

    Exit 0 ready, 1 the run failed or ended, 3 timed out (the run keeps going)."""
    if _exists(run) and not os.path.isdir(run):
        raise ConfigError(f"{run}: not a run directory (a file; give the directory that "
                          "aegis submit or aegis launch --run-dir made)")
    if not _has_entries(run) and (os.sep in run or run.startswith(".") or
                                  not run[:1].isdigit()):
        # `aegis launch --run-dir D &` may not have made D (or written in it) yet; a bare
        # NAME that is no job id (job ids start with a digit) is such a directory too
        limit = APPEAR_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + limit
        _await_run_dir(run, deadline, given=timeout is not None)
        timeout = None if timeout is None else round(max(0.0, deadline - time.monotonic()), 1)
    return _wait(_need_run(_open_run(run, scheduler, platform), "aegis wait"), timeout,
                 min_ready)


def _has_entries(path: str) -> bool:
    """A directory with something in it, or anything Run.open should judge (a file, a
    directory this user cannot list)."""
    if not _exists(path):
        return False
    try:
        with os.scandir(path) as entries:
            return any(True for _ in entries)
    except (OSError, ValueError):
        return True


def _await_run_dir(run_dir: str, deadline: float, *, given: bool,
                   interval: float = 0.5) -> None:
    """Until `run_dir` holds a run (its config, or a chain record: anything by those names,
    which Run.open then judges); WaitTimeout at `deadline`."""
    from .layout import CHAIN_NAME
    from .run import WaitTimeout

    click.echo(f"aegis: waiting for {run_dir} to appear", err=True)
    while not any(_exists(os.path.join(run_dir, name)) for name in (CONFIG_NAME, CHAIN_NAME)):
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{run_dir}: no such run directory yet (not made within "
                              + ("--timeout)" if given else
                                 f"{APPEAR_TIMEOUT:g}s; --timeout S waits longer)"))
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


@_run_command("endpoints")
@remote_option
@click.option("--model", "-m", metavar="NAME", help="Only this served model.")
@click.option("--router", "routed", is_flag=True, help="The routed URL of each model instead.")
@click.option("--json", "as_json", is_flag=True,
              help="Full records as JSON (schema: docs/using-endpoints.md).")
def endpoints(run: str, scheduler: str | None, platform: str | None, model: str | None,
              routed: bool, as_json: bool) -> int:
    """Print RUN's ready endpoints, one URL per line (OpenAI base URLs, .../v1).

    Exit 0 listed, 1 the run failed or ended (its launcher or job is gone: no URLs) or, with
    --router, no router is up."""
    from .run import RunError

    run_ = _need_run(_open_run(run, scheduler, platform), "aegis endpoints")
    st = run_.state()
    if st.gone:  # like `wait` and --router: an ended run serves nothing
        if model:
            run_.endpoints(model)  # a model the run does not serve is still bad input
        raise RunError(f"run {st.phase}: {st.reason}")
    if routed:
        if model:
            run_.router_url(model)  # a model the run does not serve, or no router: one line
        models = [model] if model else run_.models()
        records = [r for r in run_.routers() if r.model in models and r.state == "ready"]
        if not records:
            raise RunError(f"no router is up for {', '.join(models)} (aegis status {run} "
                           "says why)")
    else:
        records = run_.endpoints(model)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in records], indent=2))
    else:
        for r in records:
            click.echo(r.url)
    return 0


@_run_command("key")
@remote_option
def key(run: str, scheduler: str | None, platform: str | None) -> int:
    """Print the key every request to RUN's instances and routers must carry
    (Authorization: Bearer KEY; the OpenAI SDK's api_key), e.g.
    `export OPENAI_API_KEY=$(aegis key RUN)`.

    It is the value of the run's api_key_env variable when it has one (from this shell), else
    the key its launcher made in RUN/api-key (docs/security.md). Exit 1 when there is none
    yet."""
    click.echo(_need_run(_open_run(run, scheduler, platform), "aegis key").api_key())
    return 0


@_run_command("cancel")
@remote_option
@click.option("--wait", "wait_stopped", is_flag=True,
              help="Return only once the run has stopped (its job ended, or its launcher "
              "exited after stopping every instance and router).")
@click.option("--timeout", type=FiniteRange(min=0), metavar="S", default=CANCEL_WAIT,
              show_default=True, help="With --wait: give up after S seconds (exit 3).")
def cancel(run: str, scheduler: str | None, platform: str | None, wait_stopped: bool,
           timeout: float) -> int:
    """Cancel RUN: qdel/scancel a submitted job; SIGTERM a launched run's launcher (it stops
    every instance and router).

    Only through a run directory of yours that others cannot write, and only the recorded
    launcher process (pid, start time, boot id; through a pidfd). Exit 0 done or nothing to
    stop, 1 not signalled (another host, or a pid it cannot verify), 2 a run directory it will
    not act on."""
    opened = _open_run(run, scheduler, platform)
    if isinstance(opened, tuple):
        job_id, backend = opened
        backend.cancel(job_id)
        click.echo(f"aegis: cancelled job {job_id}", err=True)
        if wait_stopped:
            _await_stopped(lambda: backend.state(job_id) in ("completed", "failed", "cancelled",
                                                              "unknown"), timeout)
        return 0
    click.echo(f"aegis: {opened.cancel()}", err=True)
    if wait_stopped:
        _await_stopped(lambda: opened.state().gone, timeout)
    return 0


def _await_stopped(stopped: Callable[[], bool], timeout: float, interval: float = 0.5) -> None:
    from .run import WaitTimeout

    deadline = time.monotonic() + timeout
    while not stopped():
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"still running after {timeout:g}s (the stop goes on)")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    click.echo("aegis: stopped", err=True)


# ------------------------------------------------------------------ clients of a run


@_run_command("batch")
@remote_option
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", required=True, metavar="FILE",
              help="Answers, one JSON line each, appended. Give the same FILE again to resume: "
              "custom_ids already in it are skipped.")
@click.option("--errors", metavar="FILE",
              help="Lines that failed for good and malformed input lines, with the reason and "
              "line number; rewritten on each start, removed when empty.  "
              "[default: OUTPUT with .errors.jsonl]")
@click.option("--target", type=click.Choice(["auto", "router", "instances"]), default="auto",
              show_default=True,
              help="Where lines go: each model's router, or straight to its ready instances "
              "(auto: the router while it is up, else the instances).")
@click.option("--max-in-flight", type=click.IntRange(1, 100000), metavar="N",
              default=256, show_default=True,
              help="Requests in flight per instance (through a router: N x its ready "
              "instances). vLLM runs up to its max_num_seqs at once and queues the rest; "
              "all in flight to an instance that dies are sent again.")
@click.option("--max-retries", type=click.IntRange(0, 1000), metavar="N", default=5,
              show_default=True,
              help="Retries of a line after a connection error, timeout, 5xx, 408 or 429, each on "
              "another instance where there is one, with backoff. Other 4xx are not retried.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
              default=600, show_default=True, help="Seconds one request may take.")
@click.option("--wait-timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
              default=300, show_default=True,
              help="Seconds a model may go without a ready instance (or router) that answers "
              "before the batch stops (exit 1; run again to resume).")
@click.option("--strict", is_flag=True,
              help="Stop at the first malformed input line (exit 2); nothing after it is sent.")
@click.option("--quiet", "-q", is_flag=True, help="No progress, only the summary line.")
@click.option("--json", "as_json", is_flag=True, help="The counts as JSON on stdout.")
def batch(run: str, scheduler: str | None, platform: str | None, input_path: str, output: str,
          errors: str | None, target: str, max_in_flight: int, max_retries: int,
          timeout: float, wait_timeout: float, strict: bool, quiet: bool,
          as_json: bool) -> int:
    """Send an OpenAI batch file (JSONL: custom_id, method, url, body per line; INPUT may be
    - for stdin) over RUN's fleet, and write the answers (id, custom_id, response, error) to
    OUTPUT. Exactly once: run it again with the same -o after any stop and each custom_id ends
    up in OUTPUT once. See docs/batch.md.

    Exit 0 every line answered; 1 some lines failed (see the errors file), nothing of RUN is
    ready, or the batch stopped early (the run ended; run again to resume); 2 bad input (a
    missing run, an unwritable output, an unreadable INPUT, malformed lines, or with --strict
    the first one); 128+N stopped by signal N (run again to resume)."""
    from .clients.batch import BatchStopped

    run_ = _need_run(_open_run(run, scheduler, platform), "aegis batch")

    def say(message: str) -> None:
        click.echo(f"aegis: batch: {message}", err=True)

    try:
        counts = run_.batch(input_path, output, errors=errors, target=target,
                            max_in_flight=max_in_flight, max_retries=max_retries,
                            timeout=timeout, wait_timeout=wait_timeout, strict=strict,
                            progress=not quiet, handle_signals=True, on_start=say)
    except BatchStopped as err:
        if err.counts is not None:
            say(err.counts.summary())
            if as_json:
                click.echo(json.dumps(err.counts.to_dict(), indent=2))
        say(f"stopped: {err}; run again with the same -o to resume")
        return EXIT_FAILED
    say(counts.summary())
    if as_json:
        click.echo(json.dumps(counts.to_dict(), indent=2))
    if counts.signal:
        say(f"{counts.stopped}; run again with the same -o to resume")
        return 128 + counts.signal
    if counts.failed or counts.invalid:
        say(f"{counts.failed + counts.invalid} line(s) not answered: see {counts.errors}")
    return EXIT_FAILED if counts.failed else EXIT_BAD_INPUT if counts.invalid else 0


@main.command(name="list")
@remote_option
@click.option("--run-dir", "run_dir", metavar="DIR",
              help="Where to look.  [default: the run_dir config default, aegis-runs]")
@click.option("--json", "as_json", is_flag=True,
              help="One record per run as JSON (name, path, kind, job_id, phase, ready, total, "
              "age_s, ...).")
def list_runs(run_dir: str | None, as_json: bool) -> int:
    """The runs under a run directory, newest first: name, job id, phase, ready/total, age.

    A chain directory (submit --chain) is one entry; entries that are not runs are left out
    with a note on stderr."""
    import dataclasses as dc

    from .clients.runs import list_runs as find, table

    parent = run_dir or next(f.default for f in dc.fields(Config) if f.name == "run_dir")
    runs, notes = find(os.path.expanduser(parent))
    for note in notes:
        click.echo(f"aegis: note: {parent}/{note}", err=True)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in runs], indent=2))
    elif runs:
        click.echo(table(runs))
    else:
        click.echo(f"aegis: no runs in {parent}", err=True)
    return 0


@_run_command("metrics")
@remote_option
@click.option("--watch", metavar="S", type=FiniteRange(min=0, min_open=True),
              help="Scrape again every S seconds, with rates (tokens/s, requests/s, prefix-cache "
              "hits) over the last S seconds. On a terminal the screen refreshes in place like "
              "top (Ctrl-C quits); otherwise one line per scrape, and a line for each flag when "
              "it is raised and when it clears.")
@click.option("--json", "as_json", is_flag=True,
              help="The scrape as JSON (schema: docs/schemas/metrics.schema.json); with --watch "
              "one document per line per scrape.")
@click.option("--timeout", type=FiniteRange(min=0, min_open=True), metavar="S", default=2.0,
              show_default=True,
              help="Seconds one instance's /metrics may take (connection, headers and body); "
              "one that takes longer is flagged not_answering and the others are reported.")
@click.option("--concurrency", type=click.IntRange(1, 100000), metavar="N", default=256,
              show_default=True,
              help="Instances asked at once (a socket each; never more than the open-files "
              "limit leaves room for); an instance's --timeout starts when its turn comes. "
              "Set it to the number of instances to make hung ones cost exactly --timeout.")
@click.option("--count", type=click.IntRange(1), metavar="N",
              help="With --watch: stop after N scrapes.  [default: until Ctrl-C]")
@click.option("--instances", "rows", type=click.IntRange(0), metavar="N", default=50,
              show_default=True,
              help="Instance rows in the table, flagged ones first (0: models only).")
def metrics(run: str, scheduler: str | None, platform: str | None, watch: float | None,
            as_json: bool, timeout: float, concurrency: int, count: int | None,
            rows: int) -> int:
    """What RUN's fleet is doing: every ready instance's /metrics (vLLM's Prometheus text)
    and its routers', scraped at once. Per instance and per model: requests running and
    waiting, KV-cache usage, prompt and generation tokens/s (between two scrapes: --watch),
    finished and failed requests, prefix-cache hit rate. Flags outliers: an instance that does
    not answer (or answers something unreadable), a KV cache at 99% or more, an instance
    serving nothing while others of its model queue, a restart (counters went backwards).
    See docs/metrics.md.

    Exit 0 a scrape in which some instance answered (flags or not; with --watch: stopped by
    Ctrl-C or --count); 1 nothing of RUN is ready, no instance answered, or the run ended;
    2 bad input (a missing run, a bad option)."""
    from .clients import metrics as scraping

    run_ = _need_run(_open_run(run, scheduler, platform), "aegis metrics")
    if count is not None and watch is None:
        raise ConfigError("--count: only with --watch")
    if watch is None:
        got = run_.metrics(timeout=timeout, concurrency=concurrency)
        click.echo(json.dumps(got.to_dict(), indent=2) if as_json
                   else scraping.text_report(got, instances=rows))
        if not got.answered:
            click.echo(f"aegis: error: none of the {len(got.instances)} ready instance(s) "
                       "answered /metrics (see the flags)", err=True)
            return EXIT_FAILED
        return 0
    scrapes = scraping.watch(run_, watch, timeout=timeout, concurrency=concurrency,
                             count=count)
    try:
        if as_json:
            for got in scrapes:
                click.echo(json.dumps(got.to_dict()))
        elif sys.stdout.isatty():
            from rich.console import Console
            from rich.live import Live

            console = Console()
            with Live(console=console, auto_refresh=False, vertical_overflow="crop") as live:
                for got in scrapes:
                    live.update(scraping.rich_view(got, height=console.height), refresh=True)
        else:  # a log: a line per scrape, and each flag when it comes and when it goes
            before = None
            for got in scrapes:
                click.echo(scraping.line_report(got))
                raised, cleared = scraping.flag_changes(before, got)
                for flag in raised[:50]:
                    click.echo(f"aegis: metrics: flag {flag.kind}: {flag.model} instance "
                               f"{flag.id} ({flag.url}): {flag.message}")
                for flag in cleared[:50]:
                    click.echo(f"aegis: metrics: cleared {flag.kind}: {flag.model} instance "
                               f"{flag.id}")
                before = got
    except KeyboardInterrupt:
        return 0
    finally:
        scrapes.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()


# ------------------------------------------------------------------ remote use (docs/laptop.md)


@main.command()
@remote_option
@click.argument("model", metavar="MODEL")
@click.option("--revision", metavar="REV", help="Branch, tag or commit.  [default: main]")
@click.option("--to", "to", metavar="DIR",
              help="The hub cache to put it in (the parent of models--ORG--NAME), e.g. "
              "/lus/.../hub.  [default: huggingface_hub's: $HF_HUB_CACHE, else "
              "$HF_HOME/hub, else ~/.cache/huggingface/hub]")
@click.option("--include", "include", metavar="GLOB", multiple=True,
              help="Fetch these files too (repeatable), e.g. '*.bin'.  [default: "
              "safetensors, config, tokenizer and chat-template files]")
@click.option("--hf-token-file", "hf_token", metavar="FILE",
              type=click.Path(exists=True, dir_okay=False),
              help="Read the Hugging Face token from FILE (never give it on a command line).  "
              "[default: $HF_TOKEN, else what huggingface-cli login stored]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def fetch(model: str, revision: str | None, to: str | None, include: tuple[str, ...],
          hf_token: str | None, quiet: bool) -> int:
    """Fetch MODEL (ORG/NAME) from the Hugging Face hub into a hub cache, in the layout
    model_source serves (models--ORG--NAME: blobs, refs, snapshots); print the model_source
    to use. Only what is missing moves: run it again after any stop and it goes on.

    With --remote it runs on the login node (where the weights belong; the token file is
    sent over the connection). Exit 0 fetched (or already there), 1 the transfer failed, 2 bad
    input: an unknown model or revision, or a gated one without a token that has access (the
    message says which setting to use)."""
    from .weights import DEFAULT_PATTERNS, fetch as get, token_from

    token = None
    if hf_token:
        try:
            token = read_small_file(hf_token, MAX_TOKEN_BYTES).strip()
        except (OSError, UnicodeDecodeError, FileTooLarge) as err:
            raise ConfigError(f"--hf-token-file: cannot read {hf_token}: "
                              f"{why_unreadable(err)}") from None
    token, source = (token, "--hf-token-file") if token else token_from(None)
    done = get(model, revision=revision, cache_dir=to, token=token, token_source=source,
               patterns=DEFAULT_PATTERNS + include, progress=not quiet,
               say=lambda line: click.echo(f"aegis: fetch: {line}", err=True))
    click.echo(f"aegis: fetch: {done.model}: {_fetched(done)}", err=True)
    click.echo(done.model_source)
    return 0


@main.command()
@click.argument("run", metavar="RUN")
@click.option("--model", "-m", metavar="NAME",
              help="The served model to reach (needed when RUN serves several).")
@click.option("--local-port", type=click.IntRange(0, 65535), default=0, metavar="PORT",
              help="Port on 127.0.0.1 here.  [default: a free one, printed]")
@click.option("--remote", metavar="[USER@]HOST",
              help="The login node to tunnel through.  [default: $AEGIS_REMOTE]")
@click.option("--remote-aegis", metavar="CMD",
              help="How to start aegis on the login node.  [default: $AEGIS_REMOTE_AEGIS, "
              "else aegis]")
def forward(run: str, model: str | None, local_port: int, remote: str | None,
            remote_aegis: str | None) -> int:
    """Tunnel from this machine through the login node to RUN's router (or, for a model
    without one, a ready instance) on its compute node; print http://127.0.0.1:PORT/v1 for an
    OpenAI client here. Requests need the run's key: export OPENAI_API_KEY=$(aegis key
    --remote HOST RUN).

    RUN is a run directory on the login node. Holds until Ctrl-C; follows the router when a
    chain's next generation takes over; opens again after the connection drops. Exit 0 on
    Ctrl-C, 1 the run ended, 2 bad input (the port is taken, RUN is no run, a model it does
    not serve), 4 the login node cannot be reached at the start."""
    import shlex
    import signal as signals

    from .clients.forward import Tunnel, remote_status
    from .remote import Remote, resolve, resolve_aegis

    target = resolve(remote)
    if target is None:
        raise ConfigError("aegis forward needs the login node: --remote [USER@]HOST, or "
                          "AEGIS_REMOTE")
    login = Remote(target, resolve_aegis(remote_aegis))

    def say(line: str) -> None:
        click.echo(f"aegis: forward: {line}", err=True)

    tunnel = Tunnel(login, remote_status(login, run), model=model, local_port=local_port,
                    say=say)
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    for signum in (signals.SIGINT, signals.SIGTERM):  # SIGINT too: a shell's `cmd &` ignores it
        signals.signal(signum, interrupted)  # every ssh -W goes with the tunnel
    try:
        tunnel.wait_target()
        click.echo(tunnel.url)
        sys.stdout.flush()
        say(f"requests need the run's key: export OPENAI_API_KEY=$(aegis key --remote "
            f"{target} {shlex.quote(run)}); Ctrl-C ends the tunnel")
        tunnel.serve()
    except KeyboardInterrupt:
        say("stopped")
        return 0
    finally:
        tunnel.stop()
    return 0
