"""Deployment config: load YAML, merge CLI overrides, validate. Pure: no processes, no writes.

CONTRACT (other modules rely on these names; extend, don't rename):
    ModelConfig, Config, ConfigError, load_config(path, overrides) -> Config,
    from_mapping(data, overrides) -> Config, Config.to_mapping() (secrets omitted).

Precedence: CLI overrides > file > defaults. Validation errors raise ConfigError with one
line naming the key path, the bad value and what is allowed (the CLI exits 2 on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A user mistake in the config or flags: one line, key path first."""


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
    port_start: int = 8000
    # Internal vLLM/torch ports: instance slot s on a node gets
    # [internal_port_start + s*INTERNAL_PORTS_PER_SLOT, ... + INTERNAL_PORTS_PER_SLOT).
    internal_port_start: int = 30000
    hf_home: str = "/tmp/hf_home"
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
    # Name of an environment variable holding the API key vLLM should require. Only the
    # name is ever stored or rendered; the value reaches vLLM through its environment.
    api_key_env: str | None = None
    hf_token: str | None = field(default=None, repr=False)  # accepted, never rendered
    ignored_keys: tuple[str, ...] = ()  # legacy keys accepted with a warning

    @property
    def total_instances(self) -> int:
        return sum(m.instances for m in self.models)


# --- loading (minimal; full validation and CLI-flag mapping to be built on this) ---

_MODEL_KEYS = ("name", "instances", "tensor_parallel_size", "model_source", "extra_vllm_args",
               "served_model_name")


def _model(data: dict) -> ModelConfig:
    args = data.get("extra_vllm_args") or ()
    if isinstance(args, str):
        import shlex

        args = shlex.split(args)
    return ModelConfig(**{**{k: data[k] for k in _MODEL_KEYS if k in data},
                          "extra_vllm_args": tuple(str(a) for a in args)})


def from_mapping(data: dict, overrides: dict | None = None) -> Config:
    data = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    if "models" in data:
        models = tuple(_model(m) for m in data.pop("models"))
    else:
        models = (_model({"name": data.pop("model"), **{k: data.pop(k) for k in _MODEL_KEYS[1:] if k in data}}),)
    return Config(models=models, **data)


def load_config(path: str, overrides: dict | None = None) -> Config:
    import yaml

    with open(path, encoding="utf-8") as f:
        return from_mapping(yaml.safe_load(f) or {}, overrides)
