"""What a launch is given besides the config (LaunchOptions), what every rank computes from
them alike before anything starts (Prepared), and what it returns (the exit codes)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..plan import Plan
from ..platforms import Platform
from ..scheduler.nodelist import Allocation

# 0 all ready (or a partial start allowed), 1 a failed run, 2 bad input; 128+N: signal N.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """A user mistake: printed as one line, exit 2."""


@dataclass(frozen=True)
class LaunchOptions:
    """What `aegis launch` takes besides the config: where the nodes and the run go."""

    nodes: str | None = None  # node names in rank order (a,b or node[1-4])
    nodefile: str | None = None  # one node name per line
    run_dir: str | None = None  # this run's directory (default: <config run_dir>/<job id>)
    bind_host: str | None = None  # address instances listen on (default: the node's)
    once: bool = False  # start, verify, write endpoints, stop and exit with the status

    def argv(self) -> list[str]:
        """These options as `aegis launch` flags (for the ranks it starts)."""
        out: list[str] = []
        for flag, value in (("--nodes", self.nodes), ("--nodefile", self.nodefile),
                            ("--run-dir", self.run_dir), ("--bind-host", self.bind_host)):
            if value is not None:
                out += [flag, value]
        return out + (["--once"] if self.once else [])


@dataclass(frozen=True)
class Prepared:
    """The same on every rank: the config, its plan and the nodes it runs on."""

    options: LaunchOptions
    config: Config
    platform: Platform
    plan: Plan
    allocation: Allocation
    config_path: str | None  # the file the config came from (None: flags only)
    api_key: str | None  # api_key_env's value; None: the run makes its own key
    # aegis chose the ports (platform local, port_start unset): an instance whose port another
    # process takes may move to a free one
    movable_ports: bool = False
