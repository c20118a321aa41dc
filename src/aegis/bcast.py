"""Stage a model directory (or one file) from a shared file system to node-local storage over MPI.

``stage()`` is collective: every rank of ``comm`` calls it with the same options (``dest`` may
differ per node). The root scans ``source`` into a sorted file index; the C extension
``aegis._bcast`` (csrc/bcast.c) broadcasts the index, then the tree as a GNU tar stream whose
layout follows from the index: reader ranks fill chunks with ``pread``, writer ranks (one per
node, or every rank) place the data with ``pwrite``. This module adds the scan, the option and
error agreement, the cache check, the atomic swap into place, the manifest and progress logging.

The extension is loaded lazily, after ``mpi4py.MPI``: it links libmpi by soname with no
rpath, so it binds to the libmpi that mpi4py loaded. Importing this module does not
initialise MPI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .pids import pid_alive

MANIFEST_NAME = ".aegis-manifest.json"
DEFAULT_CHUNK_SIZE = 16 << 20
DEFAULT_DEPTH = 4
DEFAULT_STALL_TIMEOUT = 300.0  # seconds a helper may sit on one piece of I/O
MAX_MPI_COUNT = 2**31 - 1
MAX_READERS = 256
MAX_INDEX_BYTES = 1 << 30  # the largest file index a rank accepts from the wire
PROGRESS_INTERVAL_S = 5.0

# numeric codes shared with csrc/bcast.h (checked against the extension at load time)
_CODE_NAMES = {
    1: "invalid arguments", 2: "out of memory", 3: "malformed file index",
    4: "source read failed", 5: "write failed", 6: "checksum mismatch", 7: "MPI error",
    8: "thread start failed", 9: "stalled", 10: "preparation failed", 11: "cancelled",
}
E_ARGS, E_NOMEM, E_SOURCE, E_WRITE, E_CHECKSUM, E_STALL, E_PREPARE = 1, 2, 4, 5, 6, 9, 10
E_CANCELLED = 11
CANCEL_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # what cancel_on_signals=True listens to

_INDEX_MAGIC = b"AEGIDX01"
_INDEX_ENTRY = struct.Struct("<B3xIqQIIII")  # kind, mode, mtime, size, uid, gid, path, link
_KINDS = {stat.S_IFREG: b"0", stat.S_IFDIR: b"5", stat.S_IFLNK: b"2"}


class StagingError(RuntimeError):
    """Staging failed. Raised on every rank with the same code, failing rank, host and cause."""

    def __init__(self, code: int, rank: int, host: str, cause: str):
        self.code, self.rank, self.host, self.cause = code, rank, host, cause
        super().__init__(f"staging failed on rank {rank} ({host}): {cause}")

    @property
    def kind(self) -> str:
        return _CODE_NAMES.get(self.code, f"error {self.code}")

    @property
    def signum(self) -> int | None:
        """The signal that cancelled the stage (code 11, on whichever rank got it), else None."""
        found = re.search(r"\(signal (\d+)\)", self.cause) if self.code == E_CANCELLED else None
        return int(found[1]) if found else None


def _cancel_cause(signum: int) -> str:
    """As the C core words it (csrc/bcast.c, cancelled())."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "a signal"
    return f"cancelled by {name} (signal {signum})"


@dataclass(frozen=True)
class WriterInfo:
    host: str
    rank: int
    dest: str
    cached: bool


@dataclass
class StageResult:
    source: str
    dest: str
    bytes: int  # tar stream bytes broadcast (0 when cached)
    source_bytes: int  # sum of regular file sizes in the source
    seconds: float
    throughput: float  # bytes / seconds (0 when cached)
    cached: bool
    checksum: str | None  # CRC32C of the tar stream, hex; None when verify=False
    writers: list[WriterInfo] = field(default_factory=list)
    readers: list[int] = field(default_factory=list)  # ranks that read the source

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- extension


def _mpi_family(version: str) -> str:
    low = version.lower()
    if "open mpi" in low:
        return "Open MPI"
    if any(name in low for name in ("mpich", "intel(r) mpi", "mvapich")):
        return "MPICH"  # MPICH ABI family: libmpi.so.12
    return low.split()[0] if low.split() else "unknown"


