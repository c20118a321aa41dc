"""In-allocation launcher: one MPI rank per node turns the plan into verified vLLM servers.

    aegis launch -c FILE [flags]          (starts the MPI job itself unless already under MPI)
    python -m aegis.launch -c FILE ...    (one rank; run it under mpiexec/srun, one per node)

Where each part lives (in the order a rank uses them):
    entry.py      aegis launch: prepare (plan + nodes), be a rank or start the MPI job
    rank.py       one rank and its phases: prepare -> stage -> start -> serve -> drain -> stop
    allocation.py, addresses.py   which nodes, which address each serves on
    rundir.py, endpoints.py, chain.py   the run directory, the endpoints file (written), a
                  chain's shared file
    leftovers.py, node.py, pernode.py, environment.py, caches.py   the node: what earlier runs
                  left, the environment or image, the pre-warm, private caches
    instances.py, processes.py, keeper.py   what each instance runs; starting and stopping it
                  so that nothing outlives the launcher
    supervise.py, readiness.py   the instances as a state machine; is a server really serving
    board.py, router.py, router_start.py   rank 0: the endpoints file, progress, the routers
    walltime.py, collective.py   the job's end; the collectives every phase agrees through

Public API: launch(config, options) -> exit code, LaunchOptions; the exit codes in options.py.
"""

from .entry import RANK_MARKER, launch, rank_launch_argv, under_mpi
from .messages import print_error
from .options import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, LaunchOptions, UsageError

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "RANK_MARKER", "LaunchOptions",
           "UsageError", "launch", "print_error", "rank_launch_argv", "under_mpi"]
