"""The Jinja2 environment every shell template (batch jobs, instance scripts) renders with.

Shell, not HTML: nothing is escaped implicitly; every value that reaches a shell goes
through the `q` (one word) or `argv` (a word list) filter, both shlex quoting.
"""

from __future__ import annotations

import shlex
from functools import lru_cache
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


@lru_cache(maxsize=None)
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["argv"] = lambda words: " ".join(shlex.quote(str(w)) for w in words)
    return env


def render_template(name: str, **context) -> str:
    return _environment().get_template(name).render(**context)
