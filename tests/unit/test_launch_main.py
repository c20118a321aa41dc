"""How `aegis launch` decides to start the MPI job itself, and the job it starts."""

import sys
from pathlib import Path

import pytest

from aegis.launch import RANK_MARKER, rank_launch_argv, under_mpi
from aegis.platforms import get_platform


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"PMI_SIZE": "1", "PMI_RANK": "0"}, False),  # a singleton: still start the ranks
    ({"PMI_SIZE": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_ID": "0"}, True),
    ({"SLURM_JOB_ID": "12", "SLURM_NNODES": "4"}, False),  # batch script: not in a step yet
    ({RANK_MARKER: "2"}, True),
    ({"PMI_SIZE": "junk"}, False),
])
def test_under_mpi(env, expected):
    assert under_mpi(env) is expected


def test_rank_job_for_aurora_and_frontier():
    args = ["--config", "c.yaml", "--once"]
    aurora = rank_launch_argv(get_platform("aurora"), 3, args)
    launcher = aurora[:aurora.index(sys.executable)]
    assert Path(launcher[0]).name == "mpiexec"
    assert launcher[1:] == ["-n", "3", "--ppn", "1", "--cpu-bind", "none"]
    assert aurora[len(launcher):] == [sys.executable, "-m", "aegis.launch", *args]
    frontier = rank_launch_argv(get_platform("frontier"), 2, args)
    assert frontier[:3] == ["srun", "-N", "2"] and "--ntasks-per-node=1" in frontier
    assert frontier[-5:] == ["-m", "aegis.launch", *args]


def test_local_rank_job_uses_this_pythons_mpiexec():
    argv = rank_launch_argv(get_platform("local"), 2, ["--config", "c"])
    sibling = Path(sys.executable).parent / "mpiexec"
    assert argv[0] == (str(sibling) if sibling.exists() else "mpiexec")
