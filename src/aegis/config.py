"""Deployment config: load YAML, merge CLI overrides, validate. Pure: no processes, no writes.

CONTRACT (other modules rely on these names; extend, don't rename):
    ModelConfig, Config, ConfigError, load_config(path, overrides) -> Config,
    from_mapping(data, overrides) -> Config, Config.to_mapping() (secrets omitted).

Precedence: CLI overrides > file > defaults. Validation errors raise ConfigError with one
line per problem, each naming the key path, the bad value and what is allowed; every problem
of a file is reported at once (the CLI exits 2 on it). Input is bounded: files are read with a
size cap, YAML nesting and alias expansion are capped, numbers have ranges.

KEYS is the single table of config keys: the CLI generates one flag per key from it and
docs/config.md documents it, so "every key has a flag" holds by construction.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import select
import shlex
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .platforms import PLATFORMS, Platform, get_platform, local_platform, platform_names


DEFAULT_PORT_START = 8000


class ConfigError(ValueError):
    """A user mistake in the config or flags: one line per problem, key path first."""


# Bounds on what a config may ask for, so hostile input fails fast with bounded memory.
MAX_CONFIG_BYTES = 256 << 10  # a deployment config is a few KB
MAX_TOKEN_BYTES = 64 << 10  # a Hugging Face token is ~40 characters
MAX_YAML_DEPTH = 64
MAX_YAML_VALUES = 100_000  # after alias expansion
MAX_INSTANCES = 65535  # each instance takes an HTTP port
MAX_TENSOR_PARALLEL = 4096
MAX_RESTARTS = 1_000_000
MAX_STARTUP_SECONDS = 7 * 24 * 3600
MAX_TEXT = 4096  # a path, a name, a command (PATH_MAX)
MAX_ARGS = 1000  # extra_vllm_args items, instance_env entries
MAX_ARG_CHARS = 32 << 10  # one argument or variable value (exec allows 128 KiB each)
MAX_PROBLEMS_SHOWN = 20


class RefusedFile(ValueError):
    """A file that read_small_file refuses to read (its message says why, one line)."""


class FileTooLarge(RefusedFile):
    """A file that read_small_file refuses: too large, or a pipe that never ends."""


READ_TIMEOUT = 10.0  # a pipe or FIFO that stays silent this long is refused
# Run files (aegis.run, aegis.launch.chain): the endpoints file of MAX_INSTANCES instances is
# about 50 MB; job.id a line; chain.json a record per generation (at most 1000).
MAX_ENDPOINTS_BYTES = 64 << 20
MAX_JOB_ID_BYTES = 4 << 10
MAX_CHAIN_BYTES = 1 << 20


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _check_file(st: os.stat_result, limit: int, owner: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise RefusedFile(f"not a regular file ({_file_kind(st.st_mode)})")
    if owner is not None and st.st_uid != owner:
        raise RefusedFile(f"owned by uid {st.st_uid}, not by you (uid {owner})")
    if st.st_size > limit:
        raise FileTooLarge(f"larger than {limit // 1024} KiB")


def read_small_file(path: str, limit: int, timeout: float | None = None, *,
                    regular: bool = False, owner: int | None = None) -> str:
    """The text of `path`, reading at most `limit` bytes, so /dev/zero or a huge file cannot
    exhaust memory, and never waiting forever: a FIFO without a writer reads as empty, one
    whose writer stays silent for `timeout` seconds is refused (process substitution,
    `-c <(envsubst < c.yaml)`, works). With `regular`, only a regular file is read (a FIFO,
    device or directory is refused before a byte is read, also when a symlink leads to it);
    with `owner`, only one owned by that uid. Raises OSError, UnicodeDecodeError, or
    RefusedFile (FileTooLarge when too large)."""
    timeout = READ_TIMEOUT if timeout is None else timeout
    if regular or owner is not None:
        _check_file(os.stat(path), limit, owner)  # before open(): a device is never opened
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if regular or owner is not None:
            _check_file(os.fstat(fd), limit, owner)  # what was opened (swapped meanwhile?)
        deadline = time.monotonic() + timeout
        data = b""
        while len(data) <= limit:
            try:
                chunk = os.read(fd, limit + 1 - len(data))
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FileTooLarge(f"nothing more to read for {timeout:g} s") from None
                select.select([fd], [], [], left)
                continue
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileTooLarge(f"larger than {limit // 1024} KiB")
    return data.decode("utf-8")


def read_run_file(path: str, limit: int) -> str:
    """One file of a run directory (config.yaml, job.id, chain.json, the endpoints file): a
    regular file of yours, at most `limit` bytes, read without blocking. The one reader of
    them all (aegis.run, aegis.launch.chain). Raises like read_small_file."""
    return read_small_file(path, limit, regular=True, owner=os.getuid())


def why_unreadable(err: Exception) -> str:
    """One line for a read_small_file failure."""
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return str(err)


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


# --------------------------------------------------------------------------- value checks
# Each check takes the raw value and returns the normalized one, or raises _Invalid with the
# part of the message after "<key path>: ".


class _Invalid(ValueError):
    pass


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "mapping", type(None): "null"}.get(type(value), type(value).__name__)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 60, 60


def _shown(value: Any) -> str:
    text = _SHORT_REPR.repr(value)  # bounded, whatever the value's size or depth
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value: Any, *, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected {what}, got {_shown(value)} ({_type_name(value)})")
    if not value.strip():
        raise _Invalid(f"must not be empty; expected {what}")
    if len(value) > MAX_TEXT:
        raise _Invalid(f"{_shown(value)} is {len(value)} characters long; at most {MAX_TEXT}")
    found = _CONTROL.search(value)
    if found:
        raise _Invalid(f"{_shown(value)} contains a control character ({found.group()!r}); "
                       "newlines and other control characters are not allowed")
    return value


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    # "" counts as unset: configs of the earlier Aegis wrote account: "".
    return lambda value: None if value is None or value == "" else check(value)


def _integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {_shown(value)} ({_type_name(value)})")
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise _Invalid(f"{value} is out of range; must be {allowed}")
        return value
    return check


def seconds(maximum: float) -> Callable[[Any], float]:
    """A duration: a finite number of seconds, > 0 and <= maximum (NaN, inf and 0 refused)."""
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"expected a number of seconds, got {_shown(value)} "
                           f"({_type_name(value)})")
        if not (math.isfinite(value) and 0 < value <= maximum):
            raise _Invalid(f"{value} is out of range; must be > 0 and <= {maximum:g} seconds")
        return float(value)
    return check


def check_seconds(flag: str, value: float, maximum: float) -> None:
    """The launcher's timing flags: the same rule as the config's, as a one-line ConfigError."""
    try:
        seconds(maximum)(value)
    except _Invalid as err:
        raise ConfigError(f"{flag}: {err}") from None


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def byte_size(value: Any) -> int:
    """A size in bytes: an integer, or text such as 64M, 4MiB, 1g."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", str(value)) \
            if isinstance(value, str) else None
        if not match:
            raise _Invalid(f"{_shown(value)} is not a size such as 64M, 4MiB or 1048576")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if not 0 < size <= 1 << 30:
        raise _Invalid(f"{_shown(value)} is out of range; must be > 0 and at most 1G")
    return size


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_shown(value)} ({_type_name(value)})")
    return value


