"""The run's key: every instance and every router of a run answers only requests that carry it
(`Authorization: Bearer <key>`), and the launcher's management calls to its routers carry it.

Where it comes from:
- `api_key_env: NAME`: the value of $NAME (yours; never written anywhere by aegis);
- otherwise a random key made once per run (once per chain, shared by its generations) and
  kept beside the run in `api-key` (aegis.layout): mode 0600, created with O_EXCL and O_NOFOLLOW, read back
  only when it is a regular file of ours that nobody else can read. It never appears on a
  command line, in a script, a config copy or a log; instances get it through their
  environment (GENERATED_KEY_VAR).
"""

from __future__ import annotations

import os
import re
import secrets
import stat

GENERATED_KEY_VAR = "AEGIS_API_KEY"  # the instances' environment variable for a generated key
_KEY = re.compile(r"[A-Za-z0-9_-]{32,256}")


class CredentialError(RuntimeError):
    """The key file cannot be used (one line saying why)."""


def new_key() -> str:
    return secrets.token_urlsafe(32)


def read_key(path: str) -> str:
    """The key in `path`: a regular file owned by this user, readable by nobody else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CredentialError(f"{path}: cannot open the run's key ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialError(f"{path}: the run's key is not a regular file")
        if st.st_uid != os.getuid():
            raise CredentialError(f"{path}: the run's key belongs to uid {st.st_uid}, not to you")
        if st.st_mode & 0o077:
            raise CredentialError(f"{path}: the run's key is readable by others "
                            f"(mode {stat.S_IMODE(st.st_mode):o}); not using it")
        text = os.read(fd, 512).decode("ascii", errors="replace").strip()
    finally:
        os.close(fd)
    if not _KEY.fullmatch(text):
        raise CredentialError(f"{path}: not a key aegis wrote")
    return text


def key_for_run(path: str) -> str:
    """The key in `path`, made there first if absent (O_EXCL: two writers agree on one)."""
    key = new_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        return read_key(path)
    try:
        os.write(fd, f"{key}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return key
