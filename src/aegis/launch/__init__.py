"""In-allocation launcher: one MPI rank per node turns the plan into verified vLLM servers.

    aegis launch --config FILE            (starts the MPI job itself unless already under MPI)
    python -m aegis.launch --config FILE  (one rank; run it under mpiexec/srun, one per node)

Public API: main(argv) -> exit code (the `aegis launch` command), run_rank(argv) -> exit code.
Exit codes: 0 all ready (or a partial start allowed), 1 failed run, 2 bad input,
128+N stopped by signal N.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from ..config import (Config, ConfigError, FileTooLarge, check_seconds, load_config,
                      read_small_file, why_unreadable)
from ..model_source import check_models
from ..plan import Plan, make_plan
from ..platforms import Platform, get_platform
from .addresses import host_ip, interface_ipv4, serving_address
from .allocation import (MAX_NODEFILE_BYTES, Allocation, AllocationError, check_enough,
                         find_allocation)
from .caches import instance_cache_dir, job_cache_root
from .environment import Runtime
from .endpoints import (EndpointsFile, InstanceState, draining, failure_report, merge_parts,
                        none_serving, summary_table)
from .instances import build_part, model_arg, part_name, staged_model_dir
from .node import prepare_runtime, prewarm, runtime_problem
from .pernode import remove_job_caches
from .processes import bind_problem
from . import chain
from .supervise import LocalFleet
from .walltime import job_end, schedule

__all__ = ["main", "run_rank", "under_mpi"]

PROG = "aegis launch"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# Set in the environment of the ranks `aegis launch` starts, so they never start another job.
RANK_MARKER = "AEGIS_LAUNCH_RANKS"
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS",
              "SLURM_STEP_NUM_TASKS")


class UsageError(Exception):
    """A user mistake: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter, description="Start the planned vLLM instances on this allocation, "
                "verify them, write the endpoints file and supervise them until the job ends.")
    p.add_argument("-c", "--config", required=True, help="deployment YAML")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nodes", help="node names in rank order (a,b or node[1-4])")
    where.add_argument("--nodefile", help="file with one node name per line (duplicates folded)")
    p.add_argument("--run-dir", help="directory for scripts, logs, endpoints "
                   "(default: <config run_dir>/<job id>)")
    p.add_argument("--bind-host", help="address instances listen on (default: the node's address)")
    p.add_argument("--platform", help="override the config's platform")
    p.add_argument("--vllm-command", help="override the config's vllm_command")
    p.add_argument("--startup-timeout", type=float, help="seconds an instance may take to be ready")
    p.add_argument("--max-restarts", type=int, help="restarts per crashed instance")
    p.add_argument("--allow-partial", action="store_true", default=None,
                   help="succeed when at least one instance is ready")
    p.add_argument("--once", "--exit-when-ready", dest="once", action="store_true",
                   help="start, verify, write endpoints, stop everything and exit with the status")
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between checks (<= 1)")
    p.add_argument("--stop-grace", type=float, default=15.0,
                   help="seconds between TERM and KILL when stopping instances")
    p.add_argument("--restart-backoff", type=float, default=2.0,
                   help="first restart delay in seconds; doubles per restart")
    p.add_argument("--probe-timeout", type=float, default=5.0,
                   help="seconds one readiness/liveness check may take")
    p.add_argument("--liveness-interval", type=float, default=30.0,
                   help="seconds between checks of a ready instance; 3 failed checks in a row "
                   "count as hung (stopped and restarted)")
    return p


def _log(rank: int | None, msg: str) -> None:
    who = PROG if rank is None else f"{PROG} [rank {rank}]"
    print(f"{who}: {msg}", file=sys.stderr, flush=True)


def _error(msg: str) -> None:
    for line in msg.splitlines():  # a ConfigError may name several problems, one a line
        print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)


# --- pure preparation: same answer on every rank ---

