"""What a deployment is, as data: Config (global keys) and ModelConfig (one served model).
Validated values only: aegis.config.load builds them; nothing here reads or checks input."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..platforms import get_platform
from .errors import ConfigError  # noqa: F401 (part of this module's face, as before)
from .keys import GLOBAL_KEYS

DEFAULT_PORT_START = 8000


@dataclass(frozen=True)
class ModelConfig:
    name: str  # Hugging Face model id; also the served model name unless set
    instances: int = 1
    tensor_parallel_size: int = 1
    # Where the weights live on the parallel file system (a HF model directory). When set, the
    # launcher stages it once per node into the node-local HF cache under hf_home.
    model_source: str | None = None
    extra_vllm_args: tuple[str, ...] = ()
    served_model_name: str | None = None

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.name


@dataclass(frozen=True)
class Config:
    models: tuple[ModelConfig, ...]
    platform: str = "aurora"
    scheduler: str | None = None  # None: the platform's scheduler
    port_start: int | None = None  # None: 8000, or free ports when `aegis launch` runs local
    # Internal vLLM/torch ports: instance slot s on a node gets
    # [internal_port_start + s*INTERNAL_PORTS_PER_SLOT, ... + INTERNAL_PORTS_PER_SLOT).
    internal_port_start: int = 30000
    hf_home: str = "/tmp/hf_home"  # from_mapping: <platform node_local_dir>/hf_home
    walltime: str = "01:00:00"
    account: str | None = None
    queue: str | None = None
    filesystems: str | None = "flare:home"
    job_name: str = "aegis"
    run_dir: str = "aegis-runs"  # parent of per-submission run directories
    startup_timeout: float = 1800.0
    endpoints_file: str = "endpoints.json"  # relative paths resolve inside the run directory
    conda_env: str | None = None
    vllm_command: str = "vllm serve"
    max_restarts: int = 3
    allow_partial: bool = False  # exit 0 when at least one instance is ready
    # Launcher timing (seconds): checks while starting, one probe, checks of a ready instance,
    # failed checks in a row that count as hung, first restart delay, TERM -> KILL.
    poll_interval: float = 0.5
    probe_timeout: float = 5.0
    liveness_interval: float = 30.0
    liveness_failures: int = 3
    restart_backoff: float = 2.0
    stop_grace: float = 15.0
    # Staging of model_source (None: aegis.bcast.stage()'s own default).
    stage_chunk_size: int | None = None
    stage_depth: int | None = None
    stage_stall_timeout: float | None = None
    stage_readers: int | None = None
    router: bool | None = None  # None: on for every model with 2 or more instances
    router_args: tuple[str, ...] = ()
    # Name of an environment variable holding the API key vLLM should require. Only the
    # name is ever stored or rendered; the value reaches vLLM through its environment.
    api_key_env: str | None = None
    # Extra environment for every instance (e.g. VLLM_CPU_KVCACHE_SPACE), as (name, value).
    instance_env: tuple[tuple[str, str], ...] = ()
    # Node-local storage for the staged environment and the instances' caches. None: the
    # platform's node_local_dir. $VARS expand on each node.
    node_local_dir: str | None = None
    # A packed Python environment (conda-pack / venv-pack tarball) or an Apptainer image on
    # the shared file system: staged to node_local_dir once per node, instances run from it.
    env_source: str | None = None
    container: str | None = None
    # Run once per node, under a lock, before the instances start (after the built-in
    # tokenizer pre-warm), inside the instances' environment.
    prewarm_command: str | None = None
    # Seconds before the stop at walltime that instances are marked draining (no new requests).
    drain_seconds: float = 60.0
    # `aegis submit --chain N`: seconds each successor starts before its predecessor's end.
    chain_overlap: float = 600.0
    # The login side only (aegis.config.keys.LOGIN_KEYS; not written into a run's config):
    # the login node `aegis submit --remote` runs on, how aegis starts there, and whether
    # submit fetches the weights into model_source first.
    remote: str | None = None
    remote_aegis: str = "aegis"
    download_weights: bool = False
    hf_token: str | None = field(default=None, repr=False)  # accepted, never rendered
    ignored_keys: tuple[str, ...] = ()  # legacy keys accepted with a warning

    @property
    def total_instances(self) -> int:
        return sum(m.instances for m in self.models)

    @property
    def routed_models(self) -> list[str]:
        """Served names of the models that get a router (key `router`; default: 2+ instances)."""
        if self.router is False:
            return []
        return [m.served_name for m in self.models if self.router or m.instances >= 2]

    @property
    def http_ports(self) -> int:
        """Ports from port_start on: one per instance, then one per router."""
        return self.total_instances + len(self.routed_models)

    @property
    def first_port(self) -> int:
        return DEFAULT_PORT_START if self.port_start is None else self.port_start

    @property
    def effective_scheduler(self) -> str:
        return self.scheduler or get_platform(self.platform).scheduler

    def to_mapping(self) -> dict[str, Any]:
        """The resolved config as plain data (models-list form), loadable by from_mapping.

        Secrets (hf_token) and the legacy-key bookkeeping are left out."""
        out: dict[str, Any] = {}
        for key in GLOBAL_KEYS:
            if key.secret:
                continue
            value = getattr(self, key.name)
            out[key.name] = (dict(value) if key.name == "instance_env" else
                             list(value) if isinstance(value, tuple) else value)
        out["models"] = [_model_to_mapping(m) for m in self.models]
        return out

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _model_to_mapping(model: ModelConfig) -> dict[str, Any]:
    return {
        "model": model.name,
        "instances": model.instances,
        "tensor_parallel_size": model.tensor_parallel_size,
        "model_source": model.model_source,
        "served_model_name": model.served_model_name,
        "extra_vllm_args": list(model.extra_vllm_args),
    }
