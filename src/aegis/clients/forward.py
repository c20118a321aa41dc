"""`aegis forward RUN`: a tunnel from this machine (a laptop) through the login node to the
router of a run's model on its compute node, so an OpenAI client here uses
http://127.0.0.1:PORT/v1 (with the run's key: `aegis key --remote HOST RUN`).

Aegis holds the local listening socket itself (127.0.0.1 only) and carries each accepted
connection over its own `ssh -W ROUTERHOST:PORT`, a client of the login node's master
connection (aegis.remote): nothing to authenticate again, and everything it opened goes with
it. Why not `ssh -N -L` over the master: a forwarding asked of a master through its control
socket belongs to the master, and outlives the `ssh -L` that asked for it (measured with
OpenSSH 9.2: the port still answered after that client exited, even after SIGKILL), so a killed
forward would leave its port taken until the master ends, and following the router to another
node would need the forwarding cancelled and asked again.

Every POLL_INTERVAL seconds the run's status is read through the login node (`aegis status
--json` there): the target is the model's ready router, else one of its ready instances; when
a chain's next generation takes over (another node, another port), new connections go there.
When the connection to the login node drops, the listening socket stays and the tunnel is
opened again as soon as the login node answers (connections meanwhile are closed at once).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from ..config import ConfigError
from ..remote import Remote, RemoteError
from ..run import RunError

POLL_INTERVAL = 5.0
RECONNECT_MAX = 30.0  # seconds between tries to reach the login node again, at most


@dataclass(frozen=True)
class Target:
    model: str
    kind: str  # "router" | "instance"
    host: str
    port: int
    url: str


def pick(status: dict[str, Any], model: str | None) -> tuple[str | None, Target | None, str]:
    """(the model, where to forward to or None, why none). ConfigError when the run serves
    several models and none was named, or not the one named."""
    records = [*(status.get("routers") or []), *(status.get("instances") or [])]
    models = sorted({r.get("model") for r in records if r.get("model")})
    if model is None:
        if len(models) > 1:
            raise ConfigError(f"the run serves {', '.join(models)}: name one with --model")
        model = models[0] if models else None
    elif models and model not in models:
        raise ConfigError(f"--model {model!r}: the run serves {', '.join(models)}")
    if status.get("phase") in ("failed", "ended"):
        return model, None, f"the run {status.get('phase')}: {status.get('reason', '')}"
    for kind, key in (("router", "routers"), ("instance", "instances")):
        for record in status.get(key) or []:
            if record.get("model") == model and record.get("state") == "ready":
                where = urlsplit(record.get("url", ""))
                if where.hostname and where.port:
                    return model, Target(model, kind, where.hostname, where.port,
                                         record["url"]), ""
    return model, None, f"no ready router or instance of {model or 'the model'} yet"


class Tunnel:
    def __init__(self, remote: Remote, status: Callable[[], dict[str, Any]], *,
                 model: str | None = None, local_port: int = 0,
                 say: Callable[[str], None] = lambda line: None,
                 poll_interval: float = POLL_INTERVAL):
        self.remote, self.status, self.model, self.say = remote, status, model, say
        self.poll_interval = poll_interval
        self.target: Target | None = None
        self.ended: str | None = None  # why the tunnel stops by itself (the run ended)
        self._stop = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        try:
            self.sock = socket.create_server(("127.0.0.1", local_port))
        except OSError as err:
            why = os.strerror(err.errno) if err.errno else str(err)
            raise ConfigError(f"--local-port {local_port}: 127.0.0.1:{local_port} cannot be "
                              f"used here ({why}; another program listens there?): pick "
                              "another port, or leave --local-port out for a free one") from None
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    # -- the target, through the login node -------------------------------------------------
    def refresh(self) -> None:
        """Read the run's status once and follow its router. RemoteError when the login node
        cannot be reached; ConfigError / RunError from the remote aegis."""
        self.model, target, why = pick(self.status(), self.model)
        if target != self.target:
            if target is not None:
                self.say(f"{target.model}: forwarding to its {target.kind} {target.host}:"
                         f"{target.port}" + (" (it moved)" if self.target else ""))
            else:
                self.say(why)
            self.target = target
        if target is None and why.startswith("the run "):
            self.ended = why

    def wait_target(self) -> None:
        """Until the run has a ready router or instance (or ends: RunError)."""
        while True:
            self.refresh()
            if self.ended:
                raise RunError(self.ended)
            if self.target is not None:
                return
            time.sleep(self.poll_interval)

    def _poll(self) -> None:
        down_since = None
        wait = self.poll_interval
        while not self._stop.wait(wait):
            try:
                self.refresh()
            except RemoteError as err:
                if down_since is None:
                    down_since = time.monotonic()
                    self.say(f"{err}; opening the tunnel again as soon as it answers")
                wait = min(RECONNECT_MAX, max(1.0, wait * 2))
                continue
            except (ConfigError, RunError) as err:  # the remote aegis' word: keep the target
                self.say(f"status: {err}")
            if down_since is not None:
                self.say(f"{self.remote.target}: back after {time.monotonic() - down_since:.0f}s")
                down_since = None
            wait = self.poll_interval
            if self.ended:
                self._stop.set()
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    # -- connections --------------------------------------------------------------------------
    def serve(self) -> None:
        """Accept connections until stop() (or Ctrl-C); each one crosses to the target."""
        poller = threading.Thread(target=self._poll, name="aegis-forward-poll", daemon=True)
        poller.start()
        self.sock.settimeout(0.5)
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                except socket.timeout:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                threading.Thread(target=self._carry, args=(conn,), daemon=True).start()
        finally:
            self.stop()
        if self.ended:
            raise RunError(self.ended)

    def _carry(self, conn: socket.socket) -> None:
        target = self.target
        proc = None
        try:
            if target is None:
                return
            self.remote.connect()  # never let `ssh -W` fall back to a login of its own
            proc = subprocess.Popen(self.remote.stdio_forward(target.host, target.port),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, bufsize=0)
            with self._lock:
                if self._stop.is_set():
                    return
                self._procs.add(proc)
            up = threading.Thread(target=self._up, args=(conn, proc), daemon=True)
            up.start()
            self._down(conn, proc)
            up.join()
        except (RemoteError, OSError):
            pass
        finally:
            conn.close()
            if proc is not None:
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.wait()
                with self._lock:
                    self._procs.discard(proc)

    @staticmethod
    def _up(conn: socket.socket, proc: subprocess.Popen) -> None:
        assert proc.stdin is not None
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                proc.stdin.write(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    @staticmethod
    def _down(conn: socket.socket, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.kill()
        for proc in procs:
            proc.wait()


def remote_status(remote: Remote, run: str) -> Callable[[], dict[str, Any]]:
    """`aegis status --json RUN` on the login node, as a callable; its one-line errors raised
    here (ConfigError for its exit 2, RunError otherwise), not printed twice."""
    import io
    import json

    def status() -> dict[str, Any]:
        said = io.BytesIO()
        code, out = remote.run(["status", "--json", "--", run], capture=True, relay=said)
        if code == 0:
            try:
                data = json.loads(out)
            except ValueError:
                raise RunError(f"{remote.target}: aegis status --json said no JSON") from None
            if isinstance(data, dict):
                return data
            raise RunError(f"{remote.target}: aegis status --json said no status")
        lines = [line.removeprefix("aegis: error: ")
                 for line in said.getvalue().decode(errors="replace").splitlines()
                 if line.startswith("aegis: error: ")]
        message = "; ".join(lines) or f"aegis status there exited {code}"
        raise (ConfigError if code == 2 else RunError)(message)

    return status