def prepare(argv: list[str], env) -> tuple[argparse.Namespace, Config, Platform, Plan, Allocation]:
    """Parse, load, plan, find the nodes. Raises UsageError/ConfigError/AllocationError."""
    args = build_parser().parse_args(argv)
    for flag, value, maximum in (("--poll-interval", args.poll_interval, 1),
                                 ("--stop-grace", args.stop_grace, 3600),
                                 ("--restart-backoff", args.restart_backoff, 3600),
                                 ("--probe-timeout", args.probe_timeout, 3600),
                                 ("--liveness-interval", args.liveness_interval, 86400)):
        check_seconds(flag, value, maximum)
    overrides = {"platform": args.platform, "vllm_command": args.vllm_command,
                 "startup_timeout": args.startup_timeout, "max_restarts": args.max_restarts,
                 "allow_partial": args.allow_partial}
    config = load_config(args.config, overrides)
    platform = get_platform(config.platform)  # validated by load_config
    plan = make_plan(config, platform)
    nodefile_text = None
    if args.nodefile:
        try:
            nodefile_text = read_small_file(args.nodefile, MAX_NODEFILE_BYTES)
        except (OSError, UnicodeDecodeError, FileTooLarge) as e:
            raise UsageError(f"--nodefile {args.nodefile}: {why_unreadable(e)}") from None
    allocation = find_allocation(
        nodes=args.nodes, nodefile_text=nodefile_text, nodefile_name=args.nodefile, env=env,
        read_file=lambda p: read_small_file(p, MAX_NODEFILE_BYTES), local_count=plan.nodes_needed)
    check_enough(allocation, plan.nodes_needed)
    return args, config, platform, plan, allocation


def _prepare_or_exit_code(argv: list[str]):
    """prepare(), or the exit code when it stops: bad input (one line, 2) or --help (0)."""
    try:
        return prepare(argv, os.environ)
    except (UsageError, ConfigError, AllocationError) as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK


def under_mpi(env) -> bool:
    if env.get(RANK_MARKER):
        return True
    for var in _SIZE_VARS:
        try:
            if int(env.get(var, "0")) > 1:
                return True
        except ValueError:
            pass
    return False


def rank_launch_argv(platform: Platform, nodes: int, argv: list[str]) -> list[str]:
    """The MPI job that runs one `python -m aegis.launch` per node."""
    return [*platform.launcher_argv(nodes), sys.executable, "-m", "aegis.launch", *argv]


