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
            stat = (entry / "stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":
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
