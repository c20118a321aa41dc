"""Platforms are data: what a node has and how a site launches one rank per node.

Adding a site is one record in PLATFORMS. Nothing here touches the system except
`local`, which reports this machine's CPU count (a CPU core is the "device" there).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

# The batch systems a platform may name (aegis.scheduler has one backend module for each).
SCHEDULERS = ("pbs", "slurm")


@dataclass(frozen=True)
class Platform:
    name: str
    devices_per_node: int
    # Environment variable that pins an instance to its devices: the device ids joined by
    # affinity_separator.
    affinity_var: str
    scheduler: str  # "pbs" | "slurm" (a key of aegis.scheduler.BACKENDS)
    # argv prefix that starts one rank per node; "{nodes}" is replaced by the node count.
    rank_launcher: tuple[str, ...]
    node_local_dir: str
    # Shell lines run at the top of the batch script (module loads, proxies, ...).
    setup_lines: tuple[str, ...] = ()
    # Extra scheduler directives, verbatim (e.g. Slurm "-C nvme").
    directives: tuple[str, ...] = ()
    # Environment every instance gets on this platform.
    instance_env: dict[str, str] = field(default_factory=dict)
    # vLLM's CPU backend takes one core list per TP rank, separated by "|" ("0|1").
    affinity_separator: str = ","
    # HPC sites charge jobs to a project: `aegis submit` refuses to submit without `account`.
    requires_account: bool = True
    # How a node's serving address (bind address, VLLM_HOST_IP, the endpoints file) is formed
    # from its name in the node list; see aegis.launch.addresses. "{host}": the name as
    # listed, "{short}": its first label, "interface:NAME": that interface's IPv4 address.
    address: str = "{host}"
    # `apptainer exec` flags that give a container this platform's devices.
    container_flags: tuple[str, ...] = ()
    # Per-instance cache variables this platform's stack needs beyond aegis's own (see
    # aegis.launch.caches), e.g. MIOpen's user database on ROCm.
    cache_vars: tuple[str, ...] = ()

    def launcher_argv(self, nodes: int) -> list[str]:
        return [part.replace("{nodes}", str(nodes)) for part in self.rank_launcher]


PLATFORMS: dict[str, Platform] = {
    p.name: p
    for p in (
        Platform(
            name="aurora",
            devices_per_node=12,  # 6 Intel GPUs x 2 tiles, addressed flat
            affinity_var="ZE_AFFINITY_MASK",
            scheduler="pbs",
            rank_launcher=("mpiexec", "-n", "{nodes}", "--ppn", "1", "--cpu-bind", "none"),
            node_local_dir="/tmp",
            setup_lines=("module load frameworks",),
            directives=("-l place=scatter",),  # one select chunk per node
            instance_env={"ZE_FLAT_DEVICE_HIERARCHY": "FLAT"},
            # Serve on the Slingshot high-speed network: PBS_NODEFILE lists the management
            # names (x4000c0s0b0n0.hostmgmt2000.cm...), which are on the slow network.
            address="{short}.hsn.cm.aurora.alcf.anl.gov",
            # Intel GPUs are /dev/dri/*, which Apptainer binds by default (no --nv/--rocm).
            container_flags=(),
            cache_vars=("NEO_CACHE_DIR", "SYCL_CACHE_DIR"),
        ),
        Platform(
            name="polaris",
            devices_per_node=4,
            affinity_var="CUDA_VISIBLE_DEVICES",
            scheduler="pbs",
            rank_launcher=("mpiexec", "-n", "{nodes}", "--ppn", "1"),
            node_local_dir="/local/scratch",
            setup_lines=("module use /soft/modulefiles", "module load conda"),
            directives=("-l place=scatter",),
            container_flags=("--nv",),
        ),
        Platform(
            name="frontier",
            devices_per_node=8,  # 4 MI250X x 2 GCDs
            affinity_var="ROCR_VISIBLE_DEVICES",
            scheduler="slurm",
            # The one rank per node hosts all instances of the node: give it every core (56
            # usable in low-noise mode), else Slurm confines its children to one CPU.
            rank_launcher=("srun", "-N", "{nodes}", "-n", "{nodes}", "--ntasks-per-node=1",
                           "--cpus-per-task=56", "--gpus-per-node=8", "--cpu-bind=none"),
            node_local_dir="/mnt/bb/$USER",
            setup_lines=("module load PrgEnv-gnu rocm",),
            directives=("-C nvme",),
            # Node names resolve to the Slingshot (hsn0) addresses on Frontier.
            container_flags=("--rocm",),
            # MIOpen's user database defaults to ~/.config/miopen on the shared home, which
            # concurrent processes corrupt (OLCF recommends a node-local path per process).
            cache_vars=("MIOPEN_USER_DB_PATH", "MIOPEN_CUSTOM_CACHE_DIR"),
        ),
    )
}


def _local_mpiexec() -> str:
    # The mpiexec of this interpreter's environment (PyPI mpich) matches the MPI mpi4py
    # loads; a bare "mpiexec" may resolve to a Slurm wrapper (slurm-wlm-torque installs one).
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else "mpiexec"


def local_platform() -> Platform:
    """This machine: one CPU core per device, ranks started by this environment's mpiexec."""
    return Platform(
        name="local",
        devices_per_node=max(1, len(os.sched_getaffinity(0))),
        affinity_var="VLLM_CPU_OMP_THREADS_BIND",
        affinity_separator="|",
        scheduler="slurm",
        # --ppn 1: inside a Slurm allocation hydra otherwise packs every rank onto the first
        # node (it fills each node's CPUs); outside one it is harmless.
        rank_launcher=(_local_mpiexec(), "-n", "{nodes}", "--ppn", "1"),
        node_local_dir=os.environ.get("TMPDIR", "/tmp"),
        requires_account=False,
    )


def platform_names() -> list[str]:
    return sorted([*PLATFORMS, "local"])


def get_platform(name: str) -> Platform:
    if name == "local":
        return local_platform()
    try:
        return PLATFORMS[name]
    except KeyError:
        raise KeyError(f"unknown platform {name!r}; known: {', '.join(platform_names())}") from None
