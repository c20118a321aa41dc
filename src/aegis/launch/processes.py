"""Starting and stopping instance processes. Each runs its rendered script under a keeper
(keeper.py: a child subreaper in its own session), which stops every descendant of the
instance when asked, when the instance's leader exits, and when the launcher dies, even of
SIGKILL."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

from . import keeper
from .instances import Part, render_script

# `python -I -S keeper.py`: the keeper imports nothing of aegis nor of site-packages.
KEEPER_ARGV = (sys.executable, "-I", "-S", keeper.__file__)
KEEPER_MARGIN = 5.0  # seconds the launcher waits for a keeper beyond its grace before KILL


def adopt_orphans(on: bool) -> None:
    """Make this process a child subreaper (or stop being one): processes whose keeper was
    killed are then re-parented here, where remove_strays finds and reaps them."""
    keeper._prctl(keeper.PR_SET_CHILD_SUBREAPER, int(on))


def _marked_by(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for var in f.read().split(b"\0"):
                if var.startswith(keeper.KEEPER_ENV.encode() + b"="):
                    return int(var.split(b"=", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def remove_strays(dead_keepers: set[int]) -> None:
    """KILL every process left by the instances of keepers that were killed (their mark in
    the environment), and reap those re-parented to this process."""
    for _ in range(100):  # a process may fork while we kill: repeat until none is left
        strays = [int(e) for e in os.listdir("/proc")
                  if e.isdigit() and _marked_by(int(e)) in dead_keepers]
        if not strays:
            return
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
        for pid in strays:  # ours once re-parented here (this process is a subreaper)
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def kept(argv: list[str], grace: float) -> list[str]:
    """argv run under a keeper: nothing it starts outlives the launcher. Stop it with SIGTERM
    to the keeper (TERM, `grace` seconds, KILL to every descendant)."""
    return [*KEEPER_ARGV, "--parent", str(os.getpid()), "--grace", f"{grace:g}", "--", *argv]


class BindProblem(NamedTuple):
    in_use: bool  # False: the address itself is wrong (not this node's, not an address)
    message: str


def bind_problem(host: str, port: int) -> BindProblem | None:
    """Why a server could not listen on host:port, or None. SO_REUSEADDR as servers set it,
    so TIME_WAIT leftovers of a previous run do not count."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return BindProblem(True, f"port {port} on {host} is already in use")
            return BindProblem(False, f"cannot listen on {host} port {port}: "
                                      f"{e.strerror or e}")
    return None


def port_in_use(host: str, port: int) -> bool:
    return bind_problem(host, port) is not None


def free_port(host: str, above: int, avoid: set[int]) -> int | None:
    """The first port after `above` that nothing listens on and that is not in `avoid`."""
    for port in range(above + 1, 65536):
        if port not in avoid and not port_in_use(host, port):
            return port
    return None


# --- whose server answers on a port ---

class Listener(NamedTuple):
    state: str  # "ours": every listening socket on the port is held by the instance's processes
    #             "nobody": nothing listens on it yet; "foreign": another process holds it
    detail: str = ""


def _listening_inodes(ports: set[int]) -> dict[int, set[int]]:
    """port -> inodes of the TCP sockets listening on it (any address, IPv4 and IPv6)."""
    found: dict[int, set[int]] = {p: set() for p in ports}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                        port = int(fields[1].rsplit(":", 1)[1], 16)
                        if port in found:
                            found[port].add(int(fields[9]))
        except (OSError, ValueError):
            continue
    return found


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _holder(inode: int) -> str:
    """Which process holds a socket (for the message), as far as this user can see."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and inode in _socket_inodes(int(entry)):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read(200).split(b"\0")[0].decode(errors="replace")
            except OSError:
                command = "?"
            return f"pid {entry}, {os.path.basename(command) or '?'}"
    return "a process this user cannot see"


def listeners(roots: dict[object, tuple[int, int]]) -> dict[object, Listener]:
    """For each key -> (root pid, port): who listens on that port on this node. A readiness
    probe sends the run's key, so it goes only to a server the instance itself started: a
    listening socket held by the root (the instance's keeper) or its descendants."""
    if not roots:
        return {}
    inodes = _listening_inodes({port for _, port in roots.values()})
    tree = keeper.children()
    out: dict[object, Listener] = {}
    for key, (root, port) in roots.items():
        listening = inodes.get(port, set())
        if not listening:
            out[key] = Listener("nobody", f"nothing listens on port {port} yet")
            continue
        ours = set().union(*(_socket_inodes(pid)
                             for pid in [root, *keeper.descendants(root, tree)]))
        foreign = listening - ours
        out[key] = (Listener("ours") if not foreign else
                    Listener("foreign", f"port {port} is held by another process "
                                        f"({_holder(min(foreign))}), not by this instance"))
    return out


def write_script(part: Part) -> None:
    path = Path(part.script_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_script(part), encoding="utf-8")
    path.chmod(0o755)


class Running:
    """One started attempt of a part: its keeper process and where its log for this attempt
    begins. Stopping it gives the instance `grace` seconds between TERM and KILL."""

    def __init__(self, part: Part, attempt: int, grace: float):
        self.part = part
        self.grace = grace
        log = Path(part.log_path)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            if attempt:
                f.write(f"\n--- aegis: restart {attempt} at {time.strftime('%H:%M:%S')} ---\n".encode())
            self.log_offset = f.tell()
            # The script file is run with bash (not exec'd) so a missing exec bit on a shared
            # file system does not matter; `exec` inside it makes vLLM the session leader.
            # The keeper gets a session of its own too: a terminal's Ctrl-C reaches only the
            # launcher, which stops everything in order.
            self.proc = subprocess.Popen(
                kept(["bash", part.script_path], grace), stdin=subprocess.DEVNULL, stdout=f,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        self.started = time.monotonic()
        self.stopped = False
        self.strays_removed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self) -> int | None:
        """The keeper's status: the instance leader's (128+N for signal N), once all is gone.
        A keeper killed by a signal (negative status) could not clean up: its strays are
        removed here."""
        code = self.proc.poll()
        if code is not None and code < 0 and not self.strays_removed:
            self.strays_removed = True
            remove_strays({self.proc.pid})
        return code

    def stop(self) -> None:
        """Ask the keeper to stop the instance (TERM to every descendant, `grace`, KILL); does
        not wait. Once only, so a later call signals no reused pid."""
        if not self.stopped:
            self.stopped = True
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            with open(self.part.log_path, "rb") as f:
                # the tail only: a server that ran for days has a long log
                f.seek(max(self.log_offset, os.fstat(f.fileno()).st_size - 64 * 1024))
                data = f.read()
        except OSError:
            return []
        return list(deque(data.decode(errors="replace").splitlines(), maxlen=lines))


def stop_all(running: list[Running]) -> None:
    """Stop every instance (see Running.stop) and wait for their keepers. A keeper that does
    not finish in time is killed; its instance's leader then dies of its parent-death signal."""
    for r in running:
        r.stop()
    deadline = time.monotonic() + max((r.grace for r in running), default=0) + KEEPER_MARGIN
    for r in running:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()
        r.exit_code()  # removes the strays of a keeper that was killed