@functools.lru_cache(maxsize=None)
def _extension():
    """(MPI, ffi, lib) with mpi4py.MPI loaded first; ImportError with a fix on mismatch."""
    from mpi4py import MPI

    runtime = MPI.Get_library_version().strip().splitlines()[0]
    try:
        from aegis import _bcast
    except ImportError as exc:
        raise ImportError(
            f"aegis._bcast cannot load against the MPI mpi4py uses ({runtime}): {exc}; "
            "rebuild aegis for that MPI: MPICC=/path/to/its/mpicc "
            "pip install --no-build-isolation --force-reinstall ."
        ) from exc
    ffi, lib = _bcast.ffi, _bcast.lib
    buf = ffi.new("char[]", 256)
    lib.aegis_build_mpi_version(buf, 256)
    built = ffi.string(buf).decode()
    if _mpi_family(built) != _mpi_family(runtime):
        raise ImportError(
            f"aegis._bcast was built against {built} but mpi4py loaded {runtime}; rebuild aegis "
            "for the MPI mpi4py uses: MPICC=/path/to/its/mpicc "
            "pip install --no-build-isolation --force-reinstall ."
        )
    names = ("AEGIS_E_ARGS", "AEGIS_E_WRITE", "AEGIS_E_STALL", "AEGIS_E_PREPARE",
             "AEGIS_E_CANCELLED", "AEGIS_MAX_READERS")
    # An extension built from older sources lacks some names: that is a stale build too.
    if tuple(getattr(lib, n, None) for n in names) != (E_ARGS, E_WRITE, E_STALL, E_PREPARE,
                                                       E_CANCELLED, MAX_READERS):
        raise ImportError("aegis._bcast does not match aegis/bcast.py; reinstall aegis")
    return MPI, ffi, lib


def crc32c(data: bytes, crc: int = 0, *, software: bool = False) -> int:
    """CRC32C as the staging core computes it (exposed for tests and tools)."""
    _, _, lib = _extension()
    return lib.aegis_crc32c(crc, data, len(data), 1 if software else 0)


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC32C of A followed by B from the two CRCs and B's length."""
    _, _, lib = _extension()
    return lib.aegis_crc32c_combine(crc_a, crc_b, len_b)


# --------------------------------------------------------------------------- pure helpers


@dataclass
class SourceScan:
    """The root's view of the source: the file index for the C core and its identity."""
    src_dir: str  # directory the index paths are relative to (a file source: the file)
    index: bytes
    info: dict[str, Any]  # size, mtime_ns, entries, fingerprint (what the manifest records)


def scan(source: Path, should_stop: Callable[[], Any] | None = None) -> SourceScan:
    """lstat-walk ``source`` (a directory, or one regular file), sorted by path bytes.

    Raises OSError (unreadable), ValueError (a socket, FIFO or device inside), or
    InterruptedError once ``should_stop()`` is true (asked once per directory)."""
    real = Path(os.path.realpath(source))
    top = os.stat(real)
    # a file keeps the name it was given (a link's name, not its target's)
    if stat.S_ISDIR(top.st_mode):
        src_dir, entries = real, [(b".", top)]

        def fail(exc: OSError):
            raise exc

        for dirpath, dirnames, filenames in os.walk(real, onerror=fail):
            if should_stop is not None and should_stop():
                raise InterruptedError(f"scanning {source} was cancelled")
            rel_dir = os.fsencode(os.path.relpath(dirpath, real))
            for name in dirnames + filenames:
                rel = os.fsencode(name) if rel_dir == b"." else rel_dir + b"/" + os.fsencode(name)
                entries.append((rel, os.lstat(os.path.join(dirpath, name))))
    elif stat.S_ISREG(top.st_mode):
        src_dir, entries = real, [(os.fsencode(Path(source).name), top)]
    else:
        raise ValueError(f"{source} is neither a directory nor a regular file")
    entries.sort(key=lambda e: (e[0] != b".", e[0]))

    digest, total, newest = hashlib.sha256(), 0, 0
    parts = [_INDEX_MAGIC, struct.pack("<Q", len(entries))]
    for rel, st in entries:
        kind = _KINDS.get(stat.S_IFMT(st.st_mode))
        path = src_dir / os.fsdecode(rel) if stat.S_ISDIR(top.st_mode) else real
        if kind is None:
            raise ValueError(f"{path}: a socket, FIFO or device cannot be staged")
        link = os.fsencode(os.readlink(path)) if kind == b"2" else b""
        size = st.st_size if kind == b"0" else 0
        parts += [_INDEX_ENTRY.pack(kind[0], stat.S_IMODE(st.st_mode),
                                    st.st_mtime_ns // 1_000_000_000, size,
                                    st.st_uid & 0xFFFFFFFF, st.st_gid & 0xFFFFFFFF,
                                    len(rel), len(link)), rel, link]
        if rel != b"." or kind != b"5":
            # st_ino and st_ctime_ns too: a file replaced with its size and mtime put back
            # (`cp new old; touch -r`, or renamed over) is another inode or a later ctime,
            # which no user can set back
            digest.update(rel + b"\0" + f"{st.st_mode:o}\0{st.st_size}\0{st.st_mtime_ns}\0"
                          f"{st.st_ino}\0{st.st_ctime_ns}\0".encode() + link + b"\n")
            total += size
            newest = max(newest, st.st_mtime_ns)
    return SourceScan(str(src_dir), b"".join(parts),
                      {"size": total, "mtime_ns": newest, "entries": len(entries) - 1
                       if entries[0][0] == b"." else 1, "fingerprint": digest.hexdigest()})