def _pattern(regex: str, allowed: str) -> Callable[[Any], str]:
    compiled = re.compile(regex)

    def check(value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # account: 12345 is a fine account name
        text = _text(value)
        if not compiled.fullmatch(text):
            raise _Invalid(f"{_shown(text)} is not allowed; {allowed}")
        return text
    return check


def _choice(choices: Callable[[], list[str]]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        allowed = choices()
        if value not in allowed:
            hint = _did_you_mean(str(value), allowed)
            raise _Invalid(f"{_shown(value)} is not one of {', '.join(allowed)}{hint}")
        return value
    return check


def _walltime(value: Any) -> str:
    text = _text(value, what="a walltime string HH:MM:SS")
    if not re.fullmatch(r"\d{1,4}:[0-5]\d:[0-5]\d", text) or not any(c in text for c in "123456789"):
        raise _Invalid(f"{_shown(text)} is not a walltime; expected HH:MM:SS such as '01:30:00'")
    return text


def walltime_seconds(walltime: str) -> int:
    """A validated walltime (HH:MM:SS) in seconds."""
    hours, minutes, secs = (int(part) for part in walltime.split(":"))
    return hours * 3600 + minutes * 60 + secs


# After the stop at walltime begins: stop_grace for TERM -> KILL, then this much for the launcher
# to write its last endpoints file and exit before the scheduler's kill (aegis.launch.walltime).
EXIT_MARGIN_S = 10.0


def timing_problems(config: Config) -> list[str]:
    """The walltime must leave time to serve: the launcher drains drain_seconds before it stops,
    and stops stop_grace + EXIT_MARGIN_S before the job's end. One line per problem."""
    total = walltime_seconds(config.walltime)
    wall = f"walltime {config.walltime} ({total} s)"
    problems = []
    if config.drain_seconds >= total:
        problems.append(f"drain_seconds: {config.drain_seconds:g} s is not shorter than the "
                        f"{wall}; the instances would drain from the job's start and never serve")
    if config.stop_grace + EXIT_MARGIN_S >= total:
        problems.append(f"stop_grace: {config.stop_grace:g} s plus {EXIT_MARGIN_S:g} s to exit "
                        f"do not fit in the {wall}; the job would stop as it starts")
    if not problems and config.drain_seconds + config.stop_grace + EXIT_MARGIN_S >= total:
        problems.append(f"walltime: {config.walltime} ({total} s) leaves no time to serve: "
                        f"drain_seconds ({config.drain_seconds:g} s) + stop_grace "
                        f"({config.stop_grace:g} s) + {EXIT_MARGIN_S:g} s to exit take all of "
                        "it; lengthen walltime or shorten drain_seconds")
    return problems


def _bounded(items: tuple, what: str) -> tuple:
    if len(items) > MAX_ARGS:
        raise _Invalid(f"{len(items)} {what}; at most {MAX_ARGS}")
    return items


def _args(value: Any) -> tuple[str, ...]:
    out = _bounded(_arg_list(value), "arguments")
    for arg in out:
        if len(arg) > MAX_ARG_CHARS:
            raise _Invalid(f"argument {_shown(arg)} is {len(arg)} characters long; at most "
                           f"{MAX_ARG_CHARS}")
    return out


def _arg_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as err:
            raise _Invalid(f"cannot split {_shown(value)} into arguments: {err}") from None
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of arguments or one string, got {_shown(value)} "
                       f"({_type_name(value)})")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise _Invalid(f"expected each argument to be a string, got {_shown(item)} "
                           f"({_type_name(item)})")
        if re.search(r"[\x00\x80-\x9f]", str(item)):  # NUL, or C1 controls YAML folds
            raise _Invalid(f"argument {_shown(item)} contains a NUL or C1 control character")
        out.append(str(item))  # `- 32768` in YAML is an int; vLLM wants the text
    return tuple(out)


def _command(value: Any) -> str:
    text = _text(value, what="a command such as 'vllm serve'")
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise _Invalid(f"cannot split {_shown(text)} into a command: {err}") from None
    if not words:
        raise _Invalid("must name a command such as 'vllm serve'")
    return text


def _secret(value: Any) -> str:
    # Never echo the value of a secret in an error.
    if (not isinstance(value, str) or not value or any(c.isspace() for c in value)
            or _CONTROL.search(value)):
        raise _Invalid("expected a token string without whitespace or control characters "
                       "(value not shown)")
    return value


# Device-affinity variables (every platform's, and the other GPU runtimes'): the launcher sets
# them from the plan, and a user value would pin instances onto each other's devices.
AFFINITY_ENV = tuple(sorted({p.affinity_var for p in [*PLATFORMS.values(), local_platform()]}
                            | {"CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                               "ROCR_VISIBLE_DEVICES"}))
# Node-local cache variables (aegis.launch.caches): each instance gets its own directories.
CACHE_ENV = ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
             "TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME", "HF_MODULES_CACHE", "HF_XET_CACHE",
             "HF_ASSETS_CACHE", "TIKTOKEN_CACHE_DIR", "TIKTOKEN_RS_CACHE_DIR",
             *sorted({name for p in PLATFORMS.values() for name in p.cache_vars}))
# Set by the launcher for every instance; configure them through their own keys.
MANAGED_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "VLLM_HOST_IP", "VLLM_PORT", "MASTER_ADDR",
               "MASTER_PORT", "VLLM_API_KEY", *AFFINITY_ENV, *CACHE_ENV,
               *sorted({name for p in PLATFORMS.values() for name in p.instance_env}))

_ENV_TARBALLS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar")


def _endpoints_file(value: Any) -> str:
    """A file the launcher can write (the .txt beside it too), not a directory or another run
    file: nothing may be created before such a value is refused."""
    from .layout import RUN_FILE_NAMES

    text = _text(value, what="a file path")
    path = os.path.normpath(text)
    name = os.path.basename(path)
    if text.endswith(("/", "/.", "/..")) or name in ("", ".", "..") or \
            (text.startswith("~") and "/" not in text):
        raise _Invalid(f"{_shown(text)} names a directory, not a file; give a file name such "
                       "as 'endpoints.json'")
    if os.path.splitext(name)[1] == ".txt":
        raise _Invalid(f"{_shown(text)} ends in .txt: the host:port list is written beside it "
                       "as <name>.txt; give a name such as 'endpoints.json'")
    clash = {path, os.path.splitext(path)[0] + ".txt"} & set(RUN_FILE_NAMES)
    if clash:
        raise _Invalid(f"{_shown(text)} would overwrite the run directory's {min(clash)}; give "
                       "another name such as 'endpoints.json'")
    return text


def _env_tarball(value: Any) -> str:
    text = _text(value, what="a conda-pack or venv-pack tarball path")
    if not text.endswith(_ENV_TARBALLS):
        raise _Invalid(f"{_shown(text)} is not a packed environment; expected a tarball from "
                       f"conda-pack or venv-pack ({', '.join(_ENV_TARBALLS)})")
    return text


def _environment(value: Any) -> tuple[tuple[str, str], ...]:
    """A mapping NAME: value, or (from a flag) one string of NAME=VALUE words."""
    if isinstance(value, str):
        try:
            words = shlex.split(value)
        except ValueError as err:
            raise _Invalid(f"cannot split {_shown(value)} into NAME=VALUE words: {err}") from None
        pairs = []
        for word in words:
            name, eq, val = word.partition("=")
            if not eq:
                raise _Invalid(f"{_shown(word)} is not NAME=VALUE")
            pairs.append((name, val))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise _Invalid(f"expected a mapping of NAME: value, got {_shown(value)} "
                       f"({_type_name(value)})")
    out = []
    for name, val in _bounded(tuple(pairs), "variables"):
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name):
            raise _Invalid(f"{_shown(name)} is not an environment variable name")
        if name in AFFINITY_ENV:
            raise _Invalid(f"{name} is set by aegis for every instance from the plan's devices; "
                           "devices follow from tensor_parallel_size")
        if name in MANAGED_ENV:
            raise _Invalid(f"{name} is set by aegis for every instance; use its config key")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise _Invalid(f"{name}: expected a string or number, got {_shown(val)} "
                           f"({_type_name(val)})")
        if _CONTROL.search(str(val)):
            raise _Invalid(f"{name}: the value contains a control character")
        if len(str(val)) > MAX_ARG_CHARS:
            raise _Invalid(f"{name}: the value is {len(str(val))} characters long; at most "
                           f"{MAX_ARG_CHARS}")
        out.append((name, str(val)))
    return tuple(out)


# Values that end up in a batch-script directive line (#PBS/#SBATCH) are not shell-quoted
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


def _scheduler_names() -> list[str]:
    from .scheduler import BACKENDS  # the scheduler package imports config

    return list(BACKENDS)


MODEL_KEYS: tuple[Key, ...] = (
    Key("model", lambda v: _text(v, what="a model name (Hugging Face id or path)"),
        "Model to serve (Hugging Face id); also the served name unless served_model_name is set.",
        scope="model"),
    Key("instances", _integer(1, MAX_INSTANCES), "Number of vLLM instances of this model.",
        scope="model", kind="int"),
    Key("tensor_parallel_size", _integer(1, MAX_TENSOR_PARALLEL),
        "Devices per instance (vLLM --tensor-parallel-size). Above the devices per node it "
        "must be a multiple of them (the instance spans whole nodes).", scope="model", kind="int"),
    Key("model_source", _optional(_text),
        "Model on the shared file system, staged once per node into hf_home: a model directory "
        "(config.json at its top), a hub-cache models--ORG--NAME directory (vLLM loads the "
        "snapshot refs/main names), or one snapshots/<rev> directory of it.",
        scope="model"),
    Key("served_model_name", _optional(_text),
        "Name clients use in requests (vLLM --served-model-name); default: the model name.",
        scope="model"),
    Key("extra_vllm_args", _args,
        "Extra arguments for `vllm serve`: a YAML list, or one string split like a shell.",
        scope="model"),
)

GLOBAL_KEYS: tuple[Key, ...] = (
    Key("platform", _choice(platform_names), "Site record: devices per node, launcher, setup.",
        kind="choice", choices=platform_names),
    Key("scheduler", _optional(_choice(_scheduler_names)),
        "Batch system: pbs or slurm (default: the platform's).", kind="choice",
        choices=_scheduler_names),
    Key("port_start", _optional(_integer(1, 65535)),
        "HTTP port of instance 0; instance i gets port_start+i, then one router port per model. "
        "Default 8000; `aegis launch` on platform local takes free ports.", kind="int"),
    Key("internal_port_start", _integer(1, 65535),
        "First of the per-slot blocks of internal vLLM/torch ports (VLLM_PORT, MASTER_PORT).",
        kind="int"),
    Key("hf_home", lambda v: _text(v, what="a directory path"),
        "Node-local Hugging Face cache (HF_HOME) that weights are staged into; $VARS expand "
        "on each node. Default: the platform's node-local directory + /hf_home."),
    Key("hf_token", _optional(_secret),
        "Hugging Face token. Never rendered or written; the job gets it as the exported "
        "variable HF_TOKEN. The flag reads it from a file, never from the command line.",
        kind="file", secret=True),
    Key("walltime", _walltime, "Job walltime, HH:MM:SS."),
    Key("account", _optional(_pattern(r"[A-Za-z0-9_.+@-]+", f"use {_NAME_CHARS}")),
        "Project to charge (#PBS -A / #SBATCH -A); required by aegis submit on HPC platforms."),
    Key("queue", _optional(_pattern(r"[A-Za-z0-9_.+@-]+", f"use {_NAME_CHARS}")),
        "Queue (#PBS -q) or partition (#SBATCH -p)."),
    Key("filesystems", _optional(_pattern(r"[A-Za-z0-9_]+(:[A-Za-z0-9_]+)*",
                                          "use names joined by ':' such as 'flare:home'")),
        "PBS filesystems the job needs (#PBS -l filesystems=); ignored by Slurm."),
    Key("job_name", _pattern(r"[A-Za-z][A-Za-z0-9_.-]{0,62}",
                             "start with a letter, then letters, digits and . _ - (max 63)"),
        "Scheduler job name (#PBS -N / #SBATCH -J); also prefixes run directory names."),
    Key("run_dir", _pattern(_PATH_RE, "use a path of letters, digits and . _ - / + @ % , = "
                                      "(no spaces, quotes or shell characters)"),
        "Parent directory of per-submission run directories (script, config, logs, endpoints)."),
    Key("startup_timeout", seconds(MAX_STARTUP_SECONDS),
        "Seconds an instance may take to become ready.", kind="float"),
    Key("endpoints_file", _endpoints_file,
        "Where the launcher writes the ready endpoints (JSON; host:port list beside it as .txt). "
        "Relative paths resolve inside the run directory."),
    Key("conda_env", _optional(_text),
        "Conda environment activated in the batch script (then `python` runs the launcher)."),
    Key("vllm_command", _command, "Command that starts one server; model and flags are appended."),
    Key("max_restarts", _integer(0, MAX_RESTARTS), "Restarts per instance before it is reported dead.",
        kind="int"),
    Key("allow_partial", _boolean,
        "Keep going (exit 0) when at least one instance is ready.", kind="bool"),
    Key("poll_interval", seconds(1.0),
        "Seconds between checks of starting instances (at most 1).", kind="float"),
    Key("probe_timeout", seconds(3600),
        "Seconds one readiness or liveness check may take.", kind="float"),
    Key("liveness_interval", seconds(86400),
        "Seconds between checks of a ready instance.", kind="float"),
    Key("liveness_failures", _integer(1, 1000),
        "Failed checks in a row after which a ready instance counts as hung (stopped, "
        "restarted, taken out of the router).", kind="int"),
    Key("restart_backoff", seconds(3600),
        "Seconds before the first restart of a crashed instance; doubles per restart.",
        kind="float"),
    Key("stop_grace", seconds(3600),
        "Seconds between TERM and KILL when stopping instances.", kind="float"),
    Key("stage_chunk_size", _optional(byte_size),
        "Staging broadcast chunk size, e.g. 64M (default: aegis stage's, 16M).", kind="size"),
    Key("stage_depth", _optional(_integer(1, 1024)),
        "Staging chunks in flight (default: aegis stage's, 4).", kind="int"),
    Key("stage_stall_timeout", _optional(seconds(86400)),
        "Seconds staging may make no progress before it fails on every rank (default: "
        "aegis stage's).", kind="float"),
    Key("stage_readers", _optional(_integer(1, 65536)),
        "Ranks that read the model source, each a share (default: aegis stage's, 1).",
        kind="int"),
    Key("router", _optional(_boolean),
        "One routed endpoint per model (vllm-router on the first node) in front of its ready "
        "instances. Default: on for every model with 2 or more instances.", kind="bool"),
    Key("router_args", _args,
        "Extra arguments for vllm-router (e.g. '--policy cache_aware'): a YAML list, or one "
        "string split like a shell."),
    Key("api_key_env", _optional(_pattern(r"[A-Za-z_][A-Za-z0-9_]*",
                                          "expected an environment variable name")),
        "Name of the environment variable holding the API key vLLM requires (value never stored)."),
    Key("instance_env", _environment,
        "Extra environment for every instance: a mapping NAME: value (flag: 'NAME=VALUE ...')."),
    Key("node_local_dir", _optional(lambda v: _text(v, what="a directory path")),
        "Node-local storage for the staged environment and per-instance caches; $VARS expand "
        "on each node. Default: the platform's."),
    Key("env_source", _optional(_env_tarball),
        "Packed Python environment (conda-pack / venv-pack tarball) on the shared file system: "
        "staged and unpacked once per node; instances start with it activated."),
    Key("container", _optional(lambda v: _text(v, what="an Apptainer image (.sif) path")),
        "Apptainer/Singularity image (.sif) on the shared file system: staged once per node; "
        "instances run vllm_command in it (apptainer exec)."),
    Key("drain_seconds", seconds(MAX_STARTUP_SECONDS),
        "Before the job's walltime: seconds the instances are marked draining (taking no new "
        "requests, finishing the rest) before they are stopped.", kind="float"),
    Key("chain_overlap", seconds(MAX_STARTUP_SECONDS),
        "aegis submit --chain: seconds each successor job starts before its predecessor's "
        "end, to stage and warm up while the predecessor still serves.", kind="float"),
    Key("prewarm_command", _optional(_command),
        "Command run once per node, under a lock, before the instances start, in their "
        "environment (e.g. to fill a compile or tokenizer cache)."),
)

KEYS: tuple[Key, ...] = MODEL_KEYS + GLOBAL_KEYS
_BY_NAME = {k.name: k for k in KEYS}

# Keys the earlier Aegis accepted that this one does not act on: accepted with a warning.
LEGACY_GLOBAL_KEYS = frozenset({"download_weights", "aegis_env", "registry_port", "bench",
                                "bench_num_prompts", "bench_output", "remote", "wait"})
LEGACY_MODEL_KEYS = frozenset({"download_weights"})
_MODEL_NAME_ALIAS = "name"  # models[*].name is accepted for models[*].model


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- loading


def _checked(key: Key, value: Any, path: str, source: str | None) -> Any:
    try:
        return key.check(value)
    except _Invalid as err:
        where = f"{path} ({source})" if source else path
        raise ConfigError(f"{where}: {err}") from None


def _unknown(prefix: str, name: Any, allowed: list[str]) -> str:
    """'<prefix>.<name>: unknown key', the name quoted and cut short when it is long or has
    characters that would break the one-line message."""
    plain = isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name)
    shown = name if plain else _shown(name)
    hint = _did_you_mean(name, allowed) if plain else ""
    return (f"{prefix}.{shown}" if prefix else shown) + \
        f": unknown key{hint or '; see docs/config.md for the keys'}"


