"""Slurm integration tests: real jobs on the test cluster (scripts/slurm-cluster start).

When the cluster is not up the tests skip, unless AEGIS_REQUIRE_SLURM=1 (CI and scripts/test
set it): then they fail, and so does any skip at all among them, so a silent skip can never
stand in for a pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import slurm_jobs
from harness import NoSilentSkips

_REQUIRE = NoSilentSkips(os.environ.get("AEGIS_REQUIRE_SLURM") == "1", "AEGIS_REQUIRE_SLURM",
                         "Slurm")
pytest_runtest_logreport = _REQUIRE.logreport
pytest_sessionfinish = _REQUIRE.sessionfinish


@pytest.fixture(scope="session", autouse=True)
def slurm_cluster():
    """The running test cluster; exports SLURM_CONF for this process and every job it submits."""
    proc = subprocess.run([str(slurm_jobs.REPO / "scripts" / "slurm-cluster"), "status"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        _REQUIRE.unavailable(f"the test Slurm cluster is not up ({why}); start it: "
                             "scripts/slurm-cluster start")
    os.environ["SLURM_CONF"] = str(slurm_jobs.SLURM_CONF)
    nodes = slurm_jobs.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N"]).stdout.split()
    assert len(nodes) >= 2, f"the test cluster needs >= 2 nodes, sinfo lists {nodes}"


@pytest.fixture
def jobs():
    """Job ids a test submits; whatever is still queued or running at teardown is cancelled, so a
    failing test leaves no job (and no job processes) behind."""
    submitted: list[str] = []
    yield submitted
    for job_id in submitted:
        if slurm_jobs.job_state(job_id) not in slurm_jobs.FINISHED | {""}:
            slurm_jobs.cancel(job_id)
    for job_id in submitted:
        try:
            slurm_jobs.wait_finished(job_id, timeout=30)
        except slurm_jobs.JobError:
            pass


@pytest.fixture
def venv_bin() -> Path:
    """bin/ of the Python running the tests: its mpiexec (PyPI mpich's hydra), python, aegis."""
    return Path(sys.executable).parent

