"""Starting and stopping instance processes. Each runs its rendered script in its own session
(process group), so stopping it reaches vLLM's own children too."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

from .instances import Part, render_script

_PR_SET_PDEATHSIG = 1


def _die_with_launcher() -> None:
    """Runs in the child before exec: if the launcher is killed outright (SIGKILL, OOM), the
    kernel sends the instance SIGTERM, so it is not orphaned. Linux only; best effort."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


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


def write_script(part: Part) -> None:
    path = Path(part.script_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_script(part), encoding="utf-8")
    path.chmod(0o755)


class Running:
    """One started attempt of a part: the process and where its log for this attempt begins."""

    def __init__(self, part: Part, attempt: int):
        self.part = part
        log = Path(part.log_path)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            if attempt:
                f.write(f"\n--- aegis: restart {attempt} at {time.strftime('%H:%M:%S')} ---\n".encode())
            self.log_offset = f.tell()
            # The script file is run with bash (not exec'd) so a missing exec bit on a shared
            # file system does not matter; `exec` inside it makes vLLM the group leader.
            self.proc = subprocess.Popen(
                ["bash", part.script_path], stdin=subprocess.DEVNULL, stdout=f,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_launcher,
                close_fds=True)
        self.started = time.monotonic()
        self.stopped = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            with open(self.part.log_path, "rb") as f:
                # the tail only: a server that ran for days has a long log
                f.seek(max(self.log_offset, os.fstat(f.fileno()).st_size - 64 * 1024))
                data = f.read()
        except OSError:
            return []
        return list(deque(data.decode(errors="replace").splitlines(), maxlen=lines))


def stop_all(running: list[Running], grace: float) -> None:
    """TERM every process group, wait up to `grace` seconds, then KILL what is left (including
    group members that outlived their leader). Each group is stopped once: a later call does
    not signal a process group id that may since have been reused."""
    running = [r for r in running if not r.stopped]
    for r in running:
        r.stopped = True
        _signal_group(r.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(r.proc.poll() is None for r in running):
        time.sleep(0.05)
    for r in running:
        _signal_group(r.pid, signal.SIGKILL)
        try:
            r.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
