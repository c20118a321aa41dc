"""One routed endpoint per model: the vLLM project's router (PyPI `vllm-router`) on rank 0.

Each router starts with no workers; rank 0 adds an instance (POST /add_worker) when the
launcher's own readiness check passes and removes it (POST /remove_worker) when the launcher
sees it fail, restart, hang or stop. Between those, the router's own health checks are tuned
so that a stopped or killed worker leaves the rotation within a few seconds, not minutes
(its defaults, every 60 s with 3 failures, took 162 s here; see docs/using-endpoints.md), and
retries send a refused request to another worker. The HTTP calls run on a thread so a slow
router never delays the launcher's collective tick.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from ..layout import RunLayout
from .endpoints import InstanceState
from .processes import KEEPER_MARGIN, kept, port_in_use

ROUTER_COMMAND = "vllm-router"
# Health checks every second, out after 2 failures, back after 1 success (measured: a
# SIGSTOPped worker out in ~3 s, back within a second of SIGCONT).
HEALTH_ARGS = ("--health-check-interval-secs", "1", "--health-check-timeout-secs", "2",
               "--health-failure-threshold", "2", "--health-success-threshold", "1")
CALL_TIMEOUT = 10.0  # one add/remove/list call
STOP_GRACE = 5.0  # seconds between TERM and KILL when stopping a router
START_TIMEOUT = 30.0  # the router answering /health after it was started


def router_command() -> str | None:
    """vllm-router beside this interpreter (the venv aegis runs from), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), ROUTER_COMMAND)
    return beside if os.access(beside, os.X_OK) else shutil.which(ROUTER_COMMAND)


def router_argv(command: str, host: str, port: int, metrics_port: int,
                extra: tuple[str, ...] = ()) -> list[str]:
    # Its Prometheus exporter listens on 29000 unless told otherwise: a second router on the
    # node (two models, or another run) then dies with "Address already in use".
    return [command, "--host", host, "--port", str(port), "--policy", "round_robin",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
            *HEALTH_ARGS, *extra]


