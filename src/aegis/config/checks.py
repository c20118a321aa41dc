"""Value checks: each takes a raw value (from YAML or a flag) and returns the normalised one,
or raises Invalid with the part of the message after "<key path>: ". Pure. Also the bounds
on what a config may ask for, so hostile input fails fast with bounded memory, and the rules
that tie keys together (timing_problems)."""

from __future__ import annotations

import difflib
import math
import os
import re
import reprlib
import shlex
from typing import Any, Callable

from ..layout import RUN_FILE_NAMES
from ..platforms import PLATFORMS, local_platform
from .errors import ConfigError

MAX_INSTANCES = 65535  # each instance takes an HTTP port
MAX_TENSOR_PARALLEL = 4096
MAX_RESTARTS = 1_000_000
MAX_STARTUP_SECONDS = 7 * 24 * 3600
MAX_TEXT = 4096  # a path, a name, a command (PATH_MAX)
MAX_ARGS = 1000  # extra_vllm_args items, instance_env entries
MAX_ARG_CHARS = 32 << 10  # one argument or variable value (exec allows 128 KiB each)


class Invalid(ValueError):
    pass


CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "mapping", type(None): "null"}.get(type(value), type(value).__name__)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 60, 60


def short_repr(value: Any) -> str:
    text = _SHORT_REPR.repr(value)  # bounded, whatever the value's size or depth
    return text if len(text) <= 60 else text[:57] + "..."


def check_text(value: Any, *, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected {what}, got {short_repr(value)} ({type_name(value)})")
    if not value.strip():
        raise Invalid(f"must not be empty; expected {what}")
    if len(value) > MAX_TEXT:
        raise Invalid(f"{short_repr(value)} is {len(value)} characters long; at most {MAX_TEXT}")
    found = CONTROL.search(value)
    if found:
        raise Invalid(f"{short_repr(value)} contains a control character ({found.group()!r}); "
                       "newlines and other control characters are not allowed")
    return value


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    # "" counts as unset: configs of the earlier Aegis wrote account: "".
    return lambda value: None if value is None or value == "" else check(value)


def integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected an integer, got {short_repr(value)} ({type_name(value)})")
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise Invalid(f"{value} is out of range; must be {allowed}")
        return value
    return check


def seconds(maximum: float) -> Callable[[Any], float]:
    """A duration: a finite number of seconds, > 0 and <= maximum (NaN, inf and 0 refused)."""
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"expected a number of seconds, got {short_repr(value)} "
                           f"({type_name(value)})")
        if not (math.isfinite(value) and 0 < value <= maximum):
            raise Invalid(f"{value} is out of range; must be > 0 and <= {maximum:g} seconds")
        return float(value)
    return check


def check_seconds(flag: str, value: float, maximum: float) -> None:
    """The launcher's timing flags: the same rule as the config's, as a one-line ConfigError."""
    try:
        seconds(maximum)(value)
    except Invalid as err:
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
            raise Invalid(f"{short_repr(value)} is not a size such as 64M, 4MiB or 1048576")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if not 0 < size <= 1 << 30:
        raise Invalid(f"{short_repr(value)} is out of range; must be > 0 and at most 1G")
    return size


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {short_repr(value)} ({type_name(value)})")
    return value


def matching(regex: str, allowed: str) -> Callable[[Any], str]:
    compiled = re.compile(regex)

    def check(value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # account: 12345 is a fine account name
        text = check_text(value)
        if not compiled.fullmatch(text):
            raise Invalid(f"{short_repr(text)} is not allowed; {allowed}")
        return text
    return check


def one_of(choices: Callable[[], list[str]]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        allowed = choices()
        if value not in allowed:
            hint = did_you_mean(str(value), allowed)
            raise Invalid(f"{short_repr(value)} is not one of {', '.join(allowed)}{hint}")
        return value
    return check


def walltime_value(value: Any) -> str:
    text = check_text(value, what="a walltime string HH:MM:SS")
    if not re.fullmatch(r"\d{1,4}:[0-5]\d:[0-5]\d", text) or not any(c in text for c in "123456789"):
        raise Invalid(f"{short_repr(text)} is not a walltime; expected HH:MM:SS such as '01:30:00'")
    return text


def walltime_seconds(walltime: str) -> int:
    """A validated walltime (HH:MM:SS) in seconds."""
    hours, minutes, secs = (int(part) for part in walltime.split(":"))
    return hours * 3600 + minutes * 60 + secs


# After the stop at walltime begins: stop_grace for TERM -> KILL, then this much for the launcher
# to write its last endpoints file and exit before the scheduler's kill (aegis.launch.walltime).
EXIT_MARGIN_S = 10.0


def timing_problems(config) -> list[str]:
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


def bounded(items: tuple, what: str) -> tuple:
    if len(items) > MAX_ARGS:
        raise Invalid(f"{len(items)} {what}; at most {MAX_ARGS}")
    return items


def check_args(value: Any) -> tuple[str, ...]:
    out = bounded(arg_list(value), "arguments")
    for arg in out:
        if len(arg) > MAX_ARG_CHARS:
            raise Invalid(f"argument {short_repr(arg)} is {len(arg)} characters long; at most "
                           f"{MAX_ARG_CHARS}")
    return out


def arg_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as err:
            raise Invalid(f"cannot split {short_repr(value)} into arguments: {err}") from None
    if not isinstance(value, list):
        raise Invalid(f"expected a list of arguments or one string, got {short_repr(value)} "
                       f"({type_name(value)})")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise Invalid(f"expected each argument to be a string, got {short_repr(item)} "
                           f"({type_name(item)})")
        if re.search(r"[\x00\x80-\x9f]", str(item)):  # NUL, or C1 controls YAML folds
            raise Invalid(f"argument {short_repr(item)} contains a NUL or C1 control character")
        out.append(str(item))  # `- 32768` in YAML is an int; vLLM wants the text
    return tuple(out)


# [USER@]HOST for ssh: an ssh config alias, a host name or an address. It becomes one argv
# word after `--`, never a shell word, but a leading '-' would still read as an ssh option in
# other tools, and spaces, quotes or ';' in a host name are only ever a mistake or an attack.
_REMOTE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}@)?[A-Za-z0-9_][A-Za-z0-9_.:%-]{0,252}")


