"""Work done once per node before instances start, whatever the number of launcher ranks on it:
unpacking the staged environment and the pre-warm. Each step takes a node-local lock (flock)
and leaves a marker written last, so a second rank on the node (or a later job) waits, sees the
marker and does nothing, and a step killed half-way is redone from scratch next time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from .caches import NODE_CACHES, node_cache_dir
from .environment import ENV_MARKER, unpack_key, unpacked_dir
from .processes import kept

PREWARM_MARKER = ".prewarmed"


class NodeStepError(RuntimeError):
    """A per-node step failed: one line naming the step, the node and the cause."""


@contextlib.contextmanager
def node_lock(path: Path, timeout: float, should_stop=lambda: False):
    """Exclusive flock on `path` (created), waiting at most `timeout` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline or should_stop():
                    raise NodeStepError(f"lock {path} still held by another process after "
                                        f"{timeout:g}s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        for sub, dirs, _files in os.walk(path):  # read-only directories (tokenizer caches)
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(sub, d), 0o700)
        shutil.rmtree(path, ignore_errors=True)


def _run(argv: list[str], *, timeout: float, what: str, should_stop, log_path: Path | None = None,
         env=None, cwd=None) -> None:
    """Run argv under a keeper (processes.kept): on timeout or stop, and when the launcher
    dies, it and everything it started are killed."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(kept(argv, grace=0), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT if log_path else subprocess.PIPE,
                                start_new_session=True, env=env, cwd=cwd)
    except OSError as e:
        raise NodeStepError(f"{what}: cannot run {argv[0]}: {e.strerror or e}") from None
    finally:
        if log_path:
            out.close()
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() >= deadline or should_stop():
            proc.terminate()  # the keeper KILLs every descendant (grace 0), then exits
            proc.wait()
            why = "stopped" if should_stop() else f"did not finish within {timeout:g}s"
            raise NodeStepError(f"{what}: {why}")
        time.sleep(0.05)
    if proc.returncode != 0:
        detail = ""
        if not log_path and proc.stderr is not None:
            detail = proc.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
            detail = f": {detail[0]}" if detail else ""
        where = f" (log: {log_path})" if log_path else ""
        raise NodeStepError(f"{what}: exited with code {proc.returncode}{detail}{where}")
    if proc.stderr is not None:
        proc.stderr.close()


def unpack_environment(tarball: Path, node_local_dir: str, source: str, *, timeout: float,
                       should_stop=lambda: False) -> tuple[Path, bool]:
    """Unpack the staged tarball once on this node -> (environment directory, was cached).

    Extracts into a hidden temporary sibling, renames it into place, runs `conda-unpack` there
    when the environment has it (conda-pack: it rewrites prefixes for the final location, so
    it runs after the rename), and writes the marker last; without the marker a directory is
    not used and is replaced."""
    st = tarball.stat()
    dest = unpacked_dir(node_local_dir, source, unpack_key(st.st_size, st.st_mtime_ns))
    if (dest / ENV_MARKER).is_file():
        return dest, True
    with node_lock(dest.parent / f".{dest.name}.lock", timeout, should_stop):
        if (dest / ENV_MARKER).is_file():
            return dest, True  # another rank on this node did it while we waited
        for leftover in dest.parent.glob(f".{dest.name}.tmp-*"):
            _remove(leftover)  # a killed unpack (we hold the lock: nobody else is unpacking)
        _remove(dest)  # an unpack that died before its marker
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            _run(["tar", "-xf", str(tarball), "-C", str(tmp)], timeout=timeout,
                 what=f"unpacking {tarball.name}", should_stop=should_stop)
            os.chmod(tmp, 0o755)
            os.rename(tmp, dest)
        except BaseException:
            _remove(tmp)
            raise
        unpack_script = dest / "bin" / "conda-unpack"
        if unpack_script.is_file():
            env = {**os.environ, "PATH": f"{dest / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
            _run([str(dest / "bin" / "python"), str(unpack_script)], timeout=timeout,
                 what=f"conda-unpack in {dest}", should_stop=should_stop, env=env, cwd=dest)
        marker = {"source": source, "tarball": str(tarball), "size": st.st_size,
                  "mtime_ns": st.st_mtime_ns, "host": socket.gethostname(),
                  "unpacked_at": time.time()}
        (dest / ENV_MARKER).write_text(json.dumps(marker, indent=1))
    return dest, False


def prewarm_node(script: Path, cache_root: Path, *, timeout: float, log_path: Path,
                 should_stop=lambda: False) -> bool:
    """Run the pre-warm script once on this node (-> True), or find it done (-> False).

    Afterwards the node's tokenizer caches are made read-only: instances only read them."""
    node_dir = node_cache_dir(cache_root)
    marker = node_dir / PREWARM_MARKER
    if marker.is_file():
        return False
    with node_lock(cache_root / ".prewarm.lock", timeout, should_stop):
        if marker.is_file():
            return False
        for _var, sub in NODE_CACHES:
            (node_dir / sub).mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        _run(["bash", str(script)], timeout=timeout, what="pre-warm", should_stop=should_stop,
             log_path=log_path)
        for _var, sub in NODE_CACHES:
            path = node_dir / sub
            path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
        marker.write_text(f"{socket.gethostname()} {os.getpid()} {time.time()}\n")
    return True


def remove_job_caches(cache_root: Path, part_dirs: list[Path]) -> None:
    """Best effort at the end of a run: this rank's instance caches, then the job's cache
    directory once no instance directory is left in it (other ranks on the node may still
    be stopping theirs)."""
    for d in part_dirs:
        _remove(d)
    with contextlib.suppress(OSError):
        if not any(p.name.startswith("instance-") for p in cache_root.iterdir()):
            _remove(cache_root)
