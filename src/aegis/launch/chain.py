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

from ..config import MAX_CHAIN_BYTES, MAX_ENDPOINTS_BYTES, RefusedFile, read_run_file
from ..layout import CHAIN_NAME, ENDPOINTS_NAME
from .endpoints import parse_json, write_atomic

CHAIN_DIR_VAR = "AEGIS_CHAIN_DIR"
GENERATION_VAR = "AEGIS_GENERATION"
MAX_GENERATIONS = 1000  # aegis submit --chain N: N <= 1000


def _count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def takes_over(current: dict | None, generation: int, doc: dict) -> bool:
    """Whether `generation` (with its endpoints `doc`) writes the chain's file now. Pure.
    A chain file that names no generation (or garbage for one) is taken over."""
    owner = _count((current or {}).get("generation", 0) if isinstance(current, dict) else 0)
    ready = _count(doc.get("ready", 0))
    return generation == owner or (generation > owner and (owner == 0 or ready > 0))


def read_record(chain_dir: str | os.PathLike) -> dict[int, tuple[str, str | None]]:
    """chain.json: generation -> (job id, run directory or None when not recorded). Read as a
    bounded regular file of yours; every field checked. Raises OSError or ValueError (one
    line, naming the file)."""
    from ..scheduler import check_job_id

    path = os.path.join(os.fspath(chain_dir), CHAIN_NAME)
    try:
        record = parse_json(read_run_file(path, MAX_CHAIN_BYTES))
    except (RefusedFile, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: unreadable chain record: {err}") from None
    generations = record.get("generations") if isinstance(record, dict) else None
    if not isinstance(generations, list) or len(generations) > MAX_GENERATIONS:
        raise ValueError(f"{path}: unreadable chain record: expected a list of at most "
                         f"{MAX_GENERATIONS} generations")
    runs = {}
    for i, entry in enumerate(generations):
        number = entry.get("generation") if isinstance(entry, dict) else None
        job_id = entry.get("job_id") if isinstance(entry, dict) else None
        run_dir = entry.get("run_dir") if isinstance(entry, dict) else None
        try:
            if isinstance(job_id, int) and not isinstance(job_id, bool):
                job_id = str(job_id)
            check_job_id(job_id)
        except ValueError:
            job_id = None
        if not (isinstance(number, int) and not isinstance(number, bool)
                and 1 <= number <= MAX_GENERATIONS) or job_id is None or \
                not (run_dir is None or isinstance(run_dir, str) and run_dir
                     and "\0" not in run_dir):
            raise ValueError(f"{path}: unreadable chain record: generations[{i}] is not "
                             "{generation: 1-1000, job_id, run_dir}")
        runs[number] = (job_id, run_dir)
    return runs


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