def free_local_port() -> int:
    """A port nothing listens on now, from the kernel (for a router's metrics exporter)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_url(state: InstanceState, address: str | None = None) -> str:
    return f"http://{address or state.host}:{state.port}"


@dataclass
class _Router:
    model: str
    port: int
    log_path: str
    proc: subprocess.Popen | None = None
    state: str = "starting"  # starting | ready | failed | stopped
    error: str = ""
    workers: set[str] = field(default_factory=set)  # what the router has (as last applied)
    wanted: set[str] = field(default_factory=set)
    started: float = 0.0


class Routers:
    """The routers of a run: started at once, kept in step by sync(), stopped by close()."""

    def __init__(self, ports: dict[str, int], *, host: str, node: str, layout: RunLayout,
                 extra_args: tuple[str, ...] = (), log=lambda msg: None):
        self.host, self.node, self.log = host, node, log
        self.extra_args = extra_args
        self.routers = {m: _Router(m, p, layout.router_log(m)) for m, p in ports.items()}
        self.changed = True
        self._calls: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        command = router_command()
        for r in self.routers.values():
            if command is None:
                self._fail(r, f"{ROUTER_COMMAND} not found (pip install 'aegis[router]')")
            elif port_in_use(host, r.port):
                self._fail(r, f"port {r.port} on {host} is already in use")
            else:
                self._start(r, command)
                self._calls.put(r.model)  # the thread waits for its /health
        self._thread = threading.Thread(target=self._apply_loop, name="aegis-routers",
                                        daemon=True)
        self._thread.start()

    def _fail(self, r: _Router, error: str) -> None:
        r.state, r.error = "failed", error
        self.changed = True
        self.log(f"router for {r.model} failed: {error}; clients can use the instances directly")

    def _start(self, r: _Router, command: str) -> None:
        os.makedirs(os.path.dirname(r.log_path), exist_ok=True)
        with open(r.log_path, "ab") as log:
            # under a keeper, like the instances: nothing of it outlives the launcher
            r.proc = subprocess.Popen(
                kept(router_argv(command, self.host, r.port, free_local_port(), self.extra_args),
                     STOP_GRACE),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True)
        r.started = time.monotonic()

    # -- rank 0's tick -----------------------------------------------------------------------
    def sync(self, states: list[InstanceState]) -> bool:
        """Ask each router for the ready instances of its model. True when a record changed."""
        with self._lock:
            if self._closed:
                changed, self.changed = self.changed, False
                return changed
            for r in self.routers.values():
                if r.proc is not None and r.state != "failed" and r.proc.poll() is not None:
                    if r.proc.returncode in (0, -15, 143):  # told to stop (scancel signals
                        r.state, self.changed = "stopped", True  # every process of the job)
                    else:
                        self._fail(r, f"{ROUTER_COMMAND} exited with code {r.proc.returncode} "
                                      f"(log: {r.log_path})")
                if r.state in ("failed", "stopped"):
                    continue
                wanted = {worker_url(s) for s in states
                          if s.served_name == r.model and s.state == "ready"}
                if wanted != r.wanted:
                    r.wanted = wanted
                    self._calls.put(r.model)
            changed, self.changed = self.changed, False
            return changed

    def records(self) -> list[dict]:
        with self._lock:
            return [{"model": r.model, "url": f"http://{self.node}:{r.port}/v1",
                     "host": self.node, "port": r.port, "state": r.state,
                     "workers": len(r.workers), "error": r.error, "log": r.log_path}
                    for r in self.routers.values()]

    # -- the thread that talks to the routers ------------------------------------------------
    def _call(self, r: _Router, method: str, path: str) -> tuple[int, str]:
        url = f"http://{self.host}:{r.port}{path}"
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (OSError, ValueError) as e:
            return 0, str(e)

    def _apply(self, model: str) -> None:
        if self._closed:  # stopping: the instances go too; nothing to tell the routers
            return
        with self._lock:
            r = self.routers[model]
            wanted, have, state = set(r.wanted), set(r.workers), r.state
        if state in ("failed", "stopped"):
            return
        if state == "starting":
            status, _ = self._call(r, "GET", "/health")
            if status != 200:
                if time.monotonic() - r.started > START_TIMEOUT:
                    with self._lock:
                        self._fail(r, f"not answering within {START_TIMEOUT:g}s "
                                      f"(log: {r.log_path})")
                else:
                    time.sleep(0.2)
                    self._calls.put(model)
                return
            with self._lock:
                r.state, self.changed = "ready", True
        for url in sorted(wanted - have):
            status, text = self._call(r, "POST", "/add_worker?url=" + urllib.parse.quote(url, safe=""))
            if status == 200 or "already exists" in text:
                have.add(url)
            elif not self._closed:
                self.log(f"router for {model}: adding {url} failed ({status}: {text[:120]})")
        for url in sorted(have - wanted):
            status, text = self._call(r, "POST", "/remove_worker?url=" + urllib.parse.quote(url, safe=""))
            if status == 200:
                have.discard(url)
            elif not self._closed:
                self.log(f"router for {model}: removing {url} failed ({status}: {text[:120]})")
        with self._lock:
            if have != r.workers:
                r.workers, self.changed = have, True
            if r.wanted != have:
                self._calls.put(model)  # changed meanwhile, or a call failed: again

    def _apply_loop(self) -> None:
        while not self._closed:
            try:
                model = self._calls.get(timeout=0.5)
            except queue.Empty:
                continue
            if model is None:
                return
            try:
                self._apply(model)
            except Exception as e:  # never let the thread die silently
                self.log(f"router for {model}: {type(e).__name__}: {e}")
                time.sleep(0.5)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._calls.put(None)
        with self._lock:
            for r in self.routers.values():
                if r.state != "failed":
                    r.state, r.workers = "stopped", set()
        procs = [r.proc for r in self.routers.values() if r.proc is not None]
        for p in procs:  # the keeper: TERM, STOP_GRACE, KILL to the router and its children
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + STOP_GRACE + KEEPER_MARGIN
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._thread.join(timeout=CALL_TIMEOUT + 1)
