"""What a run directory holds: the one definition of every path in it. Pure.

    <run_dir>/
      job.sh            batch script (aegis submit)
      job.id            the scheduler's job id (aegis submit; absent for `aegis launch`)
      job.log           the batch job's stdout+stderr
      config.yaml       the resolved config the launcher runs (secrets left out)
      api-key           the run's key when api_key_env is unset (0600; aegis.credential);
                        a chain keeps one in its chain directory for all generations
      endpoints.json    instances, routers, launcher heartbeat (unless endpoints_file says
      endpoints.txt     elsewhere); host:port of each ready instance
      prometheus-targets.json   the ready instances for a Prometheus (file_sd_configs; 0644)
      instances/instance-NNNN.sh   what each instance process runs
      logs/instance-NNNN.log       its output; logs/router-<model>.log each router's
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

SCRIPT_NAME = "job.sh"
JOB_ID_NAME = "job.id"
LOG_NAME = "job.log"
CONFIG_NAME = "config.yaml"
ENDPOINTS_NAME = "endpoints.json"
API_KEY_NAME = "api-key"
CHAIN_NAME = "chain.json"  # a chain directory's record (aegis submit --chain)
PROMETHEUS_TARGETS_NAME = "prometheus-targets.json"  # rank 0 keeps it (docs/metrics.md)
# What the endpoints file (and its .txt) must never overwrite: the run's own files.
RUN_FILE_NAMES = (SCRIPT_NAME, JOB_ID_NAME, LOG_NAME, CONFIG_NAME, CHAIN_NAME,
                  PROMETHEUS_TARGETS_NAME, "instances", "logs")


@dataclass(frozen=True)
class RunLayout:
    root: str

    def _at(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def script(self) -> str:
        return self._at(SCRIPT_NAME)

    @property
    def job_id(self) -> str:
        return self._at(JOB_ID_NAME)

    @property
    def job_log(self) -> str:
        return self._at(LOG_NAME)

    @property
    def config(self) -> str:
        return self._at(CONFIG_NAME)

    @property
    def api_key(self) -> str:
        return self._at(API_KEY_NAME)

    @property
    def prometheus_targets(self) -> str:
        return self._at(PROMETHEUS_TARGETS_NAME)

    def endpoints(self, endpoints_file: str = ENDPOINTS_NAME) -> str:
        """The endpoints file: a relative endpoints_file resolves inside the run directory."""
        return os.path.normpath(self._at(os.path.expanduser(endpoints_file)))

    def instance_script(self, name: str) -> str:
        return self._at("instances", f"{name}.sh")

    def instance_log(self, name: str) -> str:
        return self._at("logs", f"{name}.log")

    def router_log(self, served_name: str) -> str:
        return self._at("logs", f"router-{re.sub(r'[^A-Za-z0-9._-]+', '-', served_name)}.log")
