"""Work done once per node before instances start, whatever the number of launcher ranks on it:
unpacking the staged environment and the pre-warm. Each step takes a node-local lock (flock)
and leaves a marker written last, so a second rank on the node (or a later job) waits, sees the
marker and does nothing, and a step killed half-way is redone from scratch next time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
import time
import zlib
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


def remove_tree(path: Path) -> None:
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


class _EnvMembers:
    """The extraction filter of a packed environment: Python's `data` filter (regular files,
    directories and links that stay inside; no device nodes, FIFOs or absolute paths; set-id,
    sticky and group/other-write bits cleared; owners not applied), with one exception: a
    symlink to an absolute path outside is kept (venv-pack keeps bin/python3 ->
    /usr/bin/python3.x), and so is one whose own target is inside but resolves outside
    through such a link (bin/python -> python3). Neither is ever written through: the data
    filter resolves every later member's path on disk and refuses one that ends up outside.
    Also ends a stopped or overdue extraction between members."""

    def __init__(self, deadline: float, should_stop):
        self.deadline, self.should_stop = deadline, should_stop
        self.member = ""  # the member being extracted (for the error message)

    def __call__(self, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        if self.should_stop():
            raise NodeStepError("stopped")
        if time.monotonic() >= self.deadline:
            raise NodeStepError("did not finish in time")
        self.member = member.name
        try:
            return tarfile.data_filter(member, dest)
        except (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError) as e:
            # a symlink to an absolute path (bin/python3 -> /usr/bin/python3.11), or one that
            # stays inside by its own words but resolves outside through such a link
            # (bin/python -> python3): kept, never written through
            root = os.path.realpath(dest)
            inside = os.path.normpath(os.path.join(root, os.path.dirname(member.name),
                                                   member.linkname))
            if not member.issym() or (isinstance(e, tarfile.LinkOutsideDestinationError)
                                      and os.path.commonpath([inside, root]) != root):
                raise
            return member.replace(uid=None, gid=None, uname=None, gname=None, deep=False)


def _refused(e: tarfile.FilterError) -> str:
    """Why a member was refused, in words."""
    member = e.tarinfo
    if isinstance(e, tarfile.SpecialFileError):
        kind = ("character device" if member.ischr() else "block device" if member.isblk()
                else "FIFO" if member.isfifo() else "special file")
        return f"is a {kind}; only regular files, directories and links are allowed"
    if isinstance(e, tarfile.AbsoluteLinkError):
        return f"is a hard link to an absolute path ({member.linkname})"
    if isinstance(e, tarfile.LinkOutsideDestinationError):
        return f"is a link to {member.linkname!r}, outside the destination"
    if isinstance(e, tarfile.OutsideDestinationError):
        return "would be written outside the destination (a '..' path, or through a link)"
    return str(e)


def _tar_stream(tarball: Path, stack: contextlib.ExitStack) -> tarfile.TarFile:
    """The tarball as a tar stream read once, front to back (zstd through the zstd tool:
    Python's tarfile reads gzip, bzip2 and xz itself)."""
    if tarball.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise NodeStepError(f"unpacking {tarball.name}: the zstd command is not on PATH")
        proc = subprocess.Popen(["zstd", "-dcq", "--", str(tarball)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        stack.callback(lambda: (proc.kill(), proc.wait()) if proc.poll() is None else None)
        stack.callback(proc.stdout.close)
        return stack.enter_context(tarfile.open(fileobj=proc.stdout, mode="r|"))
    return stack.enter_context(tarfile.open(tarball, mode="r|*"))


def extract_environment(tarball: Path, into: Path, *, timeout: float,
                        should_stop=lambda: False) -> None:
    """Extract a packed environment into `into` (see _EnvMembers for what is allowed). Raises
    NodeStepError naming the member and what is wrong with it."""
    if not hasattr(tarfile, "data_filter"):
        raise NodeStepError("unpacking needs tarfile's extraction filters (Python >= 3.10.12, "
                            "3.11.4 or 3.12)")
    members = _EnvMembers(time.monotonic() + timeout, should_stop)
    try:
        with contextlib.ExitStack() as stack:
            _tar_stream(tarball, stack).extractall(into, filter=members)
    except NodeStepError as e:
        raise NodeStepError(f"unpacking {tarball.name}: {e}") from None
    except tarfile.FilterError as e:
        raise NodeStepError(f"unpacking {tarball.name}: member {e.tarinfo.name!r} "
                            f"{_refused(e)}") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        at = f"member {members.member!r}: " if members.member else ""
        what = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise NodeStepError(f"unpacking {tarball.name}: {at}{what}") from None


def _content_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack_environment(tarball: Path, node_local_dir: str, source: str, *, timeout: float,
                       checksum: str | None = None,
                       should_stop=lambda: False) -> tuple[Path, bool]:
    """Unpack the staged tarball once on this node -> (environment directory, was cached).

    The directory's name carries the tarball's content key (`checksum`: the CRC32C stage()
    computed while broadcasting it; without one, a SHA-256 of the file), so a replaced
    tarball is a new directory whatever its size and mtime. Extracts into a hidden temporary
    sibling, renames it into place, runs `conda-unpack` there when the environment has it
    (conda-pack: it rewrites prefixes for the final location, so it runs after the rename),
    and writes the marker last; without the marker a directory is not used and is replaced."""
    size = tarball.stat().st_size
    digest = f"crc32c:{checksum}" if checksum else f"sha256:{_content_digest(tarball)}"
    dest = unpacked_dir(node_local_dir, source, unpack_key(size, digest))
    if (dest / ENV_MARKER).is_file():
        _touch(dest / ENV_MARKER)
        return dest, True
    with node_lock(dest.parent / f".{dest.name}.lock", timeout, should_stop):
        if (dest / ENV_MARKER).is_file():
            return dest, True  # another rank on this node did it while we waited
        for leftover in dest.parent.glob(f".{dest.name}.tmp-*"):
            remove_tree(leftover)  # a killed unpack (we hold the lock: nobody else is unpacking)
        remove_tree(dest)  # an unpack that died before its marker
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            extract_environment(tarball, tmp, timeout=timeout, should_stop=should_stop)
            os.chmod(tmp, 0o755)
            os.rename(tmp, dest)
        except BaseException:
            remove_tree(tmp)
            raise
        unpack_script = dest / "bin" / "conda-unpack"
        if unpack_script.is_file():
            env = {**os.environ, "PATH": f"{dest / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
            _run([str(dest / "bin" / "python"), str(unpack_script)], timeout=timeout,
                 what=f"conda-unpack in {dest}", should_stop=should_stop, env=env, cwd=dest)
        marker = {"source": source, "tarball": str(tarball), "size": size, "digest": digest,
                  "host": socket.gethostname(), "unpacked_at": time.time()}
        (dest / ENV_MARKER).write_text(json.dumps(marker, indent=1))
    return dest, False


def _touch(path: Path) -> None:
    """Mark an environment used now (the node's cleanup keeps the most recently used)."""
    with contextlib.suppress(OSError):
        os.utime(path)


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
        remove_tree(d)
    with contextlib.suppress(OSError):
        if not any(p.name.startswith("instance-") for p in cache_root.iterdir()):
            remove_tree(cache_root)
