"""Loading: a YAML file (or flags alone) -> a validated Config. Every problem of a file is
reported at once, one line each naming the key path; flags win over the file; relative paths
in the file resolve beside it."""

from __future__ import annotations

import os
import re
from typing import Any, Callable

from ..files import RefusedFile, read_run_file, read_small_file, why_unreadable
from ..platforms import Platform, get_platform
from .checks import Invalid, did_you_mean, short_repr, timing_problems, type_name
from .errors import ConfigError
from .keys import (BY_NAME, KEYS, LEGACY_GLOBAL_KEYS, LEGACY_MODEL_KEYS, MODEL_KEYS, Key,
                   _MODEL_NAME_ALIAS)
from .model import Config, ModelConfig
from .placement import placement_problems
from .yamlfile import parse_yaml

MAX_CONFIG_BYTES = 256 << 10  # a deployment config is a few KB
MAX_TOKEN_BYTES = 64 << 10  # a Hugging Face token is ~40 characters
MAX_PROBLEMS_SHOWN = 20


def _checked(key: Key, value: Any, path: str, source: str | None) -> Any:
    try:
        return key.check(value)
    except Invalid as err:
        where = f"{path} ({source})" if source else path
        raise ConfigError(f"{where}: {err}") from None


def _unknown(prefix: str, name: Any, allowed: list[str]) -> str:
    """'<prefix>.<name>: unknown key', the name quoted and cut short when it is long or has
    characters that would break the one-line message."""
    plain = isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name)
    shown = name if plain else short_repr(name)
    hint = did_you_mean(name, allowed) if plain else ""
    return (f"{prefix}.{shown}" if prefix else shown) + \
        f": unknown key{hint or '; see docs/config.md for the keys'}"


class Problems:
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
                 problems: Problems) -> ModelConfig | None:
    if not isinstance(entry, dict):
        problems.add(f"{path}: expected a mapping with at least 'model', "
                     f"got {short_repr(entry)} ({type_name(entry)})")
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
        key = BY_NAME[name]
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
                          f"{type_name(data)}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for name in overrides:
        if name not in BY_NAME:
            raise ConfigError(f"{name}: not a config key (internal error: unknown override)")
    model_overrides = {k: v for k, v in overrides.items() if BY_NAME[k].scope == "model"}
    ignored: list[str] = []
    problems = Problems()

    allowed_top = [k.name for k in KEYS] + ["models"]
    global_values: dict[str, Any] = {}
    single_model: dict[str, Any] = {}
    for name, value in data.items():
        if not isinstance(name, str):
            problems.add(f"{short_repr(name)}: keys must be strings")
        elif name in LEGACY_GLOBAL_KEYS:
            ignored.append(name)
        elif name == "models":
            continue
        elif name not in BY_NAME:
            problems.add(lambda: _unknown("", name, allowed_top))
        elif BY_NAME[name].scope == "model":
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
            flag = BY_NAME[next(iter(model_overrides))].flag
            problems.add(f"{flag}: per-model flags apply to the single-model form only; "
                         "this config has a models: list (edit models[*] in the file)")
        raw_models = data["models"]
        if not isinstance(raw_models, list):
            problems.add(f"models: expected a list of model entries, got "
                         f"{short_repr(raw_models)} ({type_name(raw_models)})")
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
                                  if BY_NAME[k].scope == "global"}}
    fields_ = {name: problems.check(BY_NAME[name], value, name,
                                    BY_NAME[name].flag if name in overrides else None)
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
    problems = Problems()
    for line in timing_problems(config) + placement_problems(config, platform):
        problems.add(line)
    problems.raise_any()
    return config


def check_submittable(config: Config, platform: Platform) -> None:
    """What a real submission needs beyond a valid config (a dry run does not)."""
    if platform.requires_account and not config.account:
        raise ConfigError(f"account: missing; {platform.name} charges jobs to a project: set "
                          "'account' or pass --account (a --dry-run works without it)")


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
