"""One launcher rank (one per node) and its phases. Each phase is collective: every rank calls
it, in order, and every rank reaches the same verdict without a rank left waiting.

    prepare  where the run goes and what would stop it, checked before anything is written,
             moved or started; then (rank 0) the run directory, the run's key, the endpoints
             file and the board that keeps it
    stage    what earlier runs left on the node; the model sources; the environment or image;
             the pre-warm
    start    the instances, until each is ready or failed on every rank
    serve    supervise until a signal, the job's end, or nothing can come back
    drain    the job's end is near: nothing offered, requests in flight finish
    stop     every instance and router stopped; the endpoints file's last word

Every tick each rank sends rank 0 its instances' states when they changed; rank 0 (the Board)
rewrites the endpoints file, keeps the routers in step and prints progress. From the moment a
stop is decided nothing is listed as ready.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

from ..config import Config
from ..credential import GENERATED_KEY_VAR, CredentialError, key_for_run
from ..layout import API_KEY_NAME, RunLayout
from ..model_source import check_models
from . import chain, rundir
from .addresses import host_ip, interface_ipv4, serving_address
from .caches import instance_cache_dir, job_cache_root
from .endpoints import EndpointsFile, InstanceState
from .environment import Runtime
from .instances import Part, build_part, model_arg, part_name, staged_model_dir
from .messages import log_line, print_error
from .node import prepare_runtime, prewarm, runtime_problem
from .options import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, Prepared
from .pernode import remove_job_caches
from .processes import bind_problem
from .supervise import LocalFleet
from .walltime import job_end, schedule


class StopFlag:
    """The signal handler of a rank: remembers the first SIGTERM/SIGINT."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, _frame):
        self.signum = self.signum or signum


