"""The key table: every config key, its check, its help, its flag. The reference: the CLI
generates one flag per key from it, docs/config.md documents it, and a test checks both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..platforms import SCHEDULERS, platform_names
from .checks import (MAX_INSTANCES, MAX_RESTARTS, MAX_STARTUP_SECONDS, MAX_TENSOR_PARALLEL,
                     boolean, byte_size, check_args, check_command, check_endpoints_file,
                     check_env_tarball, check_remote, check_remote_aegis, check_secret,
                     check_text, env_mapping, integer, matching, one_of, optional, seconds,
                     walltime_value)


# there (the scheduler parses those lines), so they are restricted to safe characters.
_NAME_CHARS = "letters, digits and . _ - + @"
DIRECTIVE_SAFE_PATH = r"[A-Za-z0-9_./+@%,=-]+"  # also checked on the resolved run dir
_PATH_RE = "~?" + DIRECTIVE_SAFE_PATH


@dataclass(frozen=True)
class Key:
    name: str  # key in the YAML file (and field name, except model -> ModelConfig.name)
    check: Callable[[Any], Any]
    help: str
    scope: str = "global"  # "global" | "model"
    kind: str = "str"  # for the CLI flag: str | int | float | bool | choice | file | size
    choices: Callable[[], list[str]] | None = None
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--hf-token-file" if self.secret else "--" + self.name.replace("_", "-")

    @property
    def field_name(self) -> str:
        return "name" if self.name == "model" else self.name


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


MODEL_KEYS: tuple[Key, ...] = (
    Key("model", lambda v: check_text(v, what="a model name (Hugging Face id or path)"),
        "Model to serve (Hugging Face id); also the served name unless served_model_name is set.",
        scope="model"),
    Key("instances", integer(1, MAX_INSTANCES), "Number of vLLM instances of this model.",
        scope="model", kind="int"),
    Key("tensor_parallel_size", integer(1, MAX_TENSOR_PARALLEL),
        "Devices per instance (vLLM --tensor-parallel-size). Above the devices per node it "
        "must be a multiple of them (the instance spans whole nodes).", scope="model", kind="int"),
    Key("model_source", optional(check_text),
        "Model on the shared file system, staged once per node into hf_home: a model directory "
        "(config.json at its top), a hub-cache models--ORG--NAME directory (vLLM loads the "
        "snapshot refs/main names), or one snapshots/<rev> directory of it.",
        scope="model"),
    Key("served_model_name", optional(check_text),
        "Name clients use in requests (vLLM --served-model-name); default: the model name.",
        scope="model"),
    Key("extra_vllm_args", check_args,
        "Extra arguments for `vllm serve`: a YAML list, or one string split like a shell.",
        scope="model"),
)

GLOBAL_KEYS: tuple[Key, ...] = (
    Key("platform", one_of(platform_names), "Site record: devices per node, launcher, setup.",
        kind="choice", choices=platform_names),
    Key("scheduler", optional(one_of(scheduler_names)),
        "Batch system: pbs or slurm (default: the platform's).", kind="choice",
        choices=scheduler_names),
    Key("port_start", optional(integer(1, 65535)),
        "HTTP port of instance 0; instance i gets port_start+i, then one router port per model. "
        "Default 8000; `aegis launch` on platform local takes free ports.", kind="int"),
    Key("internal_port_start", integer(1, 65535),
        "First of the per-slot blocks of internal vLLM/torch ports (VLLM_PORT, MASTER_PORT).",
        kind="int"),
    Key("hf_home", lambda v: check_text(v, what="a directory path"),
        "Node-local Hugging Face cache (HF_HOME) that weights are staged into; $VARS expand "
        "on each node. Default: the platform's node-local directory + /hf_home."),
    Key("hf_token", optional(check_secret),
        "Hugging Face token. Never rendered or written; the job gets it as the exported "
        "variable HF_TOKEN. The flag reads it from a file, never from the command line.",
        kind="file", secret=True),
    Key("walltime", walltime_value, "Job walltime, HH:MM:SS."),
    Key("account", optional(matching(r"[A-Za-z0-9_.+@-]+", f"use {_NAME_CHARS}")),
        "Project to charge (#PBS -A / #SBATCH -A); required by aegis submit on HPC platforms."),
    Key("queue", optional(matching(r"[A-Za-z0-9_.+@-]+", f"use {_NAME_CHARS}")),
        "Queue (#PBS -q) or partition (#SBATCH -p)."),
    Key("filesystems", optional(matching(r"[A-Za-z0-9_]+(:[A-Za-z0-9_]+)*",
                                          "use names joined by ':' such as 'flare:home'")),
        "PBS filesystems the job needs (#PBS -l filesystems=); ignored by Slurm."),
    Key("job_name", matching(r"[A-Za-z][A-Za-z0-9_.-]{0,62}",
                             "start with a letter, then letters, digits and . _ - (max 63)"),
        "Scheduler job name (#PBS -N / #SBATCH -J); also prefixes run directory names."),
    Key("run_dir", matching(_PATH_RE, "use a path of letters, digits and . _ - / + @ % , = "
                                      "(no spaces, quotes or shell characters)"),
        "Parent directory of per-submission run directories (script, config, logs, endpoints)."),
    Key("startup_timeout", seconds(MAX_STARTUP_SECONDS),
        "Seconds an instance may take to become ready.", kind="float"),
    Key("endpoints_file", check_endpoints_file,
        "Where the launcher writes the ready endpoints (JSON; host:port list beside it as .txt). "
        "Relative paths resolve inside the run directory."),
    Key("conda_env", optional(check_text),
        "Conda environment activated in the batch script (then `python` runs the launcher)."),
    Key("vllm_command", check_command, "Command that starts one server; model and flags are appended."),
    Key("max_restarts", integer(0, MAX_RESTARTS), "Restarts per instance before it is reported dead.",
        kind="int"),
    Key("allow_partial", boolean,
        "Keep going (exit 0) when at least one instance is ready.", kind="bool"),
    Key("poll_interval", seconds(1.0),
        "Seconds between checks of starting instances (at most 1).", kind="float"),
    Key("probe_timeout", seconds(3600),
        "Seconds one readiness or liveness check may take.", kind="float"),
    Key("liveness_interval", seconds(86400),
        "Seconds between checks of a ready instance.", kind="float"),
    Key("liveness_failures", integer(1, 1000),
        "Failed checks in a row after which a ready instance counts as hung (stopped, "
        "restarted, taken out of the router).", kind="int"),
    Key("restart_backoff", seconds(3600),
        "Seconds before the first restart of a crashed instance; doubles per restart.",
        kind="float"),
    Key("stop_grace", seconds(3600),
        "Seconds between TERM and KILL when stopping instances.", kind="float"),
    Key("stage_chunk_size", optional(byte_size),
        "Staging broadcast chunk size, e.g. 64M (default: aegis stage's, 16M).", kind="size"),
    Key("stage_depth", optional(integer(1, 1024)),
        "Staging chunks in flight (default: aegis stage's, 4).", kind="int"),
    Key("stage_stall_timeout", optional(seconds(86400)),
        "Seconds staging may make no progress before it fails on every rank (default: "
        "aegis stage's).", kind="float"),
    Key("stage_readers", optional(integer(1, 65536)),
        "Ranks that read the model source, each a share (default: aegis stage's, 1).",
        kind="int"),
    Key("router", optional(boolean),
        "One routed endpoint per model (vllm-router on the first node) in front of its ready "
        "instances. Default: on for every model with 2 or more instances.", kind="bool"),
    Key("router_args", check_args,
        "Extra arguments for vllm-router (e.g. '--policy cache_aware'): a YAML list, or one "
        "string split like a shell."),
    Key("api_key_env", optional(matching(r"[A-Za-z_][A-Za-z0-9_]*",
                                          "expected an environment variable name")),
        "Name of the environment variable holding the API key vLLM requires (value never stored)."),
    Key("instance_env", env_mapping,
        "Extra environment for every instance: a mapping NAME: value (flag: 'NAME=VALUE ...')."),
    Key("node_local_dir", optional(lambda v: check_text(v, what="a directory path")),
        "Node-local storage for the staged environment and per-instance caches; $VARS expand "
        "on each node. Default: the platform's."),
    Key("env_source", optional(check_env_tarball),
        "Packed Python environment (conda-pack / venv-pack tarball) on the shared file system: "
        "staged and unpacked once per node; instances start with it activated."),
    Key("container", optional(lambda v: check_text(v, what="an Apptainer image (.sif) path")),
        "Apptainer/Singularity image (.sif) on the shared file system: staged once per node; "
        "instances run vllm_command in it (apptainer exec)."),
    Key("drain_seconds", seconds(MAX_STARTUP_SECONDS),
        "Before the job's walltime: seconds the instances are marked draining (taking no new "
        "requests, finishing the rest) before they are stopped.", kind="float"),
    Key("chain_overlap", seconds(MAX_STARTUP_SECONDS),
        "aegis submit --chain: seconds each successor job starts before its predecessor's "
        "end, to stage and warm up while the predecessor still serves.", kind="float"),
    Key("prewarm_command", optional(check_command),
        "Command run once per node, under a lock, before the instances start, in their "
        "environment (e.g. to fill a compile or tokenizer cache)."),
)

# Keys of the login side before a submission (aegis submit only; plan and launch have no flag
# for them): where aegis runs, and fetching the weights first. docs/laptop.md.
LOGIN_KEYS: tuple[Key, ...] = (
    Key("remote", optional(check_remote),
        "Run aegis on this login node over ssh, [USER@]HOST (a host or ~/.ssh/config alias); "
        "the config is sent there and its paths name files there. Also $AEGIS_REMOTE; '' runs "
        "here."),
    Key("remote_aegis", check_remote_aegis,
        "How to start aegis on the remote login node, its arguments appended (e.g. 'module "
        "load frameworks; aegis'). Also $AEGIS_REMOTE_AEGIS."),
    Key("download_weights", boolean,
        "aegis submit first fetches every model from the Hugging Face hub into its "
        "model_source (a models--ORG--NAME hub-cache directory), only what is missing, on the "
        "login node.", kind="bool"),
)

KEYS: tuple[Key, ...] = MODEL_KEYS + GLOBAL_KEYS + LOGIN_KEYS
BY_NAME = {k.name: k for k in KEYS}

# Keys the earlier Aegis accepted that this one does not act on: accepted with a warning.
LEGACY_GLOBAL_KEYS = frozenset({"aegis_env", "registry_port", "bench", "bench_num_prompts",
                                "bench_output", "wait"})
LEGACY_MODEL_KEYS = frozenset({"download_weights"})
_MODEL_NAME_ALIAS = "name"  # models[*].name is accepted for models[*].model
