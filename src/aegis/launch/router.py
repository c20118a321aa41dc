"""One routed endpoint per model: the vLLM project's router (PyPI `vllm-router`) on rank 0.

Each router starts with no workers; a thread keeps its worker list equal to the model's
instances that the launcher's own checks call ready. Every few seconds (VERIFY_INTERVAL) it
reads the router's list back (GET /workers) and repairs it: a worker nobody asked for is
removed, a missing one added, and the endpoints file's record says how many healthy workers
the router really has. The router's own health checks are tuned so that a stopped or killed
worker leaves the rotation within a few seconds, not minutes (its defaults, every 60 s with
3 failures, took 162 s here; see docs/using-endpoints.md), and retries send a refused request
to another worker.

Who may talk to it: every request, management calls (/add_worker, /remove_worker, /workers)
as well as completions, must carry the run's key (aegis.credential). vllm-router checks each
new bearer token against its `api_key_validation_urls`; the one URL it is given is KeyCheck, a
loopback-only endpoint in this launcher that answers 200 for the run's key and 401 for
anything else (router_start.py explains how the setting reaches the router). So a client on
another node reaches the model, and nobody without the key can change what it routes to.

A router that exits is started again (same port, the current worker list) within
RESTART_DELAY seconds; meanwhile its record says `restarting`, not `ready`.
"""

from __future__ import annotations

import hmac
import importlib.util
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..layout import RunLayout
from .endpoints import InstanceState
from .processes import KEEPER_MARGIN, kept, port_in_use
from .router_start import EXIT_NO_AUTH, KEY_CHECK_VAR

ROUTER_PACKAGE = "vllm_router"
ROUTER_START = str(Path(__file__).with_name("router_start.py"))
# Health checks every second, out after 2 failures, back after 1 success (measured: a
# SIGSTOPped worker out in ~3 s, back within a second of SIGCONT).
HEALTH_ARGS = ("--health-check-interval-secs", "1", "--health-check-timeout-secs", "2",
               "--health-failure-threshold", "2", "--health-success-threshold", "1")
CALL_TIMEOUT = 10.0  # one management call
STOP_GRACE = 5.0  # seconds between TERM and KILL when stopping a router
START_TIMEOUT = 30.0  # the router answering /health after it was started
VERIFY_INTERVAL = 2.0  # seconds between reading a router's worker list back
RESTART_DELAY = 1.0  # seconds between a router's exit and its restart
MAX_FAILURES_IN_ROW = 5  # exits (or start timeouts) without becoming ready, then failed


def router_installed() -> bool:
    """vllm-router importable by this interpreter (the venv aegis runs from)."""
    return importlib.util.find_spec(ROUTER_PACKAGE) is not None


