"""This rank's instance processes as a small state machine, stepped once per tick.

States: starting -> ready; an instance whose process exits during startup is failed at once
(exit code + log tail); one that was ready and crashes is restarted after a backoff
(backoff * 2**k seconds) up to max_restarts times, then failed. A ready instance is checked
again every liveness_interval seconds (the same full probe); after liveness_failures failed
checks in a row it is taken as hung, stopped, and restarted like a crash. Multi-node instances are not
restarted (their processes live on several ranks). Worker processes of a multi-node instance
count as "ready" while they run; the head's readiness decides the instance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .endpoints import InstanceState
from .instances import Part
from .processes import Running, adopt_orphans, bind_problem, stop_all, write_script
from .readiness import Target, probe_round

_WILDCARDS = ("0.0.0.0", "::", "")


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
    next_check: float = 0.0  # when a ready head is checked again
    failed_checks: int = 0


class LocalFleet:
    def __init__(self, parts: list[Part], *, startup_timeout: float, max_restarts: int,
                 restart_backoff: float = 2.0, api_key: str | None = None,
                 probe_timeout: float = 5.0, liveness_interval: float = 30.0,
                 stop_grace: float = 15.0, liveness_failures: int = 3, log=lambda msg: None):
        self.slots = [Slot(p) for p in parts]
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
        what = why or f"exited with code {code}"
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
        """One tick: notice exits, start due restarts, probe starting heads, enforce timeouts."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.state in ("starting", "ready") and slot.running is not None:
                code = slot.running.exit_code()
                if code is not None:
                    self._on_exit(slot, code, now)
            if slot.state == "restarting" and now >= slot.next_start and \
                    slot.running.exit_code() is not None:  # the old one holds no port now
                self._start(slot, now)
        due = [i for i, s in enumerate(self.slots) if s.part.is_head and (
            s.state == "starting" or (s.state == "ready" and now >= s.next_check))]
        results = probe_round(
            [Target(i, probe_host(self.slots[i].part), self.slots[i].part.port,
                    self.slots[i].part.served_name, self.api_key) for i in due],
            timeout=self.probe_timeout)
        now = time.monotonic()
        for i, result in results.items():
            slot = self.slots[i]
            if slot.state == "ready":
                self._liveness(slot, result, now)
                continue
            # An answered completion counts even if the process died since: the next tick
            # sees the exit and treats it as a crash in service (restartable).
            if result.ready:
                slot.state = "ready"
                slot.ever_ready = True
                slot.error = ""
                slot.failed_checks = 0
                slot.next_check = now + self.liveness_interval
                self.log(f"{slot.part.name} ready on {slot.part.node_host}:{slot.part.port}"
                         + (f" (restart {slot.restarts})" if slot.restarts else ""))
            elif (code := slot.running.exit_code()) is not None:  # died while being probed
                self._on_exit(slot, code, now)
            else:
                if now >= slot.deadline:
                    slot.log_tail = slot.running.log_tail()
                    self._fail(slot, f"not ready within {self.startup_timeout:g}s; last check: {result.detail}")
                    slot.running.stop()

    def _liveness(self, slot: Slot, result, now: float) -> None:
        slot.next_check = now + self.liveness_interval
        if result.ready:
            slot.failed_checks = 0
            return
        if (code := slot.running.exit_code()) is not None:
            self._on_exit(slot, code, now)
            return
        slot.failed_checks += 1
        if slot.failed_checks >= self.liveness_failures:
            self._on_exit(slot, None, now, why=f"stopped answering ({result.detail})")

    # --- views ---

    def decided(self) -> bool:
        """Nothing left that may still become ready during startup."""
        return all(s.state in ("ready", "failed") for s in self.slots)

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
