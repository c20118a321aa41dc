"""MPI tests: run under mpiexec with pytest-mpi's --with-mpi (scripts/run-mpi-tests).

pytest-mpi silently skips @pytest.mark.mpi tests without --with-mpi and the run exits 0, so
this conftest turns that (and a world of fewer than 2 ranks, and any skip at all) into a
failed session: a skipped MPI test can never stand in for a pass.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest


_skipped: list[str] = []


def pytest_configure(config):
    if not config.getoption("--with-mpi", default=False):
        raise pytest.UsageError("tests/mpi must run under mpiexec with --with-mpi "
                                "(use scripts/run-mpi-tests)")
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() < 2:
        raise pytest.UsageError("tests/mpi need at least 2 MPI ranks "
                                "(mpiexec -n 2 ...; use scripts/run-mpi-tests)")


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _skipped and session.exitstatus == 0:
        print(f"\nFAIL: {len(_skipped)} MPI test(s) skipped: {_skipped}", file=sys.stderr)
        session.exitstatus = 1
    if session.testscollected == 0 and session.exitstatus == 0:
        session.exitstatus = 1


@pytest.fixture
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def shared_tmp(comm):
    """A directory every rank sees (one machine): made by rank 0, removed after all ranks."""
    path = tempfile.mkdtemp(prefix="aegis-mpi-") if comm.rank == 0 else None
    path = Path(comm.bcast(path, root=0))
    comm.Barrier()
    yield path
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    comm.Barrier()


@pytest.fixture(autouse=True)
def no_shared_ring_left():
    """A stage's shared chunk ring (/dev/shm/aegis-ring-<leader pid>-*) is unlinked as soon as
    its ranks mapped it, on success and on every failure."""
    yield
    left = [p.name for p in Path("/dev/shm").glob(f"aegis-ring-{os.getpid()}-*")]
    assert not left, f"shared rings left in /dev/shm: {left}"


@pytest.fixture(autouse=True)
def no_children_left():
    """The staging core must reap every tar it starts, on success and on failure."""
    yield
    mine = os.getpid()
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == mine:
                left.append(entry)
    assert not left, f"child processes left behind: {left}"
