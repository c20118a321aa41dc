"""What earlier runs left on this node, removed by the next launch that comes by.

A run that ends normally removes its own node-local caches. One that is SIGKILLed, or whose
node is taken away, cannot; nor can an MPI job killed outright remove MPICH's segments in
/dev/shm. So each launch, on each of its nodes, before it stages anything (it frees space
for the weights):

- `<node_local_dir>/aegis-cache/<job>/`: removed when every launcher rank that used it is gone.
  Each rank records itself there (`.owner-<pid>`: pid, start time, boot id; aegis.pids) before
  its instances start; a record whose process runs no more, or names a reused pid, is dead.
  A directory without any record (an aegis before this one) is removed once it is a day old.
- `<node_local_dir>/aegis-env/<name>-<key>/` (unpacked environments): the KEEP_ENVIRONMENTS
  most recently used are kept, and every one a running launch uses (it holds a shared lock on
  the environment's in-use file for as long as it runs); older ones are removed.
- `/dev/shm/mpich_shm_*`: this user's, older than a minute, that no live process maps or holds.

Everything removed is named in the launch's log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from ..pids import SAME, UNKNOWN, check_identity, identity
from .environment import ENV_MARKER, env_root
from .keeper import remove_unused_shm
from .pernode import remove_tree

KEEP_ENVIRONMENTS = 3  # unpacked environments kept per node besides those in use
OWNER_PREFIX = ".owner-"
ORPHAN_AGE = 24 * 3600.0  # seconds before a job cache without any owner record is removed
YOUNG = 60.0  # seconds: anything younger may be a launch that is just starting
SHM_GLOB = "mpich_shm_*"


def claim(cache_root: Path) -> Path:
    """Record this process as a user of its job's cache directory (made if missing)."""
    cache_root.mkdir(parents=True, exist_ok=True)
    record = cache_root / f"{OWNER_PREFIX}{os.getpid()}"
    record.write_text(json.dumps(identity()))
    return record


def _owners_alive(job_dir: Path) -> bool | None:
    """True if a recorded owner still runs (or cannot be told apart), False if every one is
    gone, None if there is no record."""
    records = list(job_dir.glob(f"{OWNER_PREFIX}*"))
    if not records:
        return None
    for record in records:
        try:
            who = json.loads(record.read_text())
            state = check_identity(who["pid"], who.get("start_ticks"), who.get("boot_id"))
        except (OSError, ValueError, KeyError, TypeError):
            state = UNKNOWN
        if state in (SAME, UNKNOWN):
            return True
    return False


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def _stale_job_caches(node_local_dir: str, current: Path, now: float) -> list[Path]:
    root = Path(node_local_dir) / "aegis-cache"
    stale = []
    for job_dir in sorted(root.iterdir()) if root.is_dir() else ():
        if not job_dir.is_dir() or job_dir.is_symlink() or job_dir == current:
            continue
        alive = _owners_alive(job_dir)
        if alive is False or (alive is None and _age(job_dir, now) > ORPHAN_AGE):
            stale.append(job_dir)
    return stale


def _in_use_lock(env_dir: Path) -> Path:
    """Held shared by every launch that runs from the environment (not its unpack lock: a
    rank waiting to unpack must not wait for the others to finish serving)."""
    return env_dir.parent / f".{env_dir.name}.in-use"


def hold_environment(env_dir: Path) -> int:
    """A shared lock on the environment's in-use file, held (by the returned fd, until this
    process exits) while instances run from it: the sweep never removes it meanwhile."""
    fd = os.open(_in_use_lock(env_dir), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _old_environments(node_local_dir: str, keep: int) -> list[tuple[Path, int]]:
    """Unpacked environments beyond the `keep` most recently used that nobody uses now, each
    with its lock file held exclusively (the caller removes, then closes)."""
    root = env_root(node_local_dir)
    envs = []
    for env in root.iterdir() if root.is_dir() else ():
        marker = env / ENV_MARKER
        if env.is_dir() and not env.is_symlink() and marker.is_file():
            envs.append((marker.stat().st_mtime, env))
    envs.sort(reverse=True)
    old = []
    for _, env in envs[keep:]:
        fd = os.open(_in_use_lock(env), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a running launch uses it
            os.close(fd)
            continue
        old.append((env, fd))
    return old


def sweep(node_local_dir: str, current: Path, *, keep: int = KEEP_ENVIRONMENTS,
          shm_dir: str = "/dev/shm", now: float | None = None) -> list[str]:
    """Remove what earlier runs left on this node (see the module docstring) -> what was
    removed, one line each. Never raises for a file it cannot remove."""
    now = time.time() if now is None else now
    removed = []
    for job_dir in _stale_job_caches(node_local_dir, current, now):
        remove_tree(job_dir)
        if not job_dir.exists():
            removed.append(f"{job_dir} (caches of a job that no longer runs)")
    for env, fd in _old_environments(node_local_dir, keep):
        try:
            remove_tree(env)
            if not env.exists():
                removed.append(f"{env} (an environment not used recently)")
        finally:
            os.close(fd)
    segments = {str(p) for p in Path(shm_dir).glob(SHM_GLOB) if _age(p, now) > YOUNG}
    with contextlib.suppress(OSError):
        removed += [f"{p} (MPI shared memory of a job that no longer runs)"
                    for p in remove_unused_shm(segments)]
    return removed
