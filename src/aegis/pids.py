"""Processes on this host: whether a pid names a live process (the staging core's leftovers and
a launched run's launcher are both recognized by pid), and which process it names.

A pid alone does not name a process for long: once it exits, the kernel hands the number to
the next process. A launched run's launcher is therefore recorded by its identity: pid, start
time (field 22 of /proc/<pid>/stat, clock ticks since boot) and the boot id; a pid whose start
time or boot differs is another process. `signal_process` signals through a pidfd opened
before the identity is checked, so a pid reused between the check and the signal is not hit.
"""

from __future__ import annotations

import functools
import os
import signal
import socket

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
# What check_identity says about a recorded process.
SAME, GONE, OTHER, UNKNOWN = "same", "gone", "other", "unknown"


def pid_alive(pid: int) -> bool:
    """True while `pid` runs here; False once it is gone or a zombie (exited, not yet reaped),
    and for what names no single process (0 and negative numbers name process groups)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except (OverflowError, ValueError):
        return False  # no pid at all
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        # kill(0) also answers for a thread's id, which names no process
        return fields["Tgid"].strip() == str(pid) and not fields["State"].strip().startswith("Z")
    except (OSError, KeyError, ValueError):
        return True


_boot_id: str | None = None


def boot_id() -> str | None:
    """This boot of this host's kernel (a UUID), or None where /proc does not say."""
    global _boot_id
    if _boot_id is None:
        try:
            with open(BOOT_ID_PATH, encoding="ascii") as f:
                _boot_id = f.read(64).strip() or None
        except (OSError, ValueError):
            return None
    return _boot_id


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3 (state) onwards of /proc/<pid>/stat, or None when there is no such process.
    The command name (field 2) may hold spaces and parentheses: split after its last ')'."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read(4096)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        raise
    try:
        return text.rsplit(b")", 1)[1].decode("ascii").split()
    except (IndexError, UnicodeDecodeError):
        return None


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None when
    there is no such process or /proc cannot say."""
    try:
        fields = _stat_fields(pid)
        return int(fields[19]) if fields is not None else None
    except (OSError, IndexError, ValueError):
        return None


def identity(pid: int | None = None) -> dict:
    """The fields that name process `pid` (default: this one) for the launcher record:
    pid, start_ticks, boot_id (the last two None where /proc does not tell)."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start_ticks": start_ticks(pid), "boot_id": boot_id()}


def check_identity(pid: int, ticks: int | None, boot: str | None) -> str:
    """Whether `pid` on this host is still the process recorded with start time `ticks` and
    boot id `boot`: SAME (it runs, not a zombie), GONE (no such process, or its zombie),
    OTHER (the number names another process now, or the record is of another boot) or
    UNKNOWN (the record has no start time or boot id, or /proc cannot tell)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return UNKNOWN
    if not isinstance(ticks, int) or isinstance(ticks, bool) or not isinstance(boot, str):
        return UNKNOWN
    here = boot_id()
    if here is None:
        return UNKNOWN
    if boot != here:
        return OTHER  # recorded before a reboot (or on another machine of the same name)
    try:
        fields = _stat_fields(pid)
    except OSError:
        return UNKNOWN
    if fields is None:
        return GONE
    try:
        state, started = fields[0], int(fields[19])
    except (IndexError, ValueError):
        return UNKNOWN
    if started != ticks:
        return OTHER
    return GONE if state in ("Z", "X", "x") else SAME


def signal_process(pid: int, ticks: int | None, boot: str | None, signum: int) -> str:
    """Send `signum` to `pid` only if it is still the recorded process; -> check_identity's
    answer at the moment of sending (SAME: sent). Through a pidfd where the kernel has them
    (Linux >= 5.3): opened first, the identity checked after, so a pid that is reused meanwhile
    is never signalled. Elsewhere the identity is checked just before kill() (a window of
    microseconds). PermissionError propagates."""
    pidfd_open = getattr(os, "pidfd_open", None)
    send = getattr(signal, "pidfd_send_signal", None)
    fd = None
    if pidfd_open is not None and send is not None:
        try:
            fd = pidfd_open(pid)
        except ProcessLookupError:
            return GONE
        except OSError:
            fd = None  # ENOSYS (old kernel), EINVAL (a thread id): no pidfd; kill() below
    try:
        # The recorded process has held this pid since before the pidfd was opened; so if the
        # pid names it now, the pidfd names it too (a pid is not reused before its reaping).
        verdict = check_identity(pid, ticks, boot)
        if verdict != SAME:
            return verdict
        try:
            if fd is not None:
                send(fd, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            return GONE
        return SAME
    finally:
        if fd is not None:
            os.close(fd)


@functools.lru_cache(maxsize=1)
def _fqdn() -> str:
    return socket.getfqdn()  # may ask DNS: once per process


def this_host(host: str) -> bool:
    """Whether `host` (a launcher record's host name) is this machine."""
    return host in ("localhost", "127.0.0.1", socket.gethostname()) or host == _fqdn()