def main(argv: list[str] | None = None) -> int:
    """`aegis launch`: run the MPI job of launcher ranks, or be a rank when already inside one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if under_mpi(os.environ):
        return run_rank(argv)
    prepared = _prepare_or_exit_code(argv)
    if isinstance(prepared, int):
        return prepared
    _args, _config, platform, plan, _allocation = prepared
    if plan.nodes_needed <= 1:
        return _run_prepared(prepared)
    cmd = rank_launch_argv(platform, plan.nodes_needed, argv)
    if shutil.which(cmd[0]) is None:
        _error(f"rank launcher {cmd[0]!r} (platform {platform.name}) not found on PATH")
        return EXIT_BAD_INPUT
    _log(None, f"starting {plan.nodes_needed} ranks: {' '.join(cmd[:-len(argv) or None])} ...")
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, {**os.environ, RANK_MARKER: str(plan.nodes_needed)})
    return EXIT_FAILED  # not reached


# --- one rank ---

class _StopFlag:
    def __init__(self):
        self.signum = 0

    def __call__(self, signum, _frame):
        self.signum = self.signum or signum


def _job_id(env) -> str:
    return (env.get("PBS_JOBID") or env.get("SLURM_JOB_ID")
            or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def run_rank(argv: list[str]) -> int:
    """One launcher rank. Every check that can fail on bad input runs before anything starts,
    and each rank reaches the same verdict without talking to the others."""
    prepared = _prepare_or_exit_code(argv)
    return prepared if isinstance(prepared, int) else _run_prepared(prepared)


def _run_prepared(prepared) -> int:
    args, config, platform, plan, allocation = prepared
    # hf_home is node-local storage: $VARS in it ($TMPDIR, /mnt/bb/$USER) expand on each node.
    config = dataclasses.replace(config, hf_home=os.path.expandvars(config.hf_home),
                                 node_local_dir=os.path.expandvars(config.node_local_dir))
    api_key = None
    if config.api_key_env:
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            _error(f"api_key_env: environment variable {config.api_key_env} is not set or empty")
            return EXIT_BAD_INPUT

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
        return _run(args, config, platform, plan, allocation, coll, stop, api_key)
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


def _run(args, config, platform, plan, allocation, coll, stop, api_key) -> int:
    rank = coll.rank
    log = (lambda msg: _log(rank, msg))
    mine = plan.on_node(rank)
    job = coll.bcast(_job_id(os.environ) if rank == 0 else None)  # a local id has rank 0's pid
    run_dir = coll.bcast(os.path.abspath(args.run_dir or os.path.join(config.run_dir, job))
                         if rank == 0 else None)
    endpoints_path = Path(run_dir) / config.endpoints_file  # an absolute path stays as it is

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
    if rank == 0:
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            endpoints_path.parent.mkdir(parents=True, exist_ok=True)
            endpoints = EndpointsFile(endpoints_path, run_dir=run_dir, job=job, ranks=coll.size)
            endpoints.mirror = chain.from_environment(os.environ)  # submit --chain
            endpoints.update(_planned_states(plan, allocation, run_dir), state="staging",
                             must_write=True)
        except OSError as e:  # what the preflight could not foresee (a race, a full disk)
            problem = f"cannot write {e.filename or endpoints_path}: {e.strerror or e}"
    problem = coll.bcast(problem)
    if problem:
        if rank == 0:
            _error(problem)
        return EXIT_BAD_INPUT
    if rank == 0:
        endpoints.start_heartbeat()
        _release_successor(config, log)
        log(f"{len(plan.instances)} instance(s) on {plan.nodes_needed} node(s) from "
            f"{allocation.source}; run directory {run_dir}; endpoints {endpoints_path}")
    code = EXIT_FAILED
    try:
        code = _stage_and_serve(args, config, platform, coll, stop, api_key, sources, make_parts,
                                cache_root, node, run_dir, endpoints, log)
        return code
    finally:
        if endpoints is not None:  # rank 0, also on an internal error: nothing is served now
            endpoints.finish("stopped" if code == EXIT_OK or code > 128 else "failed", code)


def _planned_states(plan, allocation, run_dir) -> list[InstanceState]:
    """Every planned instance before anything starts (state pending)."""
    return [InstanceState(
        id=inst.id, model=inst.model, served_name=inst.served_name, node=inst.nodes[0],
        host=allocation.nodes[inst.nodes[0]], port=inst.port, state="pending",
        log=str(Path(run_dir) / "logs" / f"{part_name(inst.id, 0, len(inst.nodes))}.log"))
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


def _stage_and_serve(args, config, platform, coll, stop, api_key, sources, make_parts,
                     cache_root, node, run_dir, endpoints, log) -> int:
    rank = coll.rank
    coll.barrier()
    # Per node, once: stage each model source into the node-local cache (collective).
    for model, source in zip(config.models, sources):
        if source and not stop.signum:
            from ..bcast import StagingError, stage

            dest = staged_model_dir(config.hf_home, model.name)
            try:
                result = stage(source.stage_root, dest, coll.comm, writers="node",
                               progress=rank == 0)
            except StagingError as e:
                if rank == 0:
                    _error(f"staging {source.stage_root} -> {dest} failed: {e}")
                return EXIT_FAILED
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
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILED
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
                           max_restarts=config.max_restarts, restart_backoff=args.restart_backoff,
                           liveness_interval=args.liveness_interval,
                           probe_timeout=args.probe_timeout, stop_grace=args.stop_grace,
                           api_key=api_key, log=log)
        try:
            return _serve(args, config, coll, fleet, stop, endpoints, log)
        finally:
            fleet.stop()
    finally:
        remove_job_caches(cache_root, [instance_cache_dir(cache_root, p.name) for p in parts])


def _serve(args, config, coll, fleet, stop, endpoints, log) -> int:
    """Start, verify, supervise. Rank 0 rewrites the endpoints file on every change; from
    the moment a stop is decided it lists nothing as ready."""
    rank = coll.rank

    def gathered(states_local) -> list | None:
        per_rank = coll.gather(states_local)
        return merge_parts([s for part in per_rank for s in part]) if rank == 0 else None

    def publish(states_local, state: str | None = None) -> list | None:
        merged = gathered(states_local)
        if rank == 0:
            endpoints.update(merged, state=state)
        return merged

    def report(merged) -> None:
        print(summary_table(merged), file=sys.stderr, flush=True)
        failures = failure_report(merged)
        if failures:
            print(failures, file=sys.stderr, flush=True)

    def stopping() -> None:
        if rank == 0:
            endpoints.update(none_serving(endpoints.states), state="stopping")

    def tick(started: float) -> None:
        time.sleep(max(0.0, args.poll_interval - (time.monotonic() - started)))

    # The job's end, when known: drain, then stop cleanly before the scheduler's kill.
    walltime = coll.bcast(_walltime_schedule(config, args, log) if rank == 0 else None)

    def walltime_phase() -> int:
        """0 before the drain, 1 draining, 2 time to stop (the same on every rank once
        gathered: the largest counts)."""
        now = time.time()
        return 0 if walltime is None else (now >= walltime.drain_at) + (now >= walltime.stop_at)

    def walltime_stop() -> int:
        log(f"walltime: stopping cleanly, {walltime.end - time.time():.0f}s before the "
            "job's end")
        stopping()
        fleet.stop()
        publish(fleet.states(stopped=True))
        return EXIT_OK

    if not stop.signum:
        fleet.start_all()
    last = fleet.states()
    publish(last, state="starting")
    # Startup: until every instance is ready or failed everywhere, or a stop is requested.
    while True:
        started = time.monotonic()
        if not stop.signum:
            fleet.step()
        now_states = fleet.states()
        flags = coll.allgather((stop.signum, fleet.decided(), now_states != last,
                                walltime_phase()))
        signum = max(f[0] for f in flags)
        if not signum and max(f[3] for f in flags) == 2:
            return walltime_stop()  # the job ends before the fleet was ever ready
        if signum or all(f[1] for f in flags):
            break
        if any(f[2] for f in flags):
            publish(now_states)
            last = now_states
        tick(started)

    def stopped(signum: int) -> int:
        log(f"stopping on signal {signum}")
        stopping()
        fleet.stop()
        merged = publish(fleet.states(stopped=True))
        if rank == 0:
            report(merged)
        return 128 + signum

    if signum:
        return stopped(signum)

    merged = gathered(fleet.states())
    verdict = None
    if rank == 0:
        report(merged)
        ready = sum(s.state == "ready" for s in merged)
        verdict = ready == len(merged) or (config.allow_partial and ready > 0)
        if not verdict:
            log(f"{len(merged) - ready} of {len(merged)} instance(s) not ready"
                + ("" if not config.allow_partial else " and none is ready"))
        if verdict and not args.once:
            endpoints.update(merged, state="serving")
        else:  # everything is stopped next (_run's finally): never list it as ready
            endpoints.update(none_serving(merged), state="stopping")
        log(f"endpoints: {endpoints.json_path}")
    ok = coll.bcast(verdict)
    if args.once or not ok:  # _run's finally stops the fleet
        return EXIT_OK if ok else EXIT_FAILED

    # Supervise until the job ends (signal, or the walltime schedule) or nothing can come back.
    is_draining = False
    last = fleet.states()
    while True:
        started = time.monotonic()
        if not stop.signum:
            fleet.step()
        now_states = fleet.states()
        flags = coll.allgather((stop.signum, fleet.recoverable(), now_states != last,
                                walltime_phase()))
        signum = max(f[0] for f in flags)
        if signum:
            return stopped(signum)
        due = max(f[3] for f in flags)
        if due == 2:
            return walltime_stop()
        if due == 1 and not is_draining:
            is_draining = True
            if rank == 0:
                log(f"walltime: draining (no new requests); stopping in "
                    f"{walltime.stop_at - time.time():.0f}s")
            last = None  # publish now, as draining
        if sum(f[1] for f in flags) == 0:
            if rank == 0:
                log("every instance has failed; giving up")
            stopping()
            merged = publish(now_states)
            if rank == 0:
                report(merged)
            return EXIT_FAILED
        if any(f[2] for f in flags) or last is None:
            publish(draining(now_states) if is_draining else now_states,
                    state="draining" if is_draining else None)
            last = now_states
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


def _walltime_schedule(config, args, log):
    """Rank 0: when to drain and stop before the job's end (None: the end is unknown)."""
    end = job_end(os.environ, config.walltime)
    if end is None:
        return None
    plan = schedule(end, drain_seconds=config.drain_seconds, stop_grace=args.stop_grace)
    log(f"job ends at {time.strftime('%H:%M:%S', time.localtime(end))}: draining "
        f"{plan.end - plan.drain_at:.0f}s before, stopped {plan.end - plan.stop_at:.0f}s before")
    return plan
