"""Helpers the test folders share (tests/conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import sys
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