class _Problems:
    """Collects every problem of a config, so one run reports them all (one line each)."""

    def __init__(self) -> None:
        self.lines: list[str] = []  # the first MAX_PROBLEMS_SHOWN
        self.count = 0

    def add(self, line: str | Callable[[], str]) -> None:
        """A problem; a callable is only formatted when it will be shown (hints cost time)."""
        self.count += 1
        if len(self.lines) < MAX_PROBLEMS_SHOWN:
            self.lines.append(line() if callable(line) else line)

    def check(self, key: Key, value: Any, path: str, source: str | None) -> Any:
        try:
            return _checked(key, value, path, source)
        except ConfigError as err:
            self.add(str(err))
            return None

    def raise_any(self) -> None:
        more = self.count - len(self.lines)
        if self.count:
            raise ConfigError("\n".join(
                self.lines + ([f"config: {more} more problems not shown"] if more else [])))


def _parse_model(entry: Any, path: str, overrides: dict[str, Any], ignored: list[str],
                 problems: _Problems) -> ModelConfig | None:
    if not isinstance(entry, dict):
        problems.add(f"{path}: expected a mapping with at least 'model', "
                     f"got {_shown(entry)} ({_type_name(entry)})")
        return None
    entry = dict(entry)
    if _MODEL_NAME_ALIAS in entry:
        if "model" in entry:
            problems.add(f"{path}: has both 'model' and 'name'; keep 'model'")
            return None
        entry["model"] = entry.pop(_MODEL_NAME_ALIAS)
    names = [k.name for k in MODEL_KEYS]
    values: dict[str, Any] = {}
    known_before = problems.count
    for name, value in entry.items():
        sub = f"{path}.{name}" if path else str(name)
        if name in LEGACY_MODEL_KEYS:
            ignored.append(sub)
            continue
        if name not in names:
            problems.add(lambda: _unknown(path, name, names))
            continue
        values[name] = value
    values.update(overrides)
    if values.get("model") is None:
        where = f"{path}.model" if path else "model"
        problems.add(f"{where}: missing; name the model to serve (e.g. "
                     "'meta-llama/Llama-3.1-8B-Instruct')")
    fields_ = {}
    for name, value in values.items():
        key = _BY_NAME[name]
        sub = f"{path}.{name}" if path else name
        fields_[key.field_name] = problems.check(key, value, sub,
                                                 key.flag if name in overrides else None)
    return ModelConfig(**fields_) if problems.count == known_before else None


