"""What each instance process on this node runs: argv, environment, the rendered script. Pure.

A multi-node instance (TP larger than a node) has one process per node: the head (node rank 0)
serves HTTP; the others run vLLM with --headless and join it.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError, ModelConfig
from ..credential import GENERATED_KEY_VAR
from ..layout import RunLayout
from ..model_source import ModelSource
from ..plan import Instance
from ..platforms import Platform
from ..render import render_template
from .caches import WARM_TOKENIZERS, instance_cache_env, writable_dirs
from .environment import Runtime

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Part:
    """One process of one instance, on one node."""

    instance_id: int
    served_name: str
    model: str  # HF id
    node_index: int
    node_host: str  # name in the node list (logs, scripts); the endpoints file lists `address`
    node_rank: int  # 0 = head
    nnodes: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # exported by the script, in order
    api_key_env: str  # the variable holding the run's key (instances export it as VLLM_API_KEY)
    script_path: str
    log_path: str
    bind_host: str
    address: str  # this node's serving address (platform form); the endpoints file lists it
    port: int
    env_dir: str | None = None  # a node-local packed environment the script activates
    cache_dirs: tuple[str, ...] = ()  # created by the script; this process's alone

    @property
    def is_head(self) -> bool:
        return self.node_rank == 0

    @property
    def name(self) -> str:
        return part_name(self.instance_id, self.node_rank, self.nnodes)


def part_name(instance_id: int, node_rank: int, nnodes: int) -> str:
    return f"instance-{instance_id:04d}" + (f"-node{node_rank}" if nnodes > 1 else "")


def sanitise(name: str) -> str:
    """A model id as one safe path component: 'org/Model-1.5B' -> 'org--Model-1.5B'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "--", name.replace("/", "--")).strip(".-")
    return cleaned or "model"


def staged_model_dir(hf_home: str, model_name: str) -> str:
    """Where a model_source is staged on every node; vLLM is pointed at this path."""
    return str(Path(hf_home) / "aegis-models" / sanitise(model_name))


def model_arg(config: Config, model: ModelConfig, source: ModelSource | None = None) -> str:
    """What vLLM is given to load: the staged copy (for a hub-cache source, the snapshot
    inside it that refs/main names), or the model id."""
    if not model.model_source:
        return model.name
    staged = staged_model_dir(config.hf_home, model.name)
    return source.served_path(staged) if source else staged


def vllm_command_argv(config: Config) -> list[str]:
    return shlex.split(config.vllm_command)  # validated by aegis.config


def build_part(*, instance: Instance, model: ModelConfig, config: Config, platform: Platform,
               node_index: int, hosts: list[str], addresses: list[str], bind_host: str | None,
               run_dir: str, host_ips: list[str] | None = None,
               cache_root: Path | None = None, runtime: Runtime = Runtime(),
               source: ModelSource | None = None) -> Part:
    """The process of `instance` on node `node_index` (which must be one of instance.nodes).

    `addresses`: each node's serving address (aegis.launch.addresses); `host_ips`: the same
    resolved to IPs, for VLLM_HOST_IP and the torch rendezvous (default: the addresses).
    `cache_root`: this job's node-local cache directory (aegis.launch.caches); `runtime`: the
    environment or container the process runs in (aegis.launch.environment); `source`: the
    model's resolved model_source (what of the staged copy vLLM loads)."""
    node_rank = instance.nodes.index(node_index)
    nnodes = len(instance.nodes)
    host_ips = addresses if host_ips is None else host_ips
    head_ip = host_ips[instance.nodes[0]]
    address = addresses[node_index]
    argv = [*runtime.wrap(vllm_command_argv(config)), model_arg(config, model, source),
            "--host", bind_host or address,
            "--port", str(instance.port),
            "--tensor-parallel-size", str(model.tensor_parallel_size),
            "--served-model-name", instance.served_name]
    if nnodes > 1:
        argv += ["--nnodes", str(nnodes), "--node-rank", str(node_rank),
                 "--master-addr", head_ip, "--master-port", str(instance.master_port)]
        if node_rank > 0:
            argv.append("--headless")
    argv += list(model.extra_vllm_args)
    env = [(platform.affinity_var, platform.affinity_separator.join(str(d) for d in instance.devices)),
           *sorted(platform.instance_env.items()),
           *config.instance_env,
           ("HF_HOME", config.hf_home),
           ("HF_HUB_OFFLINE", "1"),
           ("VLLM_HOST_IP", host_ips[node_index]),
           ("VLLM_PORT", str(instance.vllm_port)),
           ("MASTER_ADDR", head_ip),
           ("MASTER_PORT", str(instance.master_port))]
    name = part_name(instance.id, node_rank, nnodes)
    caches = instance_cache_env(cache_root, name, platform.cache_vars) if cache_root else []
    env += caches
    return Part(instance_id=instance.id, served_name=instance.served_name, model=model.name,
                node_index=node_index, node_host=hosts[node_index], node_rank=node_rank,
                nnodes=nnodes, argv=tuple(argv), env=tuple(env),
                api_key_env=config.api_key_env or GENERATED_KEY_VAR,
                script_path=RunLayout(run_dir).instance_script(name),
                log_path=RunLayout(run_dir).instance_log(name),
                bind_host=bind_host or address, address=address, port=instance.port,
                env_dir=runtime.env_dir, cache_dirs=tuple(writable_dirs(caches)))


def with_port(part: Part, port: int) -> Part:
    """The same process serving on another HTTP port (a port taken after it was planned)."""
    argv = list(part.argv)
    argv[argv.index("--port") + 1] = str(port)
    return dataclasses.replace(part, argv=tuple(argv), port=port)


def render_script(part: Part) -> str:
    for name, _ in part.env:
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(f"instance environment: {name!r} is not a variable name")
    return render_template("instance.sh.j2", part=part)


def render_prewarm(*, models: list[str], config: Config, platform: Platform, node_host: str,
                   cache_root: Path, runtime: Runtime, script_path: str) -> str:
    """The node's pre-warm script: the instances' environment (not their devices or ports),
    the tokenizers of the models served here, then prewarm_command."""
    caches = instance_cache_env(cache_root, "prewarm", platform.cache_vars)
    env = [*sorted(platform.instance_env.items()), *config.instance_env,
           ("HF_HOME", config.hf_home), ("HF_HUB_OFFLINE", "1"), *caches]
    prewarm = shlex.split(config.prewarm_command) if config.prewarm_command else []
    command = vllm_command_argv(config)[0]
    command_dir = str(Path(command).parent) if "/" in command and not runtime.container_argv else ""
    return render_template("prewarm.sh.j2", node_host=node_host, script_path=script_path,
                           env=env, cache_dirs=writable_dirs(caches), env_dir=runtime.env_dir,
                           runner=list(runtime.container_argv), warm_tokenizers=WARM_TOKENIZERS,
                           models=list(dict.fromkeys(models)), prewarm_argv=prewarm,
                           command_dir=command_dir)
