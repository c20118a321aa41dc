"""Helpers the test folders share (tests/conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def aegis_argv() -> list[str]:
    """The `aegis` command of the Python running the tests (console script when installed)."""
    script = Path(sys.executable).parent / "aegis"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "aegis.cli"]


class NoSilentSkips:
    """For a suite that needs a service: without it the tests skip, unless `required` (CI sets
    the variable); then they fail, and so does any skip among them, so a skip can never stand
    in for a pass. A conftest binds logreport/sessionfinish as its hooks (runtest hooks only
    see the items under their own folder)."""

    def __init__(self, required: bool, variable: str, what: str):
        self.required, self.variable, self.what = required, variable, what
        self.skipped: list[str] = []

    def unavailable(self, message: str) -> None:
        if self.required:
            pytest.fail(f"{self.variable}=1 but {message}", pytrace=False)
        pytest.skip(message)

    def logreport(self, report) -> None:
        if report.skipped:
            self.skipped.append(report.nodeid)

    def sessionfinish(self, session, exitstatus) -> None:
        if self.required and self.skipped and session.exitstatus == 0:
            print(f"\n{self.variable}=1 but {len(self.skipped)} {self.what} test(s) were "
                  f"skipped: {', '.join(self.skipped)}", file=sys.stderr)
            session.exitstatus = 1


# Set in the launcher's environment; every process it starts inherits it, so the process
# table shows what a run left behind, whatever the process calls itself (vLLM renames its
# children, e.g. "VLLM::EngineCore"; keepers and MPI proxies carry no model name).
RUN_MARKER = "AEGIS_TEST_RUN"


def marked_processes(token: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment holds RUN_MARKER=token."""
    needle = f"{RUN_MARKER}={token}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_bytes()  # the name in it need not be UTF-8
            if stat[stat.rindex(b")") + 2:].startswith(b"Z"):
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found[int(entry.name)] = cmd.strip()
    return found


def wait_gone(token: str, timeout: float) -> dict[int, str]:
    """Wait until no marked process is left; returns what is still there at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = marked_processes(token)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def stop_launcher(proc, timeout: float) -> None:
    """SIGTERM a launcher still running (as a batch system would), SIGKILL its process group
    if it has not exited within `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def kill_marked(token: str) -> None:
    """Last-resort cleanup so a failing test or benchmark leaves nothing running."""
    for pid in marked_processes(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- the process family of a stand-in started with --spawn-child --spawn-grandchild
#     --spawn-daemon (tests/standin_vllm.py), told apart by argv, not by counting ---

def _standin_role(argv: list[str]) -> str | None:
    import standin_vllm

    if len(argv) >= 3 and argv[1].endswith("standin_vllm.py") and argv[2] == "serve":
        return "server"
    if len(argv) >= 4 and argv[1] == "-c":
        code, tag = argv[2], argv[3]
        if tag == "standin-grandchild" and code == standin_vllm._SLEEP:
            return "grandchild"  # exec'd: until then the fork has its spawner's argv
        for kind, spawned in standin_vllm._SPAWNED.items():
            if tag == f"standin-{kind}" and code == spawned:
                return "spawner" if kind == "grandchild" else kind
    return None


def standin_processes(token: str) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, role) of the live stand-in processes whose argv names token: role
    server, child, spawner (starts the grandchild), grandchild or daemon."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:  # bytes: another process's name or command line need not be UTF-8
            stat = (entry / "stat").read_bytes()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        state, ppid = stat[stat.rindex(b")") + 2:].split()[:2]
        role = _standin_role(argv)
        if state != b"Z" and role and any(token in arg for arg in argv):
            found[int(entry.name)] = (int(ppid), role)
    return found


def unsettled_families(procs: dict[int, tuple[int, str]], servers: int) -> str:
    """Why `procs` (standin_processes) are not `servers` complete, settled families, or "".

    Settled: every process of the family has started and reached the place where it stays.
    The server's child and the spawner run under the server; the spawner's one child is the
    exec'd grandchild (while it forks, a copy with the spawner's argv stands in for it); the
    daemon's first process (setsid, fork, exit) is gone and its child is re-parented away
    from the stand-ins. Each of these is a final state, so a look at /proc that sees them
    all, and nothing else, sees a family that no longer changes by itself; a count cannot
    tell that (the first daemon process and a forking spawner count as members too, and a
    look at /proc is no snapshot: it can miss the daemon's hand-over entirely)."""
    kids: dict[int, list[str]] = {}
    for pid, (ppid, role) in procs.items():
        kids.setdefault(ppid, []).append(role)
    roles = sorted(role for _, role in procs.values())
    want = sorted(["server", "child", "spawner", "grandchild", "daemon"] * servers)
    if roles != want:
        return f"roles {roles}, want {want}"
    for pid, (ppid, role) in procs.items():
        under = sorted(kids.get(pid, []))
        expected = {"server": ["child", "spawner"], "spawner": ["grandchild"]}.get(role, [])
        if under != expected:
            return f"{role} {pid} has children {under}, want {expected}"
        if role == "daemon" and ppid in procs:
            return f"daemon {pid} is still the child of stand-in {ppid}"
    return ""


def wait_standin_families(token: str, servers: int, timeout: float = 30
                          ) -> dict[int, tuple[int, str]]:
    """Until exactly `servers` stand-in families of token are complete and settled (see
    unsettled_families); returns them. Fails with what was last seen at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        procs = standin_processes(token)
        why = unsettled_families(procs, servers)
        if not why:
            return procs
        assert time.monotonic() < deadline, (
            f"no {servers} settled stand-in families within {timeout}s: {why}; {procs}")
        time.sleep(0.05)


def until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll until `predicate()` is truthy; -> its value. Fails the test, naming `what`, after
    `timeout` seconds: an event waited on with a clear deadline, never a bare sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        time.sleep(interval)
