"""Aegis: launch fleets of vLLM inference servers on HPC allocations.

    import aegis
    run = aegis.submit("fleet.yaml")          # or aegis.Run.open(run_dir)
    run.wait_ready(timeout=1800)
    print(run.router_url())

Data flow (one module or package per step):
    config -> plan -> scheduler (batch script, submit) -> run (the Run a user holds)
    -> launch.allocation -> bcast (stage weights) -> launch.instances -> launch.readiness
    -> launch.board (endpoints file, launch.router)
"""

from .version import __version__

__all__ = ["Run", "submit"]


def __getattr__(name):  # Run and submit on first use: `import aegis` stays light
    if name in __all__:
        from . import clients  # the Run you hold, with what you do with a fleet

        return getattr(clients, name)
    raise AttributeError(f"module 'aegis' has no attribute {name!r}")