def check_remote(value: Any) -> str:
    text = check_text(value, what="[USER@]HOST (an ssh host or ~/.ssh/config alias)")
    if not _REMOTE.fullmatch(text):
        raise Invalid(f"{short_repr(text)} is not [USER@]HOST; use a host name, an address or "
                      "an alias from ~/.ssh/config (letters, digits and . _ - : %, one @ after "
                      "the user)")
    return text


def check_remote_aegis(value: Any) -> str:
    """Shell words that start aegis on the login node, aegis's own arguments appended (quoted):
    `aegis`, `/path/venv/bin/aegis`, `module load frameworks; aegis`. The arguments must reach
    that last command: a text ending in an operator (; & |), a comment or an open quote would
    cut them off, so it is refused."""
    text = check_text(value, what="a command such as 'aegis' or 'module load x; aegis'")
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.commenters = ""
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError as err:
        raise Invalid(f"cannot split {short_repr(text)} like a shell: {err}") from None
    if not words:
        raise Invalid("must name the aegis command, e.g. 'aegis'")
    if any(w.startswith("#") for w in words):
        raise Invalid(f"{short_repr(text)} holds a shell comment ('#'), which would swallow "
                      "aegis's arguments")
    if set(words[-1]) <= set("();<>|&"):
        raise Invalid(f"{short_repr(text)} ends in {words[-1]!r}; it must end with the aegis "
                      "command, so that aegis's arguments go to it")
    return text


def check_command(value: Any) -> str:
    text = check_text(value, what="a command such as 'vllm serve'")
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise Invalid(f"cannot split {short_repr(text)} into a command: {err}") from None
    if not words:
        raise Invalid("must name a command such as 'vllm serve'")
    return text


def check_secret(value: Any) -> str:
    # Never echo the value of a secret in an error.
    if (not isinstance(value, str) or not value or any(c.isspace() for c in value)
            or CONTROL.search(value)):
        raise Invalid("expected a token string without whitespace or control characters "
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

ENV_TARBALLS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar")


def check_endpoints_file(value: Any) -> str:
    """A file the launcher can write (the .txt beside it too), not a directory or another run
    file: nothing may be created before such a value is refused."""
    text = check_text(value, what="a file path")
    path = os.path.normpath(text)
    name = os.path.basename(path)
    if text.endswith(("/", "/.", "/..")) or name in ("", ".", "..") or \
            (text.startswith("~") and "/" not in text):
        raise Invalid(f"{short_repr(text)} names a directory, not a file; give a file name such "
                       "as 'endpoints.json'")
    if os.path.splitext(name)[1] == ".txt":
        raise Invalid(f"{short_repr(text)} ends in .txt: the host:port list is written beside it "
                       "as <name>.txt; give a name such as 'endpoints.json'")
    clash = {path, os.path.splitext(path)[0] + ".txt"} & set(RUN_FILE_NAMES)
    if clash:
        raise Invalid(f"{short_repr(text)} would overwrite the run directory's {min(clash)}; give "
                       "another name such as 'endpoints.json'")
    return text


def check_env_tarball(value: Any) -> str:
    text = check_text(value, what="a conda-pack or venv-pack tarball path")
    if not text.endswith(ENV_TARBALLS):
        raise Invalid(f"{short_repr(text)} is not a packed environment; expected a tarball from "
                       f"conda-pack or venv-pack ({', '.join(ENV_TARBALLS)})")
    return text


def env_mapping(value: Any) -> tuple[tuple[str, str], ...]:
    """A mapping NAME: value, or (from a flag) one string of NAME=VALUE words."""
    if isinstance(value, str):
        try:
            words = shlex.split(value)
        except ValueError as err:
            raise Invalid(f"cannot split {short_repr(value)} into NAME=VALUE words: {err}") from None
        pairs = []
        for word in words:
            name, eq, val = word.partition("=")
            if not eq:
                raise Invalid(f"{short_repr(word)} is not NAME=VALUE")
            pairs.append((name, val))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise Invalid(f"expected a mapping of NAME: value, got {short_repr(value)} "
                       f"({type_name(value)})")
    out = []
    for name, val in bounded(tuple(pairs), "variables"):
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name):
            raise Invalid(f"{short_repr(name)} is not an environment variable name")
        if name in AFFINITY_ENV:
            raise Invalid(f"{name} is set by aegis for every instance from the plan's devices; "
                           "devices follow from tensor_parallel_size")
        if name in MANAGED_ENV:
            raise Invalid(f"{name} is set by aegis for every instance; use its config key")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise Invalid(f"{name}: expected a string or number, got {short_repr(val)} "
                           f"({type_name(val)})")
        if CONTROL.search(str(val)):
            raise Invalid(f"{name}: the value contains a control character")
        if len(str(val)) > MAX_ARG_CHARS:
            raise Invalid(f"{name}: the value is {len(str(val))} characters long; at most "
                           f"{MAX_ARG_CHARS}")
        out.append((name, str(val)))
    return tuple(out)


# Values that end up in a batch-script directive line (#PBS/#SBATCH) are not shell-quoted


def did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