def run_rank(prepared: Prepared) -> int:
    """Be one launcher rank: MPI, signal handlers, the phases. Never leaves ranks hanging."""
    config = prepared.config
    # Node-local storage: $VARS in it ($TMPDIR, /mnt/bb/$USER) expand on each node.
    prepared = dataclasses.replace(prepared, config=config.replace(
        hf_home=os.path.expandvars(config.hf_home),
        node_local_dir=os.path.expandvars(config.node_local_dir)))

    from mpi4py import MPI  # after the input checks: a usage error needs no MPI

    from .collective import Collective

    coll = Collective(MPI.COMM_WORLD)
    needed = prepared.plan.nodes_needed
    if coll.size < needed:
        print_error(f"the plan needs {needed} node(s), one launcher rank each, but this MPI "
                    f"job has {coll.size} rank(s)")
        return EXIT_BAD_INPUT
    stop = StopFlag()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return Rank(prepared, coll, stop).run()
    except Exception as e:  # a bug or an environment failure: never leave ranks hanging
        log_line(coll.rank, f"internal error: {type(e).__name__}: {e}")
        import traceback

        traceback.print_exc(file=sys.stderr)
        coll.abort(EXIT_FAILED)
        return EXIT_FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Rank:
    def __init__(self, prepared: Prepared, coll, stop: StopFlag):
        self.prepared = prepared
        self.config: Config = prepared.config
        self.plan, self.allocation = prepared.plan, prepared.allocation
        self.options = prepared.options
        self.coll, self.rank, self.stop_flag = coll, coll.rank, stop
        self.mine = self.plan.on_node(self.rank)  # this node's instances
        nodes = self.allocation.nodes
        self.node = nodes[self.rank] if self.rank < len(nodes) else f"rank {self.rank}"
        self.board = None  # rank 0's view of the fleet (aegis.launch.board)
        self.fleet: LocalFleet | None = None
        self.parts: list[Part] | None = None  # this node's processes, once the runtime is known
        self.walltime = None  # the drain and stop schedule, when the job's end is known
        self._sent: list | None = None  # the states last sent to rank 0

    def log(self, msg: str) -> None:
        log_line(self.rank, msg)

    def run(self) -> int:
        code = self.prepare()
        if code is not None:
            return code
        code = EXIT_FAILED
        try:
            code = self.stage()
            if code is None:
                code = self.start()
            if code is None:
                code = self.serve()
            return code
        finally:
            self.stop()
            if self.board is not None:  # rank 0, also on an internal error: nothing is served
                self.board.finish("stopped" if code == EXIT_OK or code > 128 else "failed",
                                  code)

    # --- prepare ------------------------------------------------------------------------------
    def prepare(self) -> int | None:
        """-> an exit code to stop with (nothing was started), or None to go on."""
        self._locate()
        bad_input, taken = self._preflight()
        verdicts = self.coll.allgather((bad_input, taken))
        bad_input = sorted({line for bad, _ in verdicts for line in bad})
        taken = [line for _, per_rank in verdicts for line in per_rank]
        if bad_input or taken:
            if self.rank == 0:
                for line in bad_input or taken:
                    print_error(line)
                if not bad_input:
                    print_error("nothing started (allow_partial would start the other "
                                "instances)")
            return EXIT_BAD_INPUT if bad_input else EXIT_FAILED
        return self._open_run()

    def _locate(self) -> None:
        """The job and its run directory (rank 0's, so a local job id is rank 0's pid)."""
        job = self.coll.bcast(rundir.job_id(os.environ) if self.rank == 0 else None)
        run_dir = self.coll.bcast(os.path.abspath(
            self.options.run_dir or os.path.join(self.config.run_dir, job))
            if self.rank == 0 else None)
        self.job, self.run_dir, self.layout = job, run_dir, RunLayout(run_dir)
        self.endpoints_path = Path(self.layout.endpoints(self.config.endpoints_file))
        self.cache_root = job_cache_root(self.config.node_local_dir, job)

    def _preflight(self) -> tuple[list[str], list[str]]:
        """What would stop this run, found before anything is written, moved or started: each
        rank checks what depends on its node, rank 0 what is shared. -> (bad input, ports
        taken)."""
        config, bad_input = self.config, []
        if self.mine and not (config.env_source or config.container):  # else once in place
            bad_input += [p for p in [runtime_problem(config, Runtime(), self.node)] if p]
        sources = None
        if self.rank == 0:
            bad_input += rundir.problems(self.run_dir, self.endpoints_path,
                                         "--run-dir" if self.options.run_dir else "run_dir")
            # The root of every broadcast reads the model sources: check them there, before
            # any byte moves (a hub-cache layout, one snapshot, a plain directory).
            sources, problems, _ = check_models(config.models)
            bad_input += problems
        self.sources = self.coll.bcast(sources)
        problem = self._serving_addresses()
        bad_input += [problem] if problem else []
        # A port already taken: without allow_partial nothing is started anywhere (with it,
        # the fleet reports those instances failed and starts the rest). An address that
        # cannot be listened on at all is bad input either way.
        taken = []
        for part in self._make_parts(Runtime()):
            problem = bind_problem(part.bind_host, part.port) if part.is_head else None
            if problem and not problem.in_use:
                bad_input.append(f"{problem.message} ({self.node})")
            elif problem and not config.allow_partial:
                taken.append(f"port {part.port} on {part.bind_host} ({self.node}) is already "
                             "in use")
        return bad_input, taken

    def _serving_addresses(self) -> str | None:
        """Collective: each rank forms its own node's serving address (an interface's address
        can only be read on the node) and resolves it; everyone learns all of them (a
        multi-node instance needs its head's). -> this rank's problem, or None."""
        nodes, platform = self.allocation.nodes, self.prepared.platform
        mine = problem = None
        if self.rank < len(nodes):
            try:
                address = serving_address(platform.address, nodes[self.rank], interface_ipv4)
                mine = (address, host_ip(address))
            except OSError as e:
                problem = f"serving address of {nodes[self.rank]} ({platform.address}): {e}"
        known = dict(enumerate(self.coll.allgather(mine)))
        self.addresses = [known[i][0] if known.get(i) else h for i, h in enumerate(nodes)]
        self.host_ips = [known[i][1] if known.get(i) else h for i, h in enumerate(nodes)]
        return problem

    def _make_parts(self, runtime: Runtime) -> list[Part]:
        config = self.config
        return [build_part(instance=inst, model=config.models[inst.model_index], config=config,
                           platform=self.prepared.platform, node_index=self.rank,
                           hosts=list(self.allocation.nodes), addresses=self.addresses,
                           host_ips=self.host_ips, bind_host=self.options.bind_host,
                           run_dir=self.run_dir, cache_root=self.cache_root, runtime=runtime,
                           source=self.sources[inst.model_index])
                for inst in self.mine]

    def _open_run(self) -> int | None:
        """Rank 0 writes the run directory, the run's key and the endpoints file; every rank
        learns the key (instances read it from their environment)."""
        problem, key = None, self.prepared.api_key
        if self.rank == 0:
            try:
                key = self._write_run_files(key)
            except OSError as e:  # what the preflight could not foresee (a race, a full disk)
                problem = f"cannot write {e.filename or self.endpoints_path}: {e.strerror or e}"
            except CredentialError as e:
                problem = str(e)
        problem = self.coll.bcast(problem)
        if problem:
            if self.rank == 0:
                print_error(problem)
            return EXIT_BAD_INPUT
        if self.prepared.api_key is None:
            key = self.coll.bcast(key)
            os.environ[GENERATED_KEY_VAR] = key
        self.api_key = key
        if self.rank == 0:
            self.endpoints.start_heartbeat()
            self._release_successor()
            self.log(f"{len(self.plan.instances)} instance(s) on {self.plan.nodes_needed} "
                     f"node(s) from {self.allocation.source}; run directory {self.run_dir}; "
                     f"endpoints {self.endpoints_path}")
            from .board import Board

            self.board = Board(self.config, self.plan, self.endpoints, layout=self.layout,
                               router_host=self.options.bind_host or self.host_ips[0],
                               router_node=self.addresses[0], api_key=key, log=self.log)
        return None

    def _write_run_files(self, key: str | None) -> str:
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        self.endpoints_path.parent.mkdir(parents=True, exist_ok=True)
        if not rundir.same_file(self.prepared.config_path, self.layout.config):
            rundir.write_config(self.prepared.config, self.layout)  # what Run reads
        mirror = chain.from_environment(os.environ)  # submit --chain
        if key is None:  # no api_key_env: the run's own key (a chain's: one for all)
            key = key_for_run(str(mirror.dir / API_KEY_NAME) if mirror else self.layout.api_key)
        self.endpoints = EndpointsFile(self.endpoints_path, run_dir=self.run_dir, job=self.job,
                                       ranks=self.coll.size)
        self.endpoints.mirror = mirror
        self.endpoints.update(self._planned_states(), state="staging", must_write=True)
        return key

    def _planned_states(self) -> list[InstanceState]:
        """Every planned instance before anything starts (state pending)."""
        return [InstanceState(
            id=inst.id, model=inst.model, served_name=inst.served_name, node=inst.nodes[0],
            host=self.allocation.nodes[inst.nodes[0]], port=inst.port, state="pending",
            log=self.layout.instance_log(part_name(inst.id, 0, len(inst.nodes))))
            for inst in self.plan.instances]

    def _release_successor(self) -> None:
        """Rank 0 of a chained generation on PBS: the successor was queued held; now that this
        job's end is known, set its start (end - chain_overlap) and release it."""
        mirror = chain.from_environment(os.environ)
        end = job_end(os.environ, self.config.walltime)
        following = mirror and chain.successor(mirror.dir, mirror.generation)
        if not following or end is None:
            return
        from ..scheduler import SchedulerError, get_backend

        start_at = end - self.config.chain_overlap
        try:
            get_backend(self.config.effective_scheduler).release_successor(following, start_at)
        except SchedulerError as e:
            self.log(f"warning: cannot release the next generation (job {following}): {e}")
            return
        self.log(f"next generation: job {following} may start at "
                 f"{time.strftime('%H:%M:%S', time.localtime(start_at))}")

    # --- stage --------------------------------------------------------------------------------
    def stage(self) -> int | None:
        """-> an exit code to stop with, or None to start the instances."""
        self._sweep_node()
        self.coll.barrier()
        code = self._stage_models()
        if code is not None:
            return code
        config, stop = self.config, self.stop_flag
        runtime, problem, bad_input = prepare_runtime(
            config, self.prepared.platform, self.coll, self.cache_root, self.node,
            timeout=config.startup_timeout, stop=stop, log=self.log if self.rank == 0 else None,
            node_log=self.log)
        if not self._agreed(problem):
            return self._stopped_or(EXIT_BAD_INPUT if bad_input else EXIT_FAILED)
        self.parts = self._make_parts(runtime)
        problem = None
        if self.parts and not stop.signum:
            by_name = {m.name: m for m in config.models}
            by_source = {m.name: s for m, s in zip(config.models, self.sources)}
            problem = prewarm(config, self.prepared.platform, self.cache_root, runtime,
                              self.node, self.rank, self.run_dir,
                              [model_arg(config, by_name[p.model], by_source[p.model])
                               for p in self.parts], stop=stop, log=self.log)
        if not self._agreed(problem):
            return self._stopped_or(EXIT_FAILED)
        self.fleet = LocalFleet(self.parts, startup_timeout=config.startup_timeout,
                                max_restarts=config.max_restarts,
                                restart_backoff=config.restart_backoff,
                                liveness_interval=config.liveness_interval,
                                liveness_failures=config.liveness_failures,
                                probe_timeout=config.probe_timeout,
                                stop_grace=config.stop_grace, api_key=self.api_key,
                                reserved_ports=self._planned_ports()
                                if self.prepared.movable_ports else None, log=self.log)
        return None

    def _planned_ports(self) -> set[int]:
        """Every HTTP port of the plan: the instances' and the routers'."""
        return {inst.port for inst in self.plan.instances} | set(self.plan.router_ports.values())

    def _sweep_node(self) -> None:
        """Record this rank as a user of its job's node-local caches, and remove what earlier
        runs left on the node (aegis.launch.leftovers) before staging fills it again. A
        problem here is a warning: it never stops the launch."""
        from .leftovers import claim, sweep

        try:  # no lock: a sweep removes only what no live process owns, so two may run at once
            claim(self.cache_root)
            removed = sweep(self.config.node_local_dir, self.cache_root)
        except OSError as e:
            self.log(f"warning: cleaning up after earlier runs: {e}")
            return
        for line in removed:
            self.log(f"removed {line}")

    def _stage_models(self) -> int | None:
        """Per node, once: each model source into the node-local cache (collective)."""
        for model, source in zip(self.config.models, self.sources):
            if not source or self.stop_flag.signum:
                continue
            from ..bcast import StagingError, stage

            dest = staged_model_dir(self.config.hf_home, model.name)
            try:
                result = stage(source.stage_root, dest, self.coll.comm, writers="node",
                               progress=self.rank == 0, **_stage_tuning(self.config, stage))
            except StagingError as e:
                if self.rank == 0:
                    print_error(f"staging {source.stage_root} -> {dest} failed: {e}")
                return self._stopped_or(EXIT_FAILED)
            if self.rank == 0:
                how = ("unchanged, not moved" if result.cached else
                       f"{result.bytes / 1e6:.1f} MB in {result.seconds:.1f}s")
                self.log(f"staged {source.stage_root} -> {dest} ({how}); {model.served_name} "
                         f"loads {source.served_path(dest)} ({source.form} model_source)")
        return None

    # --- start --------------------------------------------------------------------------------
    def start(self) -> int | None:
        """The instances, until each is ready or failed on every rank (or a stop, or the job's
        end, comes first). -> an exit code, or None to serve."""
        fleet, board = self.fleet, self.board
        self.walltime = self.coll.bcast(self._walltime_schedule() if self.rank == 0 else None)
        if not self.stop_flag.signum:
            fleet.start_all()
        if board is not None:
            board.starting()
        while True:
            started = time.monotonic()
            if not self.stop_flag.signum:
                fleet.step()
            self._share(fleet.states())
            if board is not None:
                board.progress()
            flags = self.coll.allgather((self.stop_flag.signum, fleet.decided(),
                                         self._walltime_phase()))
            signum = max(f[0] for f in flags)
            if signum:
                return self.stop_on_signal(signum)
            if max(f[2] for f in flags) == 2:
                return self.stop_for_walltime()  # the job ends before the fleet was ever ready
            if all(f[1] for f in flags):
                break
            self._tick(started)
        verdict = None
        if board is not None:
            board.report()
            verdict = board.verdict()
            if verdict and not self.options.once:
                board.serving()
            else:  # everything is stopped next (run's finally): never list it as ready
                board.stopping()
        ok = self.coll.bcast(verdict)
        if self.options.once or not ok:
            return EXIT_OK if ok else EXIT_FAILED
        return None

    # --- serve and drain ----------------------------------------------------------------------
    def serve(self) -> int:
        """Supervise until the job ends (a signal, or the walltime schedule) or nothing can
        come back."""
        fleet, draining = self.fleet, False
        while True:
            started = time.monotonic()
            if not self.stop_flag.signum:
                fleet.step()
            self._share(fleet.states())
            flags = self.coll.allgather((self.stop_flag.signum, fleet.recoverable(),
                                         self._walltime_phase()))
            signum = max(f[0] for f in flags)
            if signum:
                return self.stop_on_signal(signum)
            due = max(f[2] for f in flags)
            if due == 2:
                return self.stop_for_walltime()
            if due == 1 and not draining:
                draining = True
                self.drain()
            if sum(f[1] for f in flags) == 0:
                if self.board is not None:
                    self.log("every instance has failed; giving up")
                    self.board.stopping()
                    self.board.report()
                return EXIT_FAILED
            self._tick(started)

    def drain(self) -> None:
        """The job's end is near: nothing is offered (file and routers); in flight finishes."""
        if self.board is not None:
            self.log(f"walltime: draining (no new requests); stopping in "
                     f"{self.walltime.stop_at - time.time():.0f}s")
            self.board.draining()

    # --- stop ---------------------------------------------------------------------------------
    def stop_on_signal(self, signum: int) -> int:
        self.log(f"stopping on signal {signum}")
        self._stop_serving()
        if self.board is not None:
            self.board.report()
        return 128 + signum

    def stop_for_walltime(self) -> int:
        self.log(f"walltime: stopping cleanly, {self.walltime.end - time.time():.0f}s before "
                 "the job's end")
        self._stop_serving()
        return EXIT_OK

    def _stop_serving(self) -> None:
        if self.board is not None:
            self.board.stopping()
        self.fleet.stop()
        self._share(self.fleet.states(stopped=True))

    def stop(self) -> None:
        """Whatever happened: every instance of this rank stopped, its caches removed."""
        if self.fleet is not None:
            self.fleet.stop()
        if self.parts is not None:
            remove_job_caches(self.cache_root,
                              [instance_cache_dir(self.cache_root, p.name) for p in self.parts])

    # --- shared by the phases -----------------------------------------------------------------
    def _share(self, states: list[InstanceState]) -> None:
        """Collective: rank 0 gets every rank's states that changed since it last sent them."""
        per_rank = self.coll.gather(states if states != self._sent else None)
        self._sent = states
        if self.board is not None:
            self.board.update({r: s for r, s in enumerate(per_rank) if s is not None})

    def _tick(self, started: float) -> None:
        time.sleep(max(0.0, self.config.poll_interval - (time.monotonic() - started)))

    def _walltime_phase(self) -> int:
        """0 before the drain, 1 draining, 2 time to stop (the same on every rank once
        gathered: the largest counts)."""
        now, plan = time.time(), self.walltime
        return 0 if plan is None else (now >= plan.drain_at) + (now >= plan.stop_at)

    def _walltime_schedule(self):
        """Rank 0: when to drain and stop before the job's end (None: the end is unknown)."""
        config = self.config
        end = job_end(os.environ, config.walltime)
        if end is None:
            return None
        plan = schedule(end, drain_seconds=config.drain_seconds, stop_grace=config.stop_grace)
        self.log(f"job ends at {time.strftime('%H:%M:%S', time.localtime(end))}: draining "
                 f"{plan.end - plan.drain_at:.0f}s before, stopped "
                 f"{plan.end - plan.stop_at:.0f}s before")
        return plan

    def _agreed(self, problem: str | None) -> bool:
        """Collective: True when no rank has a problem; else rank 0 prints each once."""
        problems = sorted({p for p in self.coll.allgather(problem) if p})
        if problems and self.rank == 0:
            for p in problems:
                print_error(p)
        return not problems

    def _stopped_or(self, code: int) -> int:
        """A phase that failed because this rank was signalled ends like a stop (128+N)."""
        return 128 + self.stop_flag.signum if self.stop_flag.signum else code


def _stage_tuning(config: Config, stage) -> dict:
    """The stage_* keys that are set, as the keyword arguments the installed stage() takes."""
    import inspect

    accepted = inspect.signature(stage).parameters
    tuning = {"chunk_size": config.stage_chunk_size, "depth": config.stage_depth,
              "stall_timeout": config.stage_stall_timeout, "readers": config.stage_readers}
    return {k: v for k, v in tuning.items() if v is not None and k in accepted}
