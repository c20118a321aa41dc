"""Aegis: launch fleets of vLLM inference servers on HPC allocations.

Data flow (one module or package per step):
    config -> plan -> scheduler (batch script, submit) -> launch.allocation
    -> bcast (stage weights) -> launch.instances -> launch.readiness -> launch.endpoints
"""

__version__ = "0.1.0"