def from_mapping(data: Any, overrides: dict[str, Any] | None = None) -> Config:
    """Validate `data` (the parsed YAML) with `overrides` (config key -> value, None = unset)
    on top, and return the Config. Raises ConfigError naming every problem, one per line."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of keys at the top level, got "
                          f"{_type_name(data)}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for name in overrides:
        if name not in _BY_NAME:
            raise ConfigError(f"{name}: not a config key (internal error: unknown override)")
    model_overrides = {k: v for k, v in overrides.items() if _BY_NAME[k].scope == "model"}
    ignored: list[str] = []
    problems = _Problems()

    allowed_top = [k.name for k in KEYS] + ["models"]
    global_values: dict[str, Any] = {}
    single_model: dict[str, Any] = {}
    for name, value in data.items():
        if not isinstance(name, str):
            problems.add(f"{_shown(name)}: keys must be strings")
        elif name in LEGACY_GLOBAL_KEYS:
            ignored.append(name)
        elif name == "models":
            continue
        elif name not in _BY_NAME:
            problems.add(lambda: _unknown("", name, allowed_top))
        elif _BY_NAME[name].scope == "model":
            single_model[name] = value
        else:
            global_values[name] = value

    models: list[ModelConfig | None] = []
    if "models" in data:
        if single_model:
            first = next(iter(single_model))
            problems.add(f"{first}: cannot be combined with a models: list; "
                         f"set models[*].{first} in each entry instead")
        if model_overrides:
            flag = _BY_NAME[next(iter(model_overrides))].flag
            problems.add(f"{flag}: per-model flags apply to the single-model form only; "
                         "this config has a models: list (edit models[*] in the file)")
        raw_models = data["models"]
        if not isinstance(raw_models, list):
            problems.add(f"models: expected a list of model entries, got "
                         f"{_shown(raw_models)} ({_type_name(raw_models)})")
        elif not raw_models:
            problems.add("models: the list is empty; give at least one entry with 'model'")
        else:
            models = [_parse_model(entry, f"models[{i}]", {}, ignored, problems)
                      for i, entry in enumerate(raw_models)]
    elif "model" not in single_model and "model" not in model_overrides:
        problems.add("model: missing; set 'model' (single-model form, or --model) "
                     "or a non-empty 'models' list")
    else:
        models = [_parse_model(single_model, "", model_overrides, ignored, problems)]

    merged = {**global_values, **{k: v for k, v in overrides.items()
                                  if _BY_NAME[k].scope == "global"}}
    fields_ = {name: problems.check(_BY_NAME[name], value, name,
                                    _BY_NAME[name].flag if name in overrides else None)
               for name, value in merged.items()}
    problems.raise_any()
    config = Config(models=tuple(m for m in models if m is not None), ignored_keys=tuple(ignored),
                    **fields_)
    platform = get_platform(config.platform)
    if config.env_source and config.container:
        raise ConfigError("container: cannot be combined with env_source; the image holds "
                          "the environment (set one of them)")
    if config.node_local_dir is None:
        config = config.replace(node_local_dir=platform.node_local_dir)
    if "hf_home" not in fields_:  # default: under the node-local storage
        config = config.replace(hf_home=f"{config.node_local_dir.rstrip('/')}/hf_home")
    check_placement(config, platform, timing_problems(config))
    return config


def check_placement(config: Config, platform: Platform, also: list[str] = ()) -> None:
    """Platform-dependent rules: TP placeable, a plan of at most MAX_NODES nodes, ports inside
    1..65535 and not overlapping. Every broken rule is reported (with the lines `also`)."""
    from .plan import INTERNAL_PORTS_PER_SLOT, MAX_NODES, nodes_per_instance  # plan imports config

    problems = _Problems()
    for line in also:
        problems.add(line)
    dpn = platform.devices_per_node
    single = len(config.models) == 1
    nodes = 0
    for i, model in enumerate(config.models):
        tp = model.tensor_parallel_size
        path = "tensor_parallel_size" if single else f"models[{i}].tensor_parallel_size"
        if tp > dpn and tp % dpn:
            problems.add(
                f"{path}: {tp} cannot be placed on {platform.name} ({dpn} devices per node); "
                f"allowed: 1-{dpn}, or a multiple of {dpn} (whole nodes)")
        nodes += model.instances * nodes_per_instance(tp, dpn)  # an upper bound of the plan's
    if nodes > MAX_NODES:  # checked before make_plan builds anything of that size
        problems.add(f"instances: the models need up to {nodes} nodes of {platform.name}; "
                     f"at most {MAX_NODES} are supported")
    http_ports = config.http_ports
    http_first, http_last = config.first_port, config.first_port + http_ports - 1
    if http_last > 65535:
        routers = len(config.routed_models)
        problems.add(
            f"port_start: {config.first_port} + {config.total_instances} instances"
            + (f" and {routers} router(s)" if routers else "")
            + f" runs past 65535 (last port {http_last}); allowed: port_start <= "
            f"{65536 - http_ports}")
    internal_first = config.internal_port_start
    internal_last = internal_first + dpn * INTERNAL_PORTS_PER_SLOT - 1
    if internal_last > 65535:
        problems.add(
            f"internal_port_start: {internal_first} + {dpn} slots x {INTERNAL_PORTS_PER_SLOT} "
            f"ports runs past 65535; allowed: internal_port_start <= "
            f"{65536 - dpn * INTERNAL_PORTS_PER_SLOT}")
    elif http_first <= internal_last and internal_first <= http_last:
        http = f"{http_first}" if http_first == http_last else f"{http_first}-{http_last}"
        problems.add(
            f"port_start: HTTP ports {http} overlap the internal port range "
            f"{internal_first}-{internal_last} (internal_port_start); move one of them")
    problems.raise_any()


def check_submittable(config: Config, platform: Platform) -> None:
    """What a real submission needs beyond a valid config (a dry run does not)."""
    if platform.requires_account and not config.account:
        raise ConfigError(f"account: missing; {platform.name} charges jobs to a project: set "
                          "'account' or pass --account (a --dry-run works without it)")


# --------------------------------------------------------------------------- YAML


def _yaml_loader():
    import yaml

    # libyaml's parser when PyYAML has it (the wheels do): 20x faster than the pure-Python
    # one, so even a file at the size cap is refused or loaded in well under a second.
    base = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader

    class Loader(base):
        """SafeLoader without YAML 1.1 base-60 numbers (walltime: 01:00:00 stays a string)
        and with duplicate keys reported instead of silently overwritten."""

        def construct_object(self, node, deep=False):
            # A value that matches a type's pattern but is no such value (`0b_`, `._`,
            # `2001-13-45`, `!!float abc`) makes PyYAML's constructors raise ValueError.
            try:
                return super().construct_object(node, deep)
            except (ValueError, TypeError, OverflowError) as err:
                kind = node.tag.rsplit(":", 1)[-1]
                raise yaml.constructor.ConstructorError(
                    None, None, f"{_shown(node.value)} is not a valid {kind} ({err})",
                    node.start_mark) from None

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key if isinstance(key, str) else id(key))
            return super().construct_mapping(node, deep)

    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (int_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        int_tag,
        re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)"
                   r"|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"))
    Loader.add_implicit_resolver(
        float_tag,
        # PyYAML's own float pattern minus base 60, so what dump_yaml writes reads back
        re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?"
                   r"|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))
    return Loader


def _check_size(text: str, loader) -> None:
    """Refuse nesting deeper than MAX_YAML_DEPTH and aliases that expand to more than
    MAX_YAML_VALUES values ("billion laughs") before anything is built: PyYAML composes
    recursively and shares aliased objects, but every check and repr of them walks them whole.
    Works on the parser's events, which PyYAML produces without recursion."""
    import yaml

    sizes: dict[str, int] = {}  # anchor -> values it expands to
    stack: list[list] = [[None, 0]]  # [anchor, values so far] per open collection
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(stack) > MAX_YAML_DEPTH:
                raise yaml.MarkedYAMLError(problem=f"nested deeper than {MAX_YAML_DEPTH} levels",
                                           problem_mark=event.start_mark)
            stack.append([event.anchor, 1])
            continue
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, count = stack.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, count = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            anchor, count = None, sizes.get(event.anchor, 1)
        else:
            continue
        if anchor is not None:
            sizes[anchor] = count
        stack[-1][1] += count
        if stack[-1][1] > MAX_YAML_VALUES or count > MAX_YAML_VALUES:
            raise yaml.MarkedYAMLError(
                problem=f"aliases expand to more than {MAX_YAML_VALUES} values",
                problem_mark=event.start_mark)


