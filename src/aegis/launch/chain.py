"""One generation of `aegis submit --chain`, inside its job: keep the chain's endpoints file
naming the newest generation that serves, and (PBS) release the successor at its start time.

The chain directory's endpoints.json is a copy of one generation's file with "generation"
added. A generation writes it when it already owns it, or when it is newer and has an
instance ready: so a successor that is still starting never hides a predecessor that serves,
and a draining predecessor stops writing once its successor took over. Writers on different
nodes take a lock file in the chain directory (flock) around read-compare-write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Mapping
from pathlib import Path

from ..files import MAX_ENDPOINTS_BYTES, read_run_file, write_atomic
from ..layout import ENDPOINTS_NAME
from ..runfiles import CHAIN_DIR_VAR, GENERATION_VAR, count, parse_json, read_record


def takes_over(current: dict | None, generation: int, doc: dict) -> bool:
    """Whether `generation` (with its endpoints `doc`) writes the chain's file now. Pure.
    A chain file that names no generation (or garbage for one) is taken over."""
    owner = count((current or {}).get("generation", 0) if isinstance(current, dict) else 0)
    ready = count(doc.get("ready", 0))
    return generation == owner or (generation > owner and (owner == 0 or ready > 0))


class ChainMirror:
    def __init__(self, chain_dir: str | os.PathLike, generation: int):
        self.dir = Path(chain_dir)
        self.generation = generation
        self.json_path = self.dir / ENDPOINTS_NAME
        self.txt_path = self.dir / "endpoints.txt"

    def __call__(self, doc: dict, txt: str | None) -> bool:
        """Mirror one write of this generation's endpoints file; -> whether it was written."""
        with self._lock():
            try:
                current = parse_json(read_run_file(str(self.json_path), MAX_ENDPOINTS_BYTES))
            except (OSError, ValueError):  # missing, or damaged: this generation rewrites it
                current = None
            if not takes_over(current, self.generation, doc):
                return False
            # .txt first, as in the generation's own files
            if txt is not None or (current or {}).get("generation") != self.generation:
                write_atomic(self.txt_path, txt if txt is not None else "")
            write_atomic(self.json_path, json.dumps({**doc, "generation": self.generation},
                                                    indent=2) + "\n")
            return True

    @contextlib.contextmanager
    def _lock(self):
        fd = os.open(self.dir / ".endpoints.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def from_environment(env: Mapping[str, str]) -> ChainMirror | None:
    chain_dir, generation = env.get(CHAIN_DIR_VAR), env.get(GENERATION_VAR, "")
    if not chain_dir or not generation.isdigit():
        return None
    return ChainMirror(chain_dir, int(generation))


def successor(chain_dir: str | os.PathLike, generation: int) -> str | None:
    """The job id of the next generation, from chain.json (None when this is the last)."""
    try:
        return read_record(chain_dir).get(generation + 1, (None,))[0]
    except (OSError, ValueError):
        return None
