"""In-allocation launcher: one MPI rank per node turns the plan into verified vLLM servers.

    aegis launch -c FILE [flags]          (starts the MPI job itself unless already under MPI)
    python -m aegis.launch -c FILE ...    (one rank; run it under mpiexec/srun, one per node)

Every config key is a flag (aegis.cli builds them from aegis.config.KEYS); the launcher's own
options (where the nodes are, this run's directory, --once) are LaunchOptions.
Public API: launch(config, options) and main(argv) -> exit code; run_rank = main.
Exit codes: 0 all ready (or a partial start allowed), 1 failed run, 2 bad input,
128+N stopped by signal N.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import (DEFAULT_PORT_START, Config, ConfigError, FileTooLarge, read_small_file,
                      why_unreadable)
from ..credential import GENERATED_KEY_VAR, CredentialError, key_for_run
from ..layout import API_KEY_NAME, RunLayout
from ..model_source import check_models
from ..plan import Plan, make_plan
from ..platforms import Platform, get_platform
from .addresses import host_ip, interface_ipv4, serving_address
from .allocation import (MAX_NODEFILE_BYTES, Allocation, AllocationError, check_enough,
                         find_allocation)
from .caches import instance_cache_dir, job_cache_root
from .environment import Runtime
from .endpoints import EndpointsFile, InstanceState
from .instances import build_part, model_arg, part_name, staged_model_dir
from .node import prepare_runtime, prewarm, runtime_problem
from .pernode import remove_job_caches
from .processes import bind_problem, port_in_use
from . import chain
from .supervise import LocalFleet
from .walltime import job_end, schedule

__all__ = ["LaunchOptions", "launch", "main", "run_rank", "under_mpi"]

PROG = "aegis launch"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# Set in the environment of the ranks `aegis launch` starts, so they never start another job.
RANK_MARKER = "AEGIS_LAUNCH_RANKS"
# What MPI launchers set in every rank; each batch system adds its own (Backend.rank_count_vars).
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


class UsageError(Exception):
    """A user mistake: printed as one line, exit 2."""


@dataclass(frozen=True)
class LaunchOptions:
    """What `aegis launch` takes besides the config: where the nodes and the run go."""

    nodes: str | None = None  # node names in rank order (a,b or node[1-4])
    nodefile: str | None = None  # one node name per line
    run_dir: str | None = None  # this run's directory (default: <config run_dir>/<job id>)
    bind_host: str | None = None  # address instances listen on (default: the node's)
    once: bool = False  # start, verify, write endpoints, stop and exit with the status

    def argv(self) -> list[str]:
        """These options as `aegis launch` flags (for the ranks it starts)."""
        out: list[str] = []
        for flag, value in (("--nodes", self.nodes), ("--nodefile", self.nodefile),
                            ("--run-dir", self.run_dir), ("--bind-host", self.bind_host)):
            if value is not None:
                out += [flag, value]
        return out + (["--once"] if self.once else [])


def _log(rank: int | None, msg: str) -> None:
    """A progress line on stderr, with the time (a launch runs for hours; its log is read
    afterwards). Errors (_error) stay one plain line, like every aegis error."""
    who = PROG if rank is None else f"{PROG} [rank {rank}]"
    print(f"{time.strftime('%H:%M:%S')} {who}: {msg}", file=sys.stderr, flush=True)


def _error(msg: str) -> None:
    for line in msg.splitlines():  # a ConfigError may name several problems, one a line
        print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """`aegis launch ARGS` (also `python -m aegis.launch ARGS`): parse with the CLI, run."""
    from ..cli import main as cli

    argv = list(sys.argv[1:] if argv is None else argv)
    return cli.main(["launch", *argv], prog_name="aegis", standalone_mode=False)


run_rank = main  # one rank under MPI: the same entry (launch() sees the MPI environment)


# --- pure preparation: same answer on every rank ---

@dataclass(frozen=True)
class Prepared:
    options: LaunchOptions
    config: Config
    platform: Platform
    plan: Plan
    allocation: Allocation
    config_path: str | None  # the file the config came from (None: flags only)
    api_key: str | None


def prepare(config: Config, options: LaunchOptions, env, config_path: str | None) -> Prepared:
    """Plan and find the nodes. Raises UsageError/ConfigError/AllocationError."""
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
    start the MPI job of launcher ranks (one per node) on a resolved copy of the config."""
    env = os.environ if env is None else env
    try:
        prepared = prepare(config, options, env, config_path)
        if under_mpi(env):
            return _run_rank(prepared)
        if config.port_start is None and config.platform == "local":
            # No ports given: free ones on this machine (every local "node" is this machine).
            config = config.replace(port_start=free_port_start(config.http_ports))
            prepared = dataclasses.replace(prepared, config=config,
                                           plan=make_plan(config, prepared.platform))
    except (UsageError, ConfigError, AllocationError) as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    plan, platform = prepared.plan, prepared.platform
    if plan.nodes_needed <= 1:
        return _run_rank(prepared)
    cmd0 = platform.launcher_argv(plan.nodes_needed)[0]
    if shutil.which(cmd0) is None:
        _error(f"rank launcher {cmd0!r} (platform {platform.name}) not found on PATH")
        return EXIT_BAD_INPUT
    # The ranks run the resolved config (flags, free ports) from a file beside the run
    # directory's; rank 0 then writes it into the run directory as config.yaml.
    run_dir = os.path.abspath(options.run_dir or os.path.join(config.run_dir, _job_id(env)))
    problems = _unwritable(run_dir, Path(RunLayout(run_dir).endpoints(config.endpoints_file)),
                           "--run-dir" if options.run_dir else "run_dir")
    if problems:
        for line in problems:
            _error(line)
        return EXIT_BAD_INPUT
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    resolved = RunLayout(run_dir).config
    _write_config(config, RunLayout(run_dir))
    argv = ["--config", resolved, *dataclasses.replace(options, run_dir=run_dir).argv()]
    cmd = rank_launch_argv(platform, plan.nodes_needed, argv)
    _log(None, f"starting {plan.nodes_needed} ranks: {' '.join(cmd[:-len(argv)])} ...")
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, {**env, RANK_MARKER: str(plan.nodes_needed)})
    return EXIT_FAILED  # not reached