def read_manifest(dest: Path) -> dict[str, Any] | None:
    try:
        with open(dest / MANIFEST_NAME, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _within(path: str, top: str) -> bool:
    """path is top or below it (both resolved; "/x/model2" is not below "/x/model")."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _ancestors(path: str):
    """path, its parent, ..., "/" (a resolved path)."""
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def nesting_problem(source, dest) -> str | None:
    """Why ``dest`` must not receive ``source``, or None. A dest inside the source (or the
    source itself) would copy the tree into itself, one level deeper on every run; a dest that
    holds the source (or a file source) would be replaced, which deletes the source. Paths are
    compared resolved (symlinks, ``..``; a source given as a link counts where the link is and
    where it points), then by identity: every existing ancestor's (st_dev, st_ino), which
    also sees a bind mount or another alias of the same directory."""
    given_dest = os.path.abspath(os.fspath(dest))
    dest_real = os.path.realpath(given_dest)
    given_src = os.path.abspath(os.fspath(source))
    src_real = os.path.realpath(given_src)
    src_entry = os.path.join(os.path.realpath(os.path.dirname(given_src)),
                             os.path.basename(given_src))  # the name itself (maybe a link)
    it = "it" if dest_real == given_dest else f"it resolves to {dest_real}, which"
    if dest_real == src_real:
        return f"{it} is the source {src_real} itself; choose a dest outside the source"
    if _within(dest_real, src_real):
        return (f"{it} is inside the source {src_real}: staging there would copy the tree "
                "into itself, one level deeper on every run; choose a dest outside the source")
    for held in dict.fromkeys((src_real, src_entry)):
        if _within(held, dest_real):
            return (f"{it} holds the source {held}: replacing it would delete the source; "
                    "choose a dest that does not contain the source")
    src_id, dest_id = _identity(src_real), _identity(dest_real)
    if src_id and any(_identity(a) == src_id for a in _ancestors(dest_real)):
        return (f"{it} is inside the source {src_real} (the same directory under another "
                "path: a bind mount or other alias); choose a dest outside the source")
    if dest_id and any(_identity(a) == dest_id for top in (src_real, src_entry)
                       for a in _ancestors(os.path.dirname(top))):
        return (f"{it} holds the source {src_real} (seen under another path: a bind mount "
                "or other alias); choose a dest that does not contain the source")
    return None


def _validate(source, dest, root, size, chunk_size, depth, writers, readers, max_count,
              stall_timeout, io_threads) -> str | None:
    if writers not in ("node", "all"):
        return f"writers must be 'node' or 'all', got {writers!r}"
    for name, value, low, high in (("chunk_size", chunk_size, 1, 1 << 40),
                                   ("depth", depth, 1, 1024),
                                   ("max_count", max_count, 1, MAX_MPI_COUNT),
                                   ("readers", readers, 1, min(size, MAX_READERS)),
                                   ("io_threads", io_threads, 1, 256)):
        if name == "io_threads" and value is None:
            continue  # automatic
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return f"{name} must be an integer in [{low}, {high}], got {value!r}"
    if -(-chunk_size // max_count) >= 65536:
        return "chunk_size / max_count must stay below 65536 MPI calls per chunk"
    if (not isinstance(stall_timeout, (int, float)) or isinstance(stall_timeout, bool)
            or not math.isfinite(stall_timeout) or not 0.001 <= stall_timeout <= 1e6):
        return f"stall_timeout must be a number of seconds in [0.001, 1e6], got {stall_timeout!r}"
    if not isinstance(root, int) or isinstance(root, bool) or not 0 <= root < size:
        return f"root must be a rank in [0, {size - 1}], got {root!r}"
    if not str(source) or not str(dest):
        return "source and dest must be non-empty paths"
    return None


def pick_readers(hosts: list[str], root: int, count: int) -> list[int]:
    """``count`` reader ranks: the root, then one rank per other host, then the rest."""
    first_per_host = {}
    for rank, host in enumerate(hosts):
        first_per_host.setdefault(host, rank)
    order = [root] + [r for r in first_per_host.values() if hosts[r] != hosts[root]]
    order += [r for r in range(len(hosts)) if r not in order]
    return order[:count]


def _describe(exc: BaseException, context: str = "") -> str:
    if isinstance(exc, OSError) and exc.strerror:
        named = exc.filename is not None and os.fsdecode(exc.filename) not in context
        return exc.strerror + (f": {os.fsdecode(exc.filename)}" if named else "")
    if isinstance(exc, (ValueError, OSError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- side effects


def _attempt(code: int, what: str, fn: Callable, *args) -> tuple[Any, tuple[int, str] | None]:
    """Run one rank's local step: (value, None), or (None, (code, cause)) for _agree, so any
    exception on one rank (even a RecursionError) becomes a StagingError on every rank."""
    try:
        return fn(*args), None
    except Exception as exc:  # noqa: BLE001 - reported collectively, never swallowed
        return None, (code, f"{what}: {_describe(exc, what)}")


def _handle_pending_signals() -> None:
    """Entering a Python function runs the Python-level handlers of signals already caught."""


class _Cancel:
    """SIGINT/SIGTERM cancel the stage they interrupt (``stage(cancel_on_signals=True)``).

    On the main thread, for the stage's duration: a handler that only records the signal
    replaces the caller's (so no KeyboardInterrupt lands between two collectives), and a pipe
    becomes Python's signal wakeup fd. Python's C-level handler writes the signal number
    there at once, even while the main thread is inside the C core, whose main loop polls
    the read end (``fd``, never blocking): this rank fails with code 11, which ends every rank
    through the per-chunk verdicts. A signal that lands in Python code is seen at the next
    agreement. A signal the caller ignores (SIG_IGN) stays ignored and cancels nothing.

    On the way out (cleanup done, handlers and wakeup fd restored) the caller learns of every
    signal received: its Python handler (the launcher's stop flag) is called with it; the
    default action (SIGTERM's SIG_DFL, SIGINT's KeyboardInterrupt) is raised again only when
    the stage completed all the same: a cancelled stage raises StagingError instead. A
    previous wakeup fd (an event loop's) gets the signal numbers too (those of other signals
    only where the core had not read them). A SIGINT/SIGTERM handler installed outside Python
    (getsignal() is None) is left alone: that signal does not cancel."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.received: list[int] = []
        self.fd, self.mask = -1, 0  # for the C core: cancel_fd, cancel_signals
        self._previous: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._wakeup = -1

    def __enter__(self) -> "_Cancel":
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        previous = {sig: signal.getsignal(sig) for sig in CANCEL_SIGNALS}
        previous = {sig: h for sig, h in previous.items() if h not in (signal.SIG_IGN, None)}
        if not previous:
            return self
        pipe = os.pipe()  # close-on-exec (PEP 446)
        for end in pipe:
            os.set_blocking(end, False)
        try:
            self._wakeup = signal.set_wakeup_fd(pipe[1], warn_on_full_buffer=False)
        except (ValueError, OSError):  # not the main interpreter: no cancellation
            for end in pipe:
                os.close(end)
            return self
        self._pipe = pipe
        for sig in previous:
            signal.signal(sig, self._record)
        self._previous = previous
        self.fd, self.mask = pipe[0], sum(1 << sig for sig in previous)
        return self

    def _record(self, signum, _frame) -> None:
        self.received.append(signum)

    @property
    def signum(self) -> int:
        """The first signal received (0: none)."""
        return self.received[0] if self.received else 0

    def cause(self) -> str:
        return _cancel_cause(self.signum)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._previous:
            return False
        # Restore with the signals blocked on this thread, after running the handlers of any
        # caught meanwhile: none is lost between our handler and the caller's. (A signal taken
        # by another thread in that instant is handled as Python does for that race.)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, set(self._previous))
        try:
            _handle_pending_signals()
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(self._wakeup)
        finally:
            others = b""  # numbers of other signals the core has not read (an event loop's)
            with contextlib.suppress(OSError):
                others = bytes(b for b in os.read(self._pipe[0], 4096) if b not in self._previous)
            for end in self._pipe:
                os.close(end)
            if self._wakeup >= 0 and (self.received or others):
                with contextlib.suppress(OSError):
                    os.write(self._wakeup, bytes(self.received) + others)
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # one held back is delivered now
        for sig in dict.fromkeys(self.received):
            handler = self._previous[sig]
            if handler in (signal.SIG_DFL, signal.default_int_handler):
                if exc_type is None:  # completed regardless: the default action, now
                    signal.raise_signal(sig)
            elif callable(handler):
                handler(sig, None)
        return False


class _Peers:
    """stage()'s private duplicate of the caller's communicator (a context manager that frees
    it). Each Python-level collective first meets the other ranks in an Ibarrier waited on
    asleep, for at most as long as the C core waits (twice the stall timeout + 5 s): a rank
    that gave up or failed alone, raised, or was stopped ends the others with StagingError
    code 9 instead of blocking them forever, and a retried stage() can never match what an
    abandoned one left pending."""

    def __init__(self, comm, stall_timeout):
        valid = isinstance(stall_timeout, (int, float)) and math.isfinite(stall_timeout)
        self.patience = 2 * (stall_timeout if valid else DEFAULT_STALL_TIMEOUT) + 5
        self.raw = comm.Dup()

    def __enter__(self) -> "_Peers":
        return self

    def __exit__(self, *exc) -> None:
        self.raw.Free()

    def Get_rank(self) -> int:
        return self.raw.Get_rank()

    def Get_size(self) -> int:
        return self.raw.Get_size()

    def _meet(self) -> None:
        request, start, nap = self.raw.Ibarrier(), time.monotonic(), 0.0005
        while not request.Test():
            if time.monotonic() - start > self.patience:
                raise StagingError(E_STALL, self.raw.Get_rank(), socket.gethostname(),
                                   f"no answer from the other ranks for {self.patience:.0f} s "
                                   "(a rank gave up or failed alone, or was stopped or killed)")
            time.sleep(nap)
            nap = min(2 * nap, 0.05)

    def allgather(self, value):
        self._meet()
        return self.raw.allgather(value)

    def bcast(self, value, root: int):
        self._meet()
        return self.raw.bcast(value, root=root)

    def Split_type(self, *args, **kwargs):
        self._meet()
        return self.raw.Split_type(*args, **kwargs)


def _agree(comm, error: tuple[int, str] | None, cancel: _Cancel | None = None) -> None:
    """Collective: raise the lowest failing rank's error on every rank, or return. A signal
    this rank received (``cancel``) is its error, whatever else failed here meanwhile."""
    if cancel is not None and cancel.signum:
        error = (E_CANCELLED, cancel.cause())
    errors = comm.allgather(None if error is None else (error[0], socket.gethostname(), error[1]))
    for rank, err in enumerate(errors):
        if err is not None:
            raise StagingError(err[0], rank, err[1], err[2])


def _check_same_options(comm, options: dict[str, Any], problem: str | None) -> None:
    """Collective: every rank's options must be valid and equal to rank 0's."""
    views = comm.allgather((problem, options, socket.gethostname()))
    for rank, (bad, _, host) in enumerate(views):
        if bad:
            raise StagingError(E_ARGS, rank, host, bad)
    for rank, (_, theirs, host) in enumerate(views):
        for name, value in theirs.items():
            if value != views[0][1][name]:
                raise StagingError(E_ARGS, rank, host,
                                   f"ranks passed different {name}: {views[0][1][name]!r} on "
                                   f"rank 0, {value!r} on rank {rank}; every rank must pass "
                                   "the same options")


def _rmtree(path: Path) -> None:
    """Remove a tree even if it holds read-only directories (a staged tree may)."""
    def make_writable_and_retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, onerror=make_writable_and_retry)


def _sibling(dest: Path, kind: str, pid: int | None = None) -> Path:
    """Hidden sibling of dest for a temporary ("tmp") or a replaced tree ("old")."""
    return dest.parent / f".{dest.name}.aegis-{kind}-{socket.gethostname()}-{pid or os.getpid()}"


def _remove_if_owner_dead(parent: Path, prefix: str, remove: Callable[[Path], None]) -> None:
    """Leftovers named `<prefix><pid>[-...]` whose process no longer runs on this host."""
    for path in parent.glob(glob.escape(prefix) + "*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            remove(path)


def _remove_stale_siblings(dest: Path) -> None:
    """Siblings left by a stage on this host whose process no longer exists (killed mid-way)."""
    if dest.parent.is_dir():
        for kind in ("tmp", "old"):
            _remove_if_owner_dead(dest.parent, _sibling(dest, kind, 1).name[:-1], _rmtree)


SHM_DIR = Path("/dev/shm")


def _remove_dead_rings() -> None:
    """Shared chunk rings (SHM_DIR/aegis-ring-<leader pid>-<ns>) whose leader was killed in the
    moment between creating and unlinking the name; another user's are left alone."""
    def unlink(path: Path) -> None:
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
            path.unlink()

    _remove_if_owner_dead(SHM_DIR, "aegis-ring-", unlink)


def _prepare_dest(dest: Path, tmp: Path, force: bool) -> None:
    """Writer-side checks before any byte moves. Raises OSError/ValueError with a cause."""
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir() or dest.is_symlink():
            if not force:
                raise ValueError(f"dest {dest} exists and is not a directory "
                                 "(pass force=True to replace it)")
        elif read_manifest(dest) is None and any(dest.iterdir()) and not force:
            raise ValueError(f"dest {dest} exists, is not empty and was not staged by aegis "
                             f"(no {MANIFEST_NAME}); remove it or pass force=True")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _rmtree(tmp)
    tmp.mkdir(mode=0o700)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename tmp to dest; an old dest is renamed away first and removed after."""
    old = _sibling(dest, "old")
    had_old = dest.exists() or dest.is_symlink()
    if had_old:
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        if had_old:
            os.rename(old, dest)
        raise
    if had_old:
        _rmtree(old)


class _Progress:
    """Root-side thread that logs bytes, rate and ETA to stderr while the C call runs."""

    def __init__(self, result_struct, expected: int, interval: float):
        self._res, self._expected, self._interval = result_struct, expected, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aegis-stage-progress",
                                        daemon=True)
        self._start = time.monotonic()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            done = self._res.bytes_done
            elapsed = time.monotonic() - self._start
            rate = done / elapsed if elapsed > 0 else 0.0
            left = max(self._expected - done, 0)
            eta = f"{left / rate:.0f}s" if rate > 0 else "?"
            pct = f" ({100 * min(done, self._expected) / self._expected:.0f}%)" \
                if self._expected else ""
            print(f"aegis stage: {done / 2**30:.2f} GiB{pct}, {rate / 1e9:.2f} GB/s, ETA {eta}",
                  file=sys.stderr, flush=True)


def default_io_threads(ranks_here: int) -> int:
    """Reader/writer threads per rank: this node's cores shared by its ranks, 2 to 3. More
    threads writing one tree contend in the kernel: on the 16-core benchmark machine 8 cost
    twice the CPU per GiB of 2 for 25% less wall time; 3 is the best of both (docs/staging.md)."""
    return max(2, min(3, len(os.sched_getaffinity(0)) // max(ranks_here, 1)))


def stage(source, dest, comm=None, *, root: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE,
          depth: int = DEFAULT_DEPTH, writers: str = "node", readers: int = 1,
          verify: bool = True, force: bool = False, progress: bool = True,
          max_count: int = MAX_MPI_COUNT, stall_timeout: float = DEFAULT_STALL_TIMEOUT,
          io_threads: int | None = None, share_ring: bool = True,
          cancel_on_signals: bool = True, _fault: tuple | None = None,
          _capture: str | None = None) -> StageResult:
    """Copy ``source`` (a directory, or one regular file) to ``dest`` on every node. Collective.

    - ``dest`` is a directory: a directory source's contents land in it; a file source lands
      as ``dest/<name>``. The root scans ``source``; reader ranks read it; writers ignore it.
    - Every rank must pass the same ``root``, ``chunk_size``, ``depth``, ``writers``,
      ``readers``, ``verify``, ``max_count``, ``stall_timeout`` and ``share_ring``; otherwise
      every rank raises StagingError (code 1) before anything moves.
    - ``readers=k``: k ranks (the root first, then one per other node) each read a disjoint
      share of the stream (every k-th chunk) and broadcast it.
    - Atomic per writer: the tree is written into a hidden sibling
      ``.<dest>.aegis-tmp-<host>-<pid>`` (leftovers of killed runs on this host are removed by
      the next stage, cached or not), checked (CRC32C of every chunk, by one writer on each
      host that received it over MPI, unless ``verify=False``),
      gets the manifest ``dest/.aegis-manifest.json`` last, then is renamed onto ``dest``. On
      any error the temporary is removed and ``dest`` is left as it was.
    - Directories are staged with their mode plus ``u+rwx`` (a read-only source still gives a
      tree its owner can write and remove); files keep their mode; mtimes are kept (seconds).
    - Cache: when every writer's manifest matches the source (path and a fingerprint of every
      entry's name, type, mode, size, mtime, inode number and ctime, computed by root from
      metadata only), nothing moves and the result has ``cached=True``. ``force=True`` always
      re-stages.
    - Existing ``dest``: an earlier aegis stage (has a manifest) or an empty directory is
      replaced atomically (renamed away, then removed). Anything else is refused with a
      StagingError unless ``force=True``, so a mistyped ``dest`` cannot delete user data.
    - Refused (code 10, before anything is written, ``force`` or not): a ``dest`` inside the
      source or equal to it (each re-run would nest another copy into the source), or one
      that holds the source (replacing it would delete the source); compared resolved and by
      the identity of every ancestor (symlinks, bind mounts). See ``nesting_problem()``.
    - ``writers="node"``: the lowest rank of each shared-memory node writes; ``"all"``: every
      rank writes its own ``dest`` (two writers on one host must not share a ``dest``).
    - ``share_ring``: the ranks of one host share one ring of ``depth`` chunk buffers in
      shared memory (``/dev/shm``), so a chunk crosses MPI once per host and each writer
      copies it once; ``False`` gives every rank a private ring (MPI copies to each rank).
    - ``depth`` chunks of ``chunk_size`` bytes are in flight per ring; ``max_count`` caps the
      elements per MPI call; ``io_threads`` reader/writer threads per rank (default: the
      node's cores shared by its ranks, 2 to 8).
    - ``stall_timeout``: a reader or writer thread stuck on one piece of I/O this many seconds
      ends the stage on every rank (code 9); a rank whose peers stop answering (in the C core
      or in any agreement around it) gives up after twice that plus 5 s, code 9. ``stage()``
      works on a private duplicate of ``comm``, so a retry never meets an abandoned stage.
    - ``cancel_on_signals`` (main thread only): SIGINT or SIGTERM (``scancel``, Ctrl-C) on any
      rank during the stage cancels it: every rank raises StagingError code 11 ("cancelled by
      SIGTERM (signal 15)", ``.signum``) within about a second, and the temporary is removed.
      The caller's own handlers are set aside meanwhile and are called with the signal when
      stage() ends (so the launcher's stop flag learns it); a default action (SIGTERM's exit,
      SIGINT's KeyboardInterrupt) is taken then only if the stage completed regardless (a
      signal during the final rename). Signals the caller ignores stay ignored. ``False``:
      signals are left to the caller (they wait for the C core to return).
    - Errors raise ``StagingError`` (``.code``, ``.rank``, ``.host``, ``.cause``) on every rank.
    - ``progress``: root logs bytes, GB/s and ETA to stderr every few seconds.
    """
    MPI, ffi, lib = _extension()
    with _Cancel(cancel_on_signals) as cancel, \
            _Peers(MPI.COMM_WORLD if comm is None else comm, stall_timeout) as comm:
        rank, size = comm.Get_rank(), comm.Get_size()
        host = socket.gethostname()
        t0 = time.monotonic()
        source_path = Path(os.path.abspath(os.fspath(source))) if str(source) else Path("")
        dest_path = Path(os.path.abspath(os.fspath(dest))) if str(dest) else Path("")

        options = {"root": root, "chunk_size": chunk_size, "depth": depth, "writers": writers,
                   "readers": readers, "verify": bool(verify), "max_count": max_count,
                   "stall_timeout": stall_timeout, "share_ring": bool(share_ring)}
        _check_same_options(comm, options, _validate(source, dest, root, size, chunk_size, depth,
                                                     writers, readers, max_count, stall_timeout,
                                                     io_threads))

        # root: scan the source (the file index stays on root; the C core broadcasts it)
        source_scan, error = None, None
        if rank == root:
            source_scan, error = _attempt(E_PREPARE, f"source {source_path}", scan, source_path,
                                          lambda: cancel.signum)
        _agree(comm, error, cancel)
        shared = None
        if rank == root:
            shared = {**source_scan.info, "source": str(source_path),
                      "src_dir": source_scan.src_dir}
        info = comm.bcast(shared, root=root)
        src_dir = info.pop("src_dir")

        node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        node_rank = node_comm.Get_rank()
        is_writer = writers == "all" or node_rank == 0
        ranks_here = node_comm.Get_size()
        node_comm.Free()

        def look_at_dest():
            if node_rank == 0:  # whatever this stage's share_ring: they are dead weight
                _remove_dead_rings()
            if not is_writer:
                return True, None
            nested = nesting_problem(source_path, dest_path)  # before anything is touched
            if nested:
                raise ValueError(nested)
            _remove_stale_siblings(dest_path)  # also when nothing else happens (cached)
            manifest = read_manifest(dest_path)
            cached = (not force and manifest is not None
                      and manifest.get("source") == info["source"]
                      and manifest.get("fingerprint") == info["fingerprint"])
            return cached, manifest

        looked, error = _attempt(E_PREPARE, f"dest {dest_path}", look_at_dest)
        _agree(comm, error, cancel)
        cached_here, manifest = looked
        # (a writer's manifest holds the checksum of the stream it was staged from: every
        # rank gets it, so what callers key on it agree, writers or not)
        roles = comm.allgather((host, rank, str(dest_path), is_writer, cached_here,
                                manifest.get("checksum") if manifest else None))
        writer_infos = [WriterInfo(h, r, d, c) for h, r, d, w, c, _ in roles if w]
        reader_ranks = pick_readers([h for h, *_ in roles], root, readers)
        if all(c for *_, c, _ in roles):
            checksum = next((k for *_, k in roles if k), None)
            return StageResult(info["source"], str(dest_path), 0, info["size"],
                               time.monotonic() - t0, 0.0, True, checksum, writer_infos,
                               reader_ranks)

        tmp = _sibling(dest_path, "tmp")

        def prepare():
            same_host = [d for h, r, d, w, *_ in roles if w and h == host]
            if same_host.count(str(dest_path)) > 1:
                raise ValueError(f"dest {dest_path} is used by several writer ranks on {host}; "
                                 "give each rank its own dest with writers='all'")
            _prepare_dest(dest_path, tmp, force)

        try:
            error = _attempt(E_PREPARE, f"dest {dest_path}", prepare)[1] if is_writer else None
            _agree(comm, error, cancel)
            params = dict(root=root, chunk_size=chunk_size, depth=depth, readers=reader_ranks,
                          is_writer=is_writer, verify=verify, max_count=max_count,
                          stall_timeout=stall_timeout, share_ring=bool(share_ring),
                          io_threads=io_threads or default_io_threads(ranks_here),
                          fault=_fault, capture=_capture if is_writer else None,
                          cancel_fd=cancel.fd, cancel_signals=cancel.mask)
            transfer = _transfer(MPI, ffi, lib, comm.raw, src_dir if rank in reader_ranks else None,
                                 source_scan.index if rank == root else None, tmp, params,
                                 progress and rank == root, info["size"])

            def finish():
                manifest = {**info, "checksum": transfer["checksum"],
                            "stream_bytes": transfer["bytes"], "staged_at": time.time()}
                (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
                _swap_into_place(tmp, dest_path)

            # A signal until here cancels; from the rename on, the stage completes (the caller
            # learns of a later signal when stage() returns).
            error = (E_CANCELLED, cancel.cause()) if cancel.signum else None
            if error is None and is_writer:
                error = _attempt(E_WRITE, f"dest {dest_path}", finish)[1]
            _agree(comm, error)
        finally:
            if is_writer:
                _rmtree(tmp)  # a no-op once renamed into place

        seconds = time.monotonic() - t0
        return StageResult(info["source"], str(dest_path), transfer["bytes"], info["size"],
                           seconds, transfer["bytes"] / seconds if seconds > 0 else 0.0, False,
                           transfer["checksum"],
                           [dataclasses.replace(w, cached=False) for w in writer_infos],
                           reader_ranks)


def _transfer(MPI, ffi, lib, comm, src_dir: str | None, index: bytes | None, tmp: Path,
              params: dict[str, Any], show_progress: bool, expected: int) -> dict[str, Any]:
    """One call into the C core; returns bytes and checksum or raises StagingError."""
    opts = ffi.new("aegis_stage_opts *")  # zeroed
    opts.chunk_size, opts.depth, opts.root = params["chunk_size"], params["depth"], params["root"]
    opts.max_count, opts.max_index_bytes = params["max_count"], MAX_INDEX_BYTES
    opts.stall_ms = max(1, int(params["stall_timeout"] * 1000))
    opts.n_readers = len(params["readers"])
    for i, reader in enumerate(params["readers"]):
        opts.readers[i] = reader
    opts.is_writer, opts.verify = int(params["is_writer"]), int(bool(params["verify"]))
    opts.share_ring = int(params["share_ring"])
    opts.io_threads = params["io_threads"]
    opts.fault_rank = -1
    opts.cancel_fd = params.get("cancel_fd", -1)
    opts.cancel_signals = params.get("cancel_signals", 0)
    keep = []  # cffi buffers that must outlive the call
    if params["fault"]:  # (kind, rank[, stream offset]); kinds: AEGIS_FAULT_* in bcast.h
        kind, fault_rank, *after = params["fault"]
        opts.fault_kind, opts.fault_rank = getattr(lib, "AEGIS_FAULT_" + kind.upper()), fault_rank
        opts.fault_after = after[0] if after else 0
    if params["capture"]:
        keep.append(ffi.new("char[]", os.fsencode(params["capture"])))
        opts.capture_path = keep[-1]
    res = ffi.new("aegis_stage_result *")
    comm_ptr = ffi.cast("void *", MPI._addressof(comm))
    progress = (_Progress(res, expected, PROGRESS_INTERVAL_S) if show_progress
                else contextlib.nullcontext())
    with progress:
        code = lib.aegis_stage(comm_ptr, os.fsencode(src_dir) if src_dir else ffi.NULL,
                               index if index is not None else ffi.NULL,
                               len(index) if index is not None else 0,
                               os.fsencode(str(tmp)), opts, res)
    if code != lib.AEGIS_OK:
        raise StagingError(code, res.failing_rank, ffi.string(res.host).decode(errors="replace"),
                           ffi.string(res.cause).decode(errors="replace")
                           or _CODE_NAMES.get(code, "unknown error"))
    return {"bytes": res.total_bytes,
            "checksum": f"{res.checksum:08x}" if params["verify"] else None}
