"""Deployment config: load YAML, merge CLI overrides, validate. Pure: no processes, no writes.

Where each part lives (a newcomer's map):
    keys.py       the key table: every key, its check, help and flag (the reference)
    checks.py     value checks and bounds; rules that tie keys together (timing)
    model.py      Config and ModelConfig, the validated result
    load.py       file or flags -> Config; every problem of a file at once
    placement.py  rules that need the platform (TP placeable, port ranges, node count)
    yamlfile.py   the YAML guard (no base-60, no duplicate keys, no alias bombs)

CONTRACT (other modules rely on these names; extend, don't rename):
    ModelConfig, Config, ConfigError, load_config(path, overrides) -> Config,
    from_mapping(data, overrides) -> Config, Config.to_mapping() (secrets omitted).

Precedence: CLI overrides > file > defaults. Validation errors raise ConfigError with one
line per problem, each naming the key path, the bad value and what is allowed; every problem
of a file is reported at once (the CLI exits 2 on it). Input is bounded: files are read with a
size cap (aegis.files), YAML nesting and alias expansion are capped, numbers have ranges.
"""

from .checks import (EXIT_MARGIN_S, MANAGED_ENV, byte_size, check_seconds, seconds,
                     timing_problems, walltime_seconds)
from .keys import (DIRECTIVE_SAFE_PATH, GLOBAL_KEYS, KEYS, LOGIN_KEYS, MODEL_KEYS, Key,
                   scheduler_names)
from .load import MAX_CONFIG_BYTES, MAX_TOKEN_BYTES, check_submittable, from_mapping, load_config
from .errors import ConfigError
from .model import DEFAULT_PORT_START, Config, ModelConfig
from .placement import INTERNAL_PORTS_PER_SLOT, MAX_NODES, check_placement, nodes_per_instance
from .yamlfile import dump_yaml, parse_yaml

__all__ = [
    "Config", "ConfigError", "DEFAULT_PORT_START", "DIRECTIVE_SAFE_PATH", "EXIT_MARGIN_S",
    "GLOBAL_KEYS", "INTERNAL_PORTS_PER_SLOT", "KEYS", "Key", "LOGIN_KEYS", "MANAGED_ENV", "MAX_CONFIG_BYTES",
    "MAX_NODES", "MAX_TOKEN_BYTES", "MODEL_KEYS", "ModelConfig", "byte_size",
    "check_placement", "check_seconds", "check_submittable", "dump_yaml", "from_mapping",
    "load_config", "nodes_per_instance", "parse_yaml", "scheduler_names", "seconds",
    "timing_problems", "walltime_seconds",
]