def router_argv(host: str, port: int, metrics_port: int,
                extra: tuple[str, ...] = ()) -> list[str]:
    # Its Prometheus exporter listens on 29000 unless told otherwise: a second router on the
    # node (two models, or another run) then dies with "Address already in use".
    return [sys.executable, "-I", ROUTER_START, "--host", host, "--port", str(port),
            "--policy", "round_robin", "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(metrics_port), *HEALTH_ARGS, *extra]


def _last_port(argv: list[str], flag: str) -> int | None:
    """The value argparse takes for `flag` (the last one given), when it is a port number."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return int(value) if value is not None and value.isdigit() and 0 < int(value) < 65536 \
        else None


def free_local_port() -> int:
    """A port nothing listens on now, from the kernel (for a router's metrics exporter)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_url(state: InstanceState, address: str | None = None) -> str:
    return f"http://{address or state.host}:{state.port}"


class KeyCheck:
    """The routers' validation URL: 200 for `Authorization: Bearer <the run's key>`, 401 for
    anything else. Loopback only: the routers run on this node."""

    def __init__(self, key: str):
        expected = f"Bearer {key}".encode()

        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # a client that sends nothing is dropped

            def do_GET(self):  # noqa: N802 (http.server's naming)
                given = self.headers.get("Authorization", "").encode(errors="replace")
                self.send_response(200 if hmac.compare_digest(given, expected) else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args):  # nothing of a request is logged
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, name="aegis-keycheck",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class _Router:
    model: str
    port: int
    log_path: str
    proc: subprocess.Popen | None = None
    state: str = "starting"  # starting | ready | restarting | failed | stopped
    error: str = ""
    workers: set[str] = field(default_factory=set)  # healthy, in the router (as read back)
    wanted: set[str] = field(default_factory=set)
    started: float = 0.0
    restarts: int = 0
    failures_in_row: int = 0  # exits since it was last ready
    next_start: float = 0.0
    metrics_port: int | None = None  # its Prometheus exporter (127.0.0.1 of this node)


class Routers:
    """The routers of a run: started at once, kept in step by sync(), stopped by close()."""

    def __init__(self, ports: dict[str, int], *, host: str, node: str, layout: RunLayout,
                 api_key: str, extra_args: tuple[str, ...] = (), log=lambda msg: None):
        self.host, self.node, self.log = host, node, log
        self.extra_args = extra_args
        self.routers = {m: _Router(m, p, layout.router_log(m)) for m, p in ports.items()}
        self.changed = True
        self._auth = {"Authorization": f"Bearer {api_key}"}
        # management calls go straight to the router: never through an http(s)_proxy
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._calls: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self.key_check = KeyCheck(api_key)
        installed = router_installed()
        for r in self.routers.values():
            if not installed:
                self._fail(r, f"{ROUTER_PACKAGE} is not installed (pip install 'aegis[router]')")
            elif port_in_use(host, r.port):
                self._fail(r, f"port {r.port} on {host} is already in use")
            else:
                self._start(r)
        self._thread = threading.Thread(target=self._apply_loop, name="aegis-routers",
                                        daemon=True)
        self._thread.start()

    def _fail(self, r: _Router, error: str) -> None:
        r.state, r.error, r.workers = "failed", error, set()
        self.changed = True
        self.log(f"router for {r.model} failed: {error}; clients can use the instances directly")

    def _start(self, r: _Router) -> None:
        os.makedirs(os.path.dirname(r.log_path), exist_ok=True)
        argv = router_argv(self.host, r.port, free_local_port(), self.extra_args)
        r.metrics_port = _last_port(argv, "--prometheus-port")  # router_args may override it
        with open(r.log_path, "ab") as log:
            # under a keeper, like the instances: nothing of it outlives the launcher
            r.proc = subprocess.Popen(
                kept(argv, STOP_GRACE), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                env={**os.environ, KEY_CHECK_VAR: self.key_check.url})
        r.started = time.monotonic()
        r.state, r.workers = "starting", set()
        self.changed = True
        self._calls.put(r.model)  # the thread waits for its /health

    def _exited(self, r: _Router, why: str) -> None:
        """The router process ended (or never answered): start it again after a pause, or give
        up after MAX_FAILURES_IN_ROW attempts that never became ready."""
        r.workers, self.changed = set(), True
        r.failures_in_row += 1
        if r.failures_in_row > MAX_FAILURES_IN_ROW:
            self._fail(r, f"{why}; gave up after {MAX_FAILURES_IN_ROW} restarts "
                          f"(log: {r.log_path})")
            return
        r.restarts += 1
        r.state, r.error = "restarting", f"{why}; restarting"
        r.next_start = time.monotonic() + RESTART_DELAY
        self.log(f"router for {r.model} {why}; restarting it (log: {r.log_path})")

    # -- rank 0's tick -----------------------------------------------------------------------
    def sync(self, states: list[InstanceState]) -> bool:
        """Restart routers that exited; ask each for the ready instances of its model. True
        when a record changed."""
        with self._lock:
            if self._closed:
                changed, self.changed = self.changed, False
                return changed
            now = time.monotonic()
            for r in self.routers.values():
                if r.state in ("starting", "ready") and r.proc is not None and \
                        r.proc.poll() is not None:
                    code = r.proc.returncode
                    if code == EXIT_NO_AUTH:
                        self._fail(r, "the installed vllm-router cannot check the run's key "
                                      f"(log: {r.log_path})")
                    else:
                        self._exited(r, f"exited with code {code}")
                if r.state == "restarting" and now >= r.next_start:
                    self._start(r)
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
                     "host": self.node, "node": 0, "port": r.port, "state": r.state,
                     "workers": len(r.workers), "restarts": r.restarts, "error": r.error,
                     "log": r.log_path, "metrics_port": r.metrics_port}
                    for r in self.routers.values()]

    # -- the thread that talks to the routers ------------------------------------------------
    def _call(self, r: _Router, method: str, path: str) -> tuple[int, str]:
        url = f"http://{self.host}:{r.port}{path}"
        request = urllib.request.Request(url, method=method, headers=self._auth,
                                         data=b"" if method == "POST" else None)
        try:
            with self._opener.open(request, timeout=CALL_TIMEOUT) as response:
                return response.status, response.read(1 << 20).decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read(4096).decode(errors="replace")
        except (OSError, ValueError) as e:
            return 0, str(e)

    def _read_workers(self, r: _Router) -> dict[str, bool] | None:
        """What the router routes to: worker URL -> healthy; None when it does not answer."""
        status, text = self._call(r, "GET", "/workers")
        try:
            if status == 200:
                return {str(w["url"]).rstrip("/"): bool(w.get("is_healthy", True))
                        for w in json.loads(text)["workers"]}
            status, text = self._call(r, "GET", "/list_workers")  # older routers
            if status == 200:
                return {str(u).rstrip("/"): True for u in json.loads(text)["urls"]}
        except (ValueError, KeyError, TypeError):
            pass
        return None

    def _apply(self, model: str) -> None:
        if self._closed:  # stopping: the instances go too; nothing to tell the routers
            return
        with self._lock:
            r = self.routers[model]
            wanted, state, proc = set(r.wanted), r.state, r.proc
        if state == "starting":
            status, _ = self._call(r, "GET", "/health")
            if status != 200:
                if time.monotonic() - r.started > START_TIMEOUT:
                    with self._lock:
                        if r.proc is proc and r.state == "starting":
                            proc.terminate()  # the keeper stops it; sync() sees the exit
                            self._exited(r, f"not answering within {START_TIMEOUT:g}s")
                else:
                    time.sleep(0.2)
                    self._calls.put(model)
                return
            with self._lock:
                if r.proc is not proc or r.state != "starting":
                    return
                r.state, r.error, r.failures_in_row, self.changed = "ready", "", 0, True
        elif state != "ready":
            return
        have = self._read_workers(r)
        if have is None:
            return  # not answering now: the next verification tries again
        for url in sorted(set(have) - wanted):
            status, text = self._call(r, "POST", "/remove_worker?url=" + urllib.parse.quote(url, safe=""))
            if status != 200 and not self._closed:
                self.log(f"router for {model}: removing {url} failed ({status}: {text[:120]})")
        for url in sorted(wanted - set(have)):
            status, text = self._call(r, "POST", "/add_worker?url=" + urllib.parse.quote(url, safe=""))
            if status != 200 and "already exists" not in text and not self._closed:
                self.log(f"router for {model}: adding {url} failed ({status}: {text[:120]})")
        after = self._read_workers(r) if set(have) != wanted else have
        with self._lock:
            if r.proc is not proc or after is None:
                return
            healthy = {url for url, ok in after.items() if ok}
            if healthy != r.workers:
                r.workers, self.changed = healthy, True
            if set(after) != r.wanted:
                self._calls.put(model)  # changed meanwhile, or a call failed: again

    def _apply_loop(self) -> None:
        while not self._closed:
            try:
                model = self._calls.get(timeout=VERIFY_INTERVAL)
            except queue.Empty:  # quiet: read every live router's list back, repair it
                with self._lock:
                    due = [m for m, r in self.routers.items() if r.state == "ready"]
                for m in due:
                    self._calls.put(m)
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
        self.key_check.close()