def parse_yaml(text: str, source: str = "config") -> Any:
    import yaml

    loader = _yaml_loader()
    try:
        _check_size(text, loader)
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = err.problem or err.context or "unreadable"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except yaml.reader.ReaderError as err:  # a character YAML does not allow (NUL, ...)
        raise ConfigError(f"{source}: invalid YAML: unacceptable character "
                          f"#x{err.character:04x} at offset {err.position}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {str(err).splitlines()[0]}") from None


def load_config(path: str | None, overrides: dict[str, Any] | None = None, *,
                run_file: bool = False) -> Config:
    """Load `path` (None: flags and defaults only), apply overrides, validate. With
    `run_file`, `path` is a run directory's config.yaml (read_run_file: a regular file of
    yours, never a FIFO or device)."""
    if path is None:
        return from_mapping({}, overrides)
    try:
        text = (read_run_file(path, MAX_CONFIG_BYTES) if run_file
                else read_small_file(path, MAX_CONFIG_BYTES))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, RefusedFile) as err:
        raise ConfigError(f"{path}: cannot read config file: {why_unreadable(err)}") from None
    data = parse_yaml(text, str(path))
    return from_mapping(_paths_beside(data, os.path.dirname(os.path.abspath(path))), overrides)


PATH_KEYS = ("model_source", "env_source", "container")  # read from the config file's place


def _paths_beside(data: Any, base: str) -> Any:
    """Relative paths in the file (model_source, env_source, container) resolve against the
    file's directory, so a config runs from any working directory. Flags stay relative to
    the working directory; ~ and $VARS are left as written."""
    def resolved(value: Any) -> Any:
        if isinstance(value, str) and value and not value.startswith(("/", "~", "$")):
            return os.path.normpath(os.path.join(base, value))
        return value

    if not isinstance(data, dict):
        return data
    data = {k: resolved(v) if k in PATH_KEYS else v for k, v in data.items()}
    if isinstance(data.get("models"), list):
        data["models"] = [{k: resolved(v) if k in PATH_KEYS else v for k, v in m.items()}
                          if isinstance(m, dict) else m for m in data["models"]]
    return data


def dump_yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True,
                          width=10_000)
