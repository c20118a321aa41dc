"""The YAML guard: a SafeLoader that keeps walltime: 01:00:00 a string and refuses duplicate
keys, deep nesting and alias bombs before anything is built; errors name file:line:column."""

from __future__ import annotations

import re
from typing import Any

from .checks import short_repr
from .errors import ConfigError

MAX_YAML_DEPTH = 64
MAX_YAML_VALUES = 100_000  # after alias expansion


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
                    None, None, f"{short_repr(node.value)} is not a valid {kind} ({err})",
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


def dump_yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True,
                          width=10_000)
