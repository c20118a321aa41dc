"""This rank's instance processes as a small state machine, stepped once per tick.

States: starting -> ready; an instance whose process exits during startup is failed at once
(exit code + log tail); one that was ready and crashes is restarted after a backoff
(backoff * 2**k seconds) up to max_restarts times, then failed. A ready instance is checked
again every liveness_interval seconds (the same full probe); after liveness_failures failed
checks in a row it is taken as hung, stopped, and restarted like a crash. Between those it
gets GET /health every HEALTH_INTERVAL seconds, as the routers check their workers: one that
does not answer is `unhealthy` (not offered, out of its router) until it answers again, so
the endpoints file says within seconds what the routers do. Multi-node instances are not
restarted (their processes live on several ranks). Worker processes of a multi-node instance
count as "ready" while they run; the head's readiness decides the instance.

A probe carries the run's key, so it goes only to a server the instance started: before each
full probe the listening socket on the instance's port must belong to the instance's own
processes (processes.listeners). A port another process took after the launcher checked it
was free fails the instance with a message naming that process; it is never called ready.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass, field

from ..runfiles import SERVING_STATES as SERVING
from .endpoints import InstanceState
from .instances import Part
from .instances import with_port
from .processes import (Running, adopt_orphans, bind_problem, free_port, listeners, stop_all,
                        write_script)
from .readiness import Probe, Target, probe_round

_WILDCARDS = ("0.0.0.0", "::", "")
HEALTH_INTERVAL = 2.0  # seconds between quick /health checks of a serving instance
HEALTH_TIMEOUT = 2.0  # the router's own health-check timeout (router.HEALTH_ARGS)
MAX_MOVES = 3  # times an instance moves to another port because its own was taken


# What vLLM's API server logs when its engine process died under it (it then exits 0).
_ENGINE_DIED = re.compile(r"EngineDeadError|Engine ?core\S* .*died|engine core .*died", re.I)


def exit_description(code: int, log_tail: list[str]) -> str:
    """Why an instance ended, in words: the keeper relays the leader's status (128+N for a
    signal N). vLLM's API server exits 0 when its engine process dies (a SIGKILL, the OOM
    killer): that is said, not hidden behind a bare 'code 0'."""
    if code > 128:
        try:
            name = f" ({signal.Signals(code - 128).name})"
        except ValueError:
            name = ""
        return f"killed by signal {code - 128}{name}"
    if code == 0:
        if any(_ENGINE_DIED.search(line) for line in log_tail):
            return ("exited with code 0 after its engine process died (EngineDeadError in its "
                    "log: killed, e.g. by the OOM killer, or crashed)")
        return "exited with code 0 on its own"
    return f"exited with code {code}"


def probe_host(part: Part) -> str:
    return part.address if part.bind_host in _WILDCARDS else part.bind_host


@dataclass
class Slot:
    part: Part
    state: str = "starting"
    restarts: int = 0
    running: Running | None = None
    deadline: float = 0.0
    next_start: float | None = None
    ever_ready: bool = False
    exit_code: int | None = None
    error: str = ""
    log_tail: list[str] = field(default_factory=list)
    next_check: float = 0.0  # when a serving head gets its next full check
    next_health: float = 0.0  # ... and its next quick /health
    failed_checks: int = 0
    moves: int = 0  # times it moved to another port (its own was taken)


class LocalFleet:
    def __init__(self, parts: list[Part], *, startup_timeout: float, max_restarts: int,
                 restart_backoff: float = 2.0, api_key: str | None = None,
                 probe_timeout: float = 5.0, liveness_interval: float = 30.0,
                 stop_grace: float = 15.0, liveness_failures: int = 3,
                 reserved_ports: set[int] | None = None, log=lambda msg: None):
        self.slots = [Slot(p) for p in parts]
        # None: ports are the user's (fixed); else the run's planned ports, which a moving
        # instance must not take: aegis chose them and may choose again
        self.reserved_ports = reserved_ports
        self.startup_timeout = startup_timeout
        self.max_restarts = max_restarts
        self.restart_backoff = restart_backoff
        self.api_key = api_key
        self.probe_timeout = probe_timeout
        self.liveness_interval = liveness_interval
        self.stop_grace = stop_grace
        self.liveness_failures = liveness_failures
        self.log = log

    # --- transitions ---

    def start_all(self) -> None:
        adopt_orphans(True)  # until stop(): what a killed keeper leaves comes to us
        for slot in self.slots:
            write_script(slot.part)
        now = time.monotonic()
        for slot in self.slots:
            self._start(slot, now)

    def _start(self, slot: Slot, now: float) -> None:
        part = slot.part
        slot.next_start = None
        problem = bind_problem(part.bind_host, part.port) if part.is_head else None
        if problem:
            self._fail(slot, problem.message)
            return
        slot.running = Running(part, attempt=slot.restarts, grace=self.stop_grace)
        slot.exit_code = None
        slot.deadline = now + self.startup_timeout
        # Workers have no HTTP endpoint: running is all they can show.
        slot.state = "starting" if part.is_head else "ready"
        slot.error = ""

    def _fail(self, slot: Slot, error: str) -> None:
        slot.state = "failed"
        slot.error = error
        self.log(f"{slot.part.name} failed: {error}")

    def _on_exit(self, slot: Slot, code: int | None, now: float, why: str = "") -> None:
        """The process ended (code), or was stopped because it hung (code None, why)."""
        slot.exit_code = code
        slot.log_tail = slot.running.log_tail()
        # After an exit the keeper has already stopped what the leader left (vLLM's engine
        # processes); a hung one is being stopped. A restart waits for that (step).
        slot.running.stop()
        what = why or exit_description(code, slot.log_tail)
        can_restart = slot.ever_ready and slot.part.nnodes == 1 and slot.restarts < self.max_restarts
        if can_restart:
            delay = self.restart_backoff * (2 ** slot.restarts)
            slot.restarts += 1
            slot.state = "restarting"
            slot.next_start = now + delay
            slot.error = f"{what}; restart {slot.restarts}/{self.max_restarts} in {delay:g}s"
            self.log(f"{slot.part.name} {slot.error}")
        else:
            when = (f" after {slot.restarts} restart(s)" if slot.restarts else
                    " during startup" if not slot.ever_ready else "")
            self._fail(slot, f"{what}{when}")

    def step(self) -> None:
        """One tick: notice exits, start due restarts, probe starting heads, check serving
        ones, enforce timeouts."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.state in ("starting", *SERVING) and slot.running is not None:
                code = slot.running.exit_code()
                if code is not None and not self._lost_port(slot, now):
                    self._on_exit(slot, code, now)
            if slot.state == "restarting" and now >= slot.next_start and \
                    slot.running.exit_code() is not None:  # the old one holds no port now
                self._start(slot, now)
        heads = [i for i, s in enumerate(self.slots) if s.part.is_head]
        full = [i for i in heads if self.slots[i].state == "starting" or (
            self.slots[i].state in SERVING and now >= self.slots[i].next_check)]
        quick = [i for i in heads if i not in full and self.slots[i].state in SERVING
                 and now >= self.slots[i].next_health]
        owner = listeners({i: (self.slots[i].running.pid, self.slots[i].part.port)
                           for i in full})
        results = {i: Probe(False, owner[i].detail) for i in full if owner[i].state != "ours"}
        results.update(probe_round(
            [self._target(i) for i in full if owner[i].state == "ours"] +
            [self._target(i, health_only=True) for i in quick], timeout=self.probe_timeout))
        now = time.monotonic()
        for i, result in results.items():
            slot = self.slots[i]
            if i in quick:
                self._health(slot, result, now)
            elif slot.state in SERVING:
                self._liveness(slot, result, now, taken=owner[i].state == "foreign")
            else:
                self._starting(slot, result, now, taken=owner[i].state == "foreign")

    def _target(self, i: int, health_only: bool = False) -> Target:
        part = self.slots[i].part
        return Target(i, probe_host(part), part.port, part.served_name, self.api_key,
                      health_only=health_only,
                      timeout=min(HEALTH_TIMEOUT, self.probe_timeout) if health_only else None)

    def _starting(self, slot: Slot, result: Probe, now: float, *, taken: bool) -> None:
        if taken:  # another server on our port: never probe it with the key, never offer it
            slot.log_tail = slot.running.log_tail()
            slot.running.stop()
            if not self._move(slot, now, result.detail):
                self._fail(slot, f"{result.detail}: it was taken after aegis checked it was "
                                 "free (choose another port_start)")
        # An answered completion counts even if the process died since: the next tick
        # sees the exit and treats it as a crash in service (restartable).
        elif result.ready:
            slot.state = "ready"
            slot.ever_ready = True
            slot.error = ""
            slot.failed_checks = 0
            slot.next_check = now + self.liveness_interval
            slot.next_health = now + HEALTH_INTERVAL
            self.log(f"{slot.part.name} ready on {slot.part.node_host}:{slot.part.port}"
                     + (f" (restart {slot.restarts})" if slot.restarts else ""))
        elif (code := slot.running.exit_code()) is not None:  # died while being probed
            self._on_exit(slot, code, now)
        elif now >= slot.deadline:
            slot.log_tail = slot.running.log_tail()
            self._fail(slot, f"not ready within {self.startup_timeout:g}s; last check: {result.detail}")
            slot.running.stop()

    def _lost_port(self, slot: Slot, now: float) -> bool:
        """A starting instance that exited because another process took its port (vLLM: "Address
        already in use"): moved to a free one where the plan allows. -> whether it moved."""
        part = slot.part
        if slot.state != "starting" or not part.is_head or self.reserved_ports is None:
            return False
        holder = listeners({0: (slot.running.pid, part.port)})[0]
        if holder.state != "foreign":
            return False
        slot.log_tail = slot.running.log_tail()
        return self._move(slot, now, holder.detail)

    def _move(self, slot: Slot, now: float, why: str) -> bool:
        """Where the plan allows (aegis chose the ports), start the instance again at once on
        a free port. -> whether it moves."""
        part = slot.part
        if self.reserved_ports is None or not part.is_head or part.nnodes > 1 or \
                slot.moves >= MAX_MOVES:
            return False
        taken = {s.part.port for s in self.slots} | self.reserved_ports
        port = free_port(part.bind_host, max(taken), taken)
        if port is None:
            return False
        slot.moves += 1
        slot.part = with_port(part, port)
        write_script(slot.part)
        slot.state, slot.next_start = "restarting", now  # once the old one is gone
        slot.error = f"{why}; moving to port {port}"
        self.log(f"{part.name}: {why}; it moves to port {port}")
        return True

    def _health(self, slot: Slot, result: Probe, now: float) -> None:
        """The quick check of a serving instance: out of service while /health fails."""
        slot.next_health = now + HEALTH_INTERVAL
        if result.ready and slot.state == "unhealthy" and not slot.failed_checks:
            slot.state, slot.error = "ready", ""
            self.log(f"{slot.part.name} answers again")
        elif not result.ready and slot.state == "ready":
            slot.state, slot.error = "unhealthy", f"not answering /health: {result.detail}"
            self.log(f"{slot.part.name} is unhealthy ({result.detail}); not offered meanwhile")

    def _liveness(self, slot: Slot, result: Probe, now: float, *, taken: bool = False) -> None:
        slot.next_check = now + self.liveness_interval
        slot.next_health = now + HEALTH_INTERVAL
        if result.ready:
            slot.failed_checks = 0
            if slot.state == "unhealthy":
                self.log(f"{slot.part.name} answers again")
            slot.state, slot.error = "ready", ""
            return
        if (code := slot.running.exit_code()) is not None:
            self._on_exit(slot, code, now)
            return
        slot.failed_checks += 1
        slot.state = "unhealthy"
        slot.error = (f"failed check {slot.failed_checks}/{self.liveness_failures}: "
                      f"{result.detail}")
        if slot.failed_checks >= self.liveness_failures or taken:
            self._on_exit(slot, None, now, why=f"stopped answering ({result.detail})")

    # --- views ---

    def decided(self) -> bool:
        """Nothing left that may still become ready during startup."""
        return all(s.state in (*SERVING, "failed") for s in self.slots)

    def recoverable(self) -> int:
        """Instances that are up or may come back."""
        return sum(s.state != "failed" for s in self.slots)

    def states(self, *, stopped: bool = False) -> list[InstanceState]:
        out = []
        for s in self.slots:
            p = s.part
            state = "stopped" if stopped and s.state != "failed" else s.state
            out.append(InstanceState(
                id=p.instance_id, model=p.model, served_name=p.served_name, node=p.node_index,
                host=p.address, port=p.port, state=state, log=p.log_path, restarts=s.restarts,
                exit_code=s.exit_code, error=s.error, log_tail=tuple(s.log_tail),
                node_rank=p.node_rank))
        return out

    def stop(self) -> None:
        stop_all([s.running for s in self.slots if s.running is not None])
        adopt_orphans(False)
