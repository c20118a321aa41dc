"""Bounded reading of files we do not control: configs, tokens, node files, run files.

A hostile or careless path (/dev/zero, a FIFO without a writer, a 50 GB file, a symlink to
another user's file) must end in one line, never a hang or a traceback. Used by the config
loader, the CLI (token files), the launcher (node files) and every reader of a run directory.
"""

from __future__ import annotations

import os
import select
import stat
import tempfile
import time
from pathlib import Path


class RefusedFile(ValueError):
    """A file that read_small_file refuses to read (its message says why, one line)."""


class FileTooLarge(RefusedFile):
    """A file that read_small_file refuses: too large, or a pipe that never ends."""


READ_TIMEOUT = 10.0  # a pipe or FIFO that stays silent this long is refused
# Run files (aegis.run, aegis.launch.chain): the endpoints file of MAX_INSTANCES instances is
# about 50 MB; job.id a line; chain.json a record per generation (at most 1000).
MAX_ENDPOINTS_BYTES = 64 << 20
MAX_JOB_ID_BYTES = 4 << 10
MAX_CHAIN_BYTES = 1 << 20


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _check_file(st: os.stat_result, limit: int, owner: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise RefusedFile(f"not a regular file ({_file_kind(st.st_mode)})")
    if owner is not None and st.st_uid != owner:
        raise RefusedFile(f"owned by uid {st.st_uid}, not by you (uid {owner})")
    if st.st_size > limit:
        raise FileTooLarge(f"larger than {limit // 1024} KiB")


def read_small_file(path: str, limit: int, timeout: float | None = None, *,
                    regular: bool = False, owner: int | None = None) -> str:
    """The text of `path`, reading at most `limit` bytes, so /dev/zero or a huge file cannot
    exhaust memory, and never waiting forever: a FIFO without a writer reads as empty, one
    whose writer stays silent for `timeout` seconds is refused (process substitution,
    `-c <(envsubst < c.yaml)`, works). With `regular`, only a regular file is read (a FIFO,
    device or directory is refused before a byte is read, also when a symlink leads to it);
    with `owner`, only one owned by that uid. Raises OSError, UnicodeDecodeError, or
    RefusedFile (FileTooLarge when too large)."""
    timeout = READ_TIMEOUT if timeout is None else timeout
    if regular or owner is not None:
        _check_file(os.stat(path), limit, owner)  # before open(): a device is never opened
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if regular or owner is not None:
            _check_file(os.fstat(fd), limit, owner)  # what was opened (swapped meanwhile?)
        deadline = time.monotonic() + timeout
        data = b""
        while len(data) <= limit:
            try:
                chunk = os.read(fd, limit + 1 - len(data))
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FileTooLarge(f"nothing more to read for {timeout:g} s") from None
                select.select([fd], [], [], left)
                continue
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileTooLarge(f"larger than {limit // 1024} KiB")
    return data.decode("utf-8")


def read_run_file(path: str, limit: int) -> str:
    """One file of a run directory (config.yaml, job.id, chain.json, the endpoints file): a
    regular file of yours, at most `limit` bytes, read without blocking. The one reader of
    them all (aegis.run, aegis.launch.chain). Raises like read_small_file."""
    return read_small_file(path, limit, regular=True, owner=os.getuid())


def why_unreadable(err: Exception) -> str:
    """One line for a read_small_file failure."""
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return str(err)


def write_atomic(path: str | os.PathLike, text: str, mode: int = 0o600) -> None:
    """Write `text` to `path` all at once for readers: a temporary file in the same directory
    (mode 0600 from the first byte), fsync, chmod `mode`, rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