def _write_config(config: Config, layout: RunLayout) -> None:
    """config.yaml in the run directory: what the ranks run and `aegis status` reads."""
    from ..scheduler.submit import write_resolved_config

    write_resolved_config(config, layout)


def _same_file(a: str | None, b: str) -> bool:
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False


# --- one rank ---

class _StopFlag:
    def __init__(self):
        self.signum = 0

    def __call__(self, signum, _frame):
        self.signum = self.signum or signum


def _job_id(env) -> str:
    from ..scheduler import job_id_in

    return (job_id_in(env) or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def _run_rank(prepared: Prepared) -> int:
    """One launcher rank. Every check that can fail on bad input runs before anything starts,
    and each rank reaches the same verdict without talking to the others."""
    # Node-local storage: $VARS in it ($TMPDIR, /mnt/bb/$USER) expand on each node.
    config = prepared.config
    prepared = dataclasses.replace(prepared, config=config.replace(
        hf_home=os.path.expandvars(config.hf_home),
        node_local_dir=os.path.expandvars(config.node_local_dir)))
    plan = prepared.plan

    from mpi4py import MPI  # after the input checks: a usage error needs no MPI

    from .collective import Collective

    coll = Collective(MPI.COMM_WORLD)
    rank = coll.rank
    if coll.size < plan.nodes_needed:
        _error(f"the plan needs {plan.nodes_needed} node(s), one launcher rank each, but this "
               f"MPI job has {coll.size} rank(s)")
        return EXIT_BAD_INPUT

    stop = _StopFlag()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(prepared, coll, stop)
    except Exception as e:  # a bug or an environment failure: never leave ranks hanging
        _log(rank, f"internal error: {type(e).__name__}: {e}")
        import traceback

        traceback.print_exc(file=sys.stderr)
        coll.abort(EXIT_FAILED)
        return EXIT_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cannot_write(directory: Path) -> str | None:
    """Why files cannot be created in `directory` (made later if missing), or None. Creates
    nothing that stays: a refused launch leaves no half-made run directory behind."""
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


def _unwritable(run_dir: str, endpoints: Path, run_dir_flag: str) -> list[str]:
    """Rank 0, before anything starts: the run directory and the endpoints file must be
    writable (a launch that cannot report its endpoints is of no use)."""
    problem = _cannot_write(Path(run_dir))
    if problem:
        return [f"{run_dir_flag} {run_dir}: {problem}"]
    problem = _cannot_write(endpoints.parent)
    if problem:
        return [f"endpoints_file {endpoints}: {problem}"]
    return [f"endpoints_file {endpoints}: {path} is a directory"
            for path in (endpoints, endpoints.with_suffix(".txt")) if path.is_dir()]


def _run(prepared: Prepared, coll, stop) -> int:
    config, platform, plan, allocation = (prepared.config, prepared.platform, prepared.plan,
                                          prepared.allocation)
    args = prepared.options
    rank = coll.rank
    log = (lambda msg: _log(rank, msg))
    mine = plan.on_node(rank)
    job = coll.bcast(_job_id(os.environ) if rank == 0 else None)  # a local id has rank 0's pid
    run_dir = coll.bcast(os.path.abspath(args.run_dir or os.path.join(config.run_dir, job))
                         if rank == 0 else None)
    layout = RunLayout(run_dir)
    endpoints_path = Path(layout.endpoints(config.endpoints_file))

    # Preflight, before anything is written, moved or started: each rank checks what depends
    # on its node, rank 0 what is shared, and every rank reaches the same verdict.
    bad_input: list[str] = []
    node = allocation.nodes[rank] if rank < len(allocation.nodes) else f"rank {rank}"
    if mine and not (config.env_source or config.container):  # else checked once in place
        bad_input += [p for p in [runtime_problem(config, Runtime(), node)] if p]
    sources = None
    if rank == 0:
        bad_input += _unwritable(run_dir, endpoints_path,
                                 "--run-dir" if args.run_dir else "run_dir")
        # The root of every broadcast reads the model sources: check them there, before any
        # byte moves (a hub-cache layout, one snapshot, a plain directory: aegis.model_source).
        sources, problems, _ = check_models(config.models)
        bad_input += problems
    sources = coll.bcast(sources)
    addresses, host_ips, problem = _serving_addresses(coll, platform, allocation)
    bad_input += [problem] if problem else []
    cache_root = job_cache_root(config.node_local_dir, job)

    def make_parts(runtime: Runtime) -> list:
        return [build_part(instance=inst, model=config.models[inst.model_index], config=config,
                           platform=platform, node_index=rank, hosts=list(allocation.nodes),
                           addresses=addresses, host_ips=host_ips, bind_host=args.bind_host,
                           run_dir=run_dir, cache_root=cache_root, runtime=runtime,
                           source=sources[inst.model_index])
                for inst in mine]

    parts = make_parts(Runtime())
    # A port already taken: without allow_partial nothing is started anywhere (with it, the
    # fleet reports those instances failed and starts the rest). An address that cannot be
    # listened on at all is bad input either way.
    taken = []
    for part in parts:
        problem = bind_problem(part.bind_host, part.port) if part.is_head else None
        if problem and not problem.in_use:
            bad_input.append(f"{problem.message} ({allocation.nodes[rank]})")
        elif problem and not config.allow_partial:
            taken.append(f"port {part.port} on {part.bind_host} ({allocation.nodes[rank]}) is "
                         "already in use")
    verdicts = coll.allgather((bad_input, taken))
    bad_input = sorted({line for bad, _ in verdicts for line in bad})
    taken = [line for _, per_rank in verdicts for line in per_rank]
    if bad_input or taken:
        if rank == 0:
            for line in bad_input or taken:
                _error(line)
            if not bad_input:
                _error("nothing started (allow_partial would start the other instances)")
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILED

    endpoints = None
    problem = None
    api_key = prepared.api_key
    if rank == 0:
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            endpoints_path.parent.mkdir(parents=True, exist_ok=True)
            if not _same_file(prepared.config_path, layout.config):
                _write_config(prepared.config, layout)  # what `aegis status` and Run read
            mirror = chain.from_environment(os.environ)  # submit --chain
            if api_key is None:  # no api_key_env: the run's own key (a chain's: one for all)
                api_key = key_for_run(str(mirror.dir / API_KEY_NAME) if mirror else
                                      layout.api_key)
            endpoints = EndpointsFile(endpoints_path, run_dir=run_dir, job=job, ranks=coll.size)
            endpoints.mirror = mirror
            endpoints.update(_planned_states(plan, allocation, layout), state="staging",
                             must_write=True)
        except OSError as e:  # what the preflight could not foresee (a race, a full disk)
            problem = f"cannot write {e.filename or endpoints_path}: {e.strerror or e}"
        except CredentialError as e:
            problem = str(e)
    problem = coll.bcast(problem)
    if problem:
        if rank == 0:
            _error(problem)
        return EXIT_BAD_INPUT
    if prepared.api_key is None:  # instances read it from their environment
        api_key = coll.bcast(api_key)
        os.environ[GENERATED_KEY_VAR] = api_key
    if rank == 0:
        endpoints.start_heartbeat()
        _release_successor(config, log)
        log(f"{len(plan.instances)} instance(s) on {plan.nodes_needed} node(s) from "
            f"{allocation.source}; run directory {run_dir}; endpoints {endpoints_path}")
    board = None
    if rank == 0:
        from .board import Board

        board = Board(config, plan, endpoints, layout=layout,
                      router_host=args.bind_host or host_ips[0],
                      router_node=addresses[0], api_key=api_key, log=log)
    code = EXIT_FAILED
    try:
        code = _stage_and_serve(args, config, platform, coll, stop, api_key, sources,
                                make_parts, cache_root, node, run_dir, board, log)
        return code
    finally:
        if board is not None:  # rank 0, also on an internal error: nothing is served now
            board.finish("stopped" if code == EXIT_OK or code > 128 else "failed", code)


def _planned_states(plan, allocation, layout: RunLayout) -> list[InstanceState]:
    """Every planned instance before anything starts (state pending)."""
    return [InstanceState(
        id=inst.id, model=inst.model, served_name=inst.served_name, node=inst.nodes[0],
        host=allocation.nodes[inst.nodes[0]], port=inst.port, state="pending",
        log=layout.instance_log(part_name(inst.id, 0, len(inst.nodes))))
        for inst in plan.instances]


def _serving_addresses(coll, platform, allocation) -> tuple[list[str], list[str], str | None]:
    """Collective: each rank forms its own node's serving address (an interface's address can
    only be read on the node) and resolves it; everyone learns all of them (a multi-node
    instance needs its head's). -> (addresses, their IPs, this rank's problem or None)."""
    rank, nodes = coll.rank, allocation.nodes
    mine = problem = None
    if rank < len(nodes):
        try:
            address = serving_address(platform.address, nodes[rank], interface_ipv4)
            mine = (address, host_ip(address))
        except OSError as e:
            problem = f"serving address of {nodes[rank]} ({platform.address}): {e}"
    known = dict(enumerate(coll.allgather(mine)))
    addresses = [known[i][0] if known.get(i) else h for i, h in enumerate(nodes)]
    host_ips = [known[i][1] if known.get(i) else h for i, h in enumerate(nodes)]
    return addresses, host_ips, problem


def _agreed(coll, problem: str | None) -> bool:
    """Collective: True when no rank has a problem; else rank 0 prints each once."""
    problems = sorted({p for p in coll.allgather(problem) if p})
    if problems and coll.rank == 0:
        for p in problems:
            _error(p)
    return not problems


def _stage_tuning(config: Config, stage) -> dict:
    """The stage_* keys that are set, as the keyword arguments the installed stage() takes."""
    import inspect

    accepted = inspect.signature(stage).parameters
    tuning = {"chunk_size": config.stage_chunk_size, "depth": config.stage_depth,
              "stall_timeout": config.stage_stall_timeout, "readers": config.stage_readers}
    return {k: v for k, v in tuning.items() if v is not None and k in accepted}


def _sweep_node(node_local_dir: str, cache_root: Path, node_log) -> None:
    """Record this rank as a user of its job's node-local caches, and remove what earlier
    runs left on the node (aegis.launch.leftovers) before staging fills it again. A problem
    here is a warning: it never stops the launch."""
    from .leftovers import claim, sweep

    try:  # no lock: a sweep removes only what no live process owns, so two may run at once
        claim(cache_root)
        removed = sweep(node_local_dir, cache_root)
    except OSError as e:
        node_log(f"warning: cleaning up after earlier runs: {e}")
        return
    for line in removed:
        node_log(f"removed {line}")


def _stage_and_serve(args, config, platform, coll, stop, api_key, sources, make_parts,
                     cache_root, node, run_dir, board, log) -> int:
    rank = coll.rank
    _sweep_node(config.node_local_dir, cache_root, log)
    coll.barrier()
    # Per node, once: stage each model source into the node-local cache (collective).
    for model, source in zip(config.models, sources):
        if source and not stop.signum:
            from ..bcast import StagingError, stage

            dest = staged_model_dir(config.hf_home, model.name)
            try:
                result = stage(source.stage_root, dest, coll.comm, writers="node",
                               progress=rank == 0, **_stage_tuning(config, stage))
            except StagingError as e:
                if rank == 0:
                    _error(f"staging {source.stage_root} -> {dest} failed: {e}")
                return 128 + stop.signum if stop.signum else EXIT_FAILED
            if rank == 0:
                how = ("unchanged, not moved" if result.cached else
                       f"{result.bytes / 1e6:.1f} MB in {result.seconds:.1f}s")
                log(f"staged {source.stage_root} -> {dest} ({how}); {model.served_name} "
                    f"loads {source.served_path(dest)} ({source.form} model_source)")

    # The environment or image, once per node; then the pre-warm, once per node.
    runtime, problem, bad_input = prepare_runtime(config, platform, coll, cache_root, node,
                                                  timeout=config.startup_timeout, stop=stop,
                                                  log=log if rank == 0 else None,
                                                  node_log=log)
    if not _agreed(coll, problem):
        return 128 + stop.signum if stop.signum else (EXIT_BAD_INPUT if bad_input else
                                                       EXIT_FAILED)
    parts = make_parts(runtime)
    by_name = {m.name: m for m in config.models}
    by_source = {m.name: s for m, s in zip(config.models, sources)}
    try:
        problem = None
        if parts and not stop.signum:
            problem = prewarm(config, platform, cache_root, runtime, node, rank, run_dir,
                              [model_arg(config, by_name[p.model], by_source[p.model])
                               for p in parts],
                              stop=stop, log=log)
        if not _agreed(coll, problem):
            return 128 + stop.signum if stop.signum else EXIT_FAILED
        fleet = LocalFleet(parts, startup_timeout=config.startup_timeout,
                           max_restarts=config.max_restarts,
                           restart_backoff=config.restart_backoff,
                           liveness_interval=config.liveness_interval,
                           liveness_failures=config.liveness_failures,
                           probe_timeout=config.probe_timeout, stop_grace=config.stop_grace,
                           api_key=api_key, log=log)
        try:
            return _serve(args, config, coll, fleet, stop, board, log)
        finally:
            fleet.stop()
    finally:
        remove_job_caches(cache_root, [instance_cache_dir(cache_root, p.name) for p in parts])


def _serve(args, config, coll, fleet, stop, board, log) -> int:
    """Start, verify, supervise. Every tick each rank sends rank 0 its instances' states when
    they changed; rank 0 (the Board) rewrites the endpoints file, keeps the routers in step and
    prints progress. From the moment a stop is decided nothing is listed as ready."""
    rank = coll.rank
    sent: list | None = None

    def share(states) -> None:
        nonlocal sent
        per_rank = coll.gather(states if states != sent else None)
        sent = states
        if board is not None:
            board.update({r: s for r, s in enumerate(per_rank) if s is not None})

    def tick(started: float) -> None:
        time.sleep(max(0.0, config.poll_interval - (time.monotonic() - started)))

    # The job's end, when known: drain, then stop cleanly before the scheduler's kill.
    walltime = coll.bcast(_walltime_schedule(config, log) if rank == 0 else None)

    def walltime_phase() -> int:
        """0 before the drain, 1 draining, 2 time to stop (the same on every rank once
        gathered: the largest counts)."""
        now = time.time()
        return 0 if walltime is None else (now >= walltime.drain_at) + (now >= walltime.stop_at)

    def walltime_stop() -> int:
        log(f"walltime: stopping cleanly, {walltime.end - time.time():.0f}s before the "
            "job's end")
        if board is not None:
            board.stopping()
        fleet.stop()
        share(fleet.states(stopped=True))
        return EXIT_OK

    if not stop.signum:
        fleet.start_all()
    if board is not None:
        board.starting()
    # Startup: until every instance is ready or failed everywhere, or a stop is requested.
    while True:
        started = time.monotonic()
        if not stop.signum:
            fleet.step()
        share(fleet.states())
        if board is not None:
            board.progress()
        flags = coll.allgather((stop.signum, fleet.decided(), walltime_phase()))
        signum = max(f[0] for f in flags)
        if not signum and max(f[2] for f in flags) == 2:
            return walltime_stop()  # the job ends before the fleet was ever ready
        if signum or all(f[1] for f in flags):
            break
        tick(started)

    def stopped(signum: int) -> int:
        log(f"stopping on signal {signum}")
        if board is not None:
            board.stopping()
        fleet.stop()
        share(fleet.states(stopped=True))
        if board is not None:
            board.report()
        return 128 + signum

    if signum:
        return stopped(signum)

    verdict = None
    if board is not None:
        board.report()
        verdict = board.verdict()
        if verdict and not args.once:
            board.serving()
        else:  # everything is stopped next (_run's finally): never list it as ready
            board.stopping()
    ok = coll.bcast(verdict)
    if args.once or not ok:  # _run's finally stops the fleet
        return EXIT_OK if ok else EXIT_FAILED

    # Supervise until the job ends (signal, or the walltime schedule) or nothing can come back.
    is_draining = False
    while True:
        started = time.monotonic()
        if not stop.signum:
            fleet.step()
        share(fleet.states())
        flags = coll.allgather((stop.signum, fleet.recoverable(), walltime_phase()))
        signum = max(f[0] for f in flags)
        if signum:
            return stopped(signum)
        due = max(f[2] for f in flags)
        if due == 2:
            return walltime_stop()
        if due == 1 and not is_draining:
            is_draining = True
            if board is not None:
                log(f"walltime: draining (no new requests); stopping in "
                    f"{walltime.stop_at - time.time():.0f}s")
                board.draining()
        if sum(f[1] for f in flags) == 0:
            if board is not None:
                log("every instance has failed; giving up")
                board.stopping()
                board.report()
            return EXIT_FAILED
        tick(started)


def _release_successor(config, log) -> None:
    """Rank 0 of a chained generation on PBS: the successor was queued held; now that this
    job's end is known, set its start (end - chain_overlap) and release it."""
    mirror = chain.from_environment(os.environ)
    end = job_end(os.environ, config.walltime)
    following = mirror and chain.successor(mirror.dir, mirror.generation)
    if not following or end is None:
        return
    from ..scheduler import SchedulerError, get_backend

    start_at = end - config.chain_overlap
    try:
        get_backend(config.effective_scheduler).release_successor(following, start_at)
    except SchedulerError as e:
        log(f"warning: cannot release the next generation (job {following}): {e}")
        return
    log(f"next generation: job {following} may start at "
        f"{time.strftime('%H:%M:%S', time.localtime(start_at))}")


def _walltime_schedule(config, log):
    """Rank 0: when to drain and stop before the job's end (None: the end is unknown)."""
    end = job_end(os.environ, config.walltime)
    if end is None:
        return None
    plan = schedule(end, drain_seconds=config.drain_seconds, stop_grace=config.stop_grace)
    log(f"job ends at {time.strftime('%H:%M:%S', time.localtime(end))}: draining "
        f"{plan.end - plan.drain_at:.0f}s before, stopped {plan.end - plan.stop_at:.0f}s before")
    return plan
