"""Stage a model directory (or file) from a shared file system to node-local storage over MPI.

``stage()`` is collective: every rank of ``comm`` calls it with the same arguments (``dest``
may differ per node). The root streams ``tar -c`` of ``source`` through MPI broadcasts; one
writer rank per node (``writers="node"``) or every rank (``writers="all"``) extracts it. The
transfer itself is the C extension ``aegis._bcast`` (csrc/bcast.c); this module adds the
cache check, the atomic swap into place, the manifest and progress logging.

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
import os
import shutil
import socket
import stat
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = ".aegis-manifest.json"
DEFAULT_CHUNK_SIZE = 16 << 20
DEFAULT_DEPTH = 4
MAX_MPI_COUNT = 2**31 - 1
PROGRESS_INTERVAL_S = 5.0
# On an oversubscribed node, waiting ranks poll MPI then sleep this long instead of spinning
# in MPICH's progress loop, which would take a core from tar and the helper threads. With
# cores to spare they block in MPI (0): multi-hop broadcasts need every rank's progress calls.
OVERSUBSCRIBED_POLL_SLEEP_US = 50
# busy entities per writer rank: its MPI thread, the writer thread and tar -x
_ACTIVE_PER_RANK = 3

# numeric codes shared with csrc/bcast.h (checked against the extension at load time)
_CODE_NAMES = {
    1: "invalid arguments", 2: "out of memory", 3: "cannot run tar", 4: "source read failed",
    5: "extraction failed", 6: "checksum mismatch", 7: "MPI error", 8: "thread start failed",
    9: "size mismatch", 10: "preparation failed",
}
E_ARGS, E_WRITE, E_PREPARE = 1, 5, 10



class StagingError(RuntimeError):
    """Staging failed. Raised on every rank with the same code, failing rank, host and cause."""

    def __init__(self, code: int, rank: int, host: str, cause: str):
        self.code, self.rank, self.host, self.cause = code, rank, host, cause
        super().__init__(f"staging failed on rank {rank} ({host}): {cause}")

    @property
    def kind(self) -> str:
        return _CODE_NAMES.get(self.code, f"error {self.code}")


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
    if (lib.AEGIS_E_ARGS, lib.AEGIS_E_WRITE, lib.AEGIS_E_PREPARE) != (E_ARGS, E_WRITE, E_PREPARE):
        raise ImportError("aegis._bcast does not match aegis/bcast.py; reinstall aegis")
    return MPI, ffi, lib


def crc32c(data: bytes, crc: int = 0, *, software: bool = False) -> int:
    """CRC32C as the staging core computes it (exposed for tests and tools)."""
    _, _, lib = _extension()
    return lib.aegis_crc32c(crc, data, len(data), 1 if software else 0)


# --------------------------------------------------------------------------- pure helpers


def fingerprint(source: Path) -> dict[str, Any]:
    """Metadata identity of a source tree (O(entries), no file contents read).

    Covers every entry's relative path, type, mode, size and mtime; symlinks by target."""
    digest = hashlib.sha256()
    total = 0
    newest = 0
    top = source.stat()
    entries: list[tuple[str, os.stat_result, Path]] = []
    if stat.S_ISDIR(top.st_mode):
        for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                path = Path(dirpath, name)
                entries.append((str(path.relative_to(source)), path.lstat(), path))
    else:
        entries.append((source.name, top, source))
    for rel, st, path in sorted(entries, key=lambda e: e[0]):
        extra = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
        digest.update(f"{rel}\0{st.st_mode:o}\0{st.st_size}\0{st.st_mtime_ns}\0{extra}\n"
                      .encode("utf-8", "surrogateescape"))
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
        newest = max(newest, st.st_mtime_ns)
    return {"size": total, "mtime_ns": newest, "entries": len(entries),
            "fingerprint": digest.hexdigest()}


def read_manifest(dest: Path) -> dict[str, Any] | None:
    try:
        with open(dest / MANIFEST_NAME, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _validate(source, dest, root, size, chunk_size, depth, writers, max_count,
              poll_sleep_us) -> str | None:
    if writers not in ("node", "all"):
        return f"writers must be 'node' or 'all', got {writers!r}"
    for name, value, low, high in (("chunk_size", chunk_size, 1, 1 << 40),
                                   ("depth", depth, 1, 1024),
                                   ("max_count", max_count, 1, MAX_MPI_COUNT),
                                   ("poll_sleep_us", poll_sleep_us, 0, 1_000_000)):
        if name == "poll_sleep_us" and value is None:
            continue  # automatic
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return f"{name} must be an integer in [{low}, {high}], got {value!r}"
    if not isinstance(root, int) or not 0 <= root < size:
        return f"root must be a rank in [0, {size - 1}], got {root!r}"
    if not str(source) or not str(dest):
        return "source and dest must be non-empty paths"
    return None


# --------------------------------------------------------------------------- side effects


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


def _agree(comm, error: tuple[int, str] | None) -> None:
    """Collective: raise the lowest failing rank's error on every rank, or return."""
    errors = comm.allgather(None if error is None else (error[0], socket.gethostname(), error[1]))
    for rank, err in enumerate(errors):
        if err is not None:
            raise StagingError(err[0], rank, err[1], err[2])


def _sibling(dest: Path, kind: str, pid: int | None = None) -> Path:
    """Hidden sibling of dest for a temporary ("tmp") or a replaced tree ("old")."""
    return dest.parent / f".{dest.name}.aegis-{kind}-{socket.gethostname()}-{pid or os.getpid()}"


def _remove_stale_siblings(dest: Path) -> None:
    """Siblings left by a stage on this host whose process no longer exists (killed mid-way)."""
    for kind in ("tmp", "old"):
        prefix = _sibling(dest, kind, 1).name[:-1]
        for path in dest.parent.glob(glob.escape(prefix) + "*"):
            pid = path.name[len(prefix):]
            if pid.isdigit() and not _pid_alive(int(pid)):
                _rmtree(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


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
    _remove_stale_siblings(dest)
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
            pct = f" ({100 * done / self._expected:.0f}%)" if self._expected else ""
            print(f"aegis stage: {done / 2**30:.2f} GiB{pct}, {rate / 1e9:.2f} GB/s, ETA {eta}",
                  file=sys.stderr, flush=True)


def stage(source, dest, comm=None, *, root: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE,
          depth: int = DEFAULT_DEPTH, writers: str = "node", verify: bool = True,
          force: bool = False, progress: bool = True, max_count: int = MAX_MPI_COUNT,
          poll_sleep_us: int | None = None, _fault: tuple | None = None
          ) -> StageResult:
    """Copy ``source`` (a directory, or one file) to ``dest`` on every node. Collective.

    - ``dest`` is a directory: a directory source's contents land in it; a file source lands
      as ``dest/<name>``. Only ``root`` reads ``source``; writers ignore it.
    - Atomic per writer: extraction goes to a hidden sibling ``.<dest>.aegis-tmp-<host>-<pid>``
      (leftovers of killed runs on this host are removed by the next stage),
      is verified (tar exit status, byte count, CRC32C unless ``verify=False``), gets the
      manifest ``dest/.aegis-manifest.json`` written last, then is renamed onto ``dest``. On
      any error the temporary is removed and ``dest`` is left as it was.
    - Cache: when every writer's manifest matches the source (path and a fingerprint of every
      entry's name, type, mode, size and mtime, computed by root from metadata only), nothing
      moves and the result has ``cached=True``. ``force=True`` always re-stages.
    - Existing ``dest``: an earlier aegis stage (has a manifest) or an empty directory is
      replaced atomically (renamed away, then removed). Anything else is refused with a
      StagingError unless ``force=True``, so a mistyped ``dest`` cannot delete user data.
    - ``writers="node"``: the lowest rank of each shared-memory node writes; ``"all"``: every
      rank writes its own ``dest`` (two writers on one host must not share a ``dest``).
    - ``depth`` buffers of ``chunk_size`` bytes are in flight per rank; ``depth=1`` is the
      serial read -> broadcast -> write loop. ``max_count`` caps elements per MPI call.
    - ``poll_sleep_us``: a rank waiting on MPI polls, then sleeps this long between polls
      (0: block inside MPI, which busy-polls in MPICH and competes with tar for cores).
      None: 50 when this node's ranks would oversubscribe its cores, else 0.
    - Errors raise ``StagingError`` (``.code``, ``.rank``, ``.host``, ``.cause``) on every rank.
    - ``progress``: root logs bytes, GB/s and ETA to stderr every few seconds.
    """
    MPI, ffi, lib = _extension()
    comm = MPI.COMM_WORLD if comm is None else comm
    rank = comm.Get_rank()
    t0 = time.monotonic()
    source_path = Path(os.path.abspath(os.fspath(source))) if str(source) else Path("")
    dest_path = Path(os.path.abspath(os.fspath(dest))) if str(dest) else Path("")

    problem = _validate(source, dest, root, comm.Get_size(), chunk_size, depth, writers,
                        max_count, poll_sleep_us)
    _agree(comm, None if problem is None else (E_ARGS, problem))

    # root: metadata identity of the source, shared with everyone
    info, error = None, None
    if rank == root:
        try:
            info = fingerprint(source_path)
            info["source"] = str(source_path)
        except OSError as exc:
            error = (E_PREPARE, f"source {source_path}: {exc.strerror or exc}")
    _agree(comm, error)
    info = comm.bcast(info, root=root)

    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    is_writer = writers == "all" or node_comm.Get_rank() == 0
    ranks_here = node_comm.Get_size()
    node_comm.Free()
    if poll_sleep_us is None:
        oversubscribed = ranks_here * _ACTIVE_PER_RANK > len(os.sched_getaffinity(0))
        poll_sleep_us = OVERSUBSCRIBED_POLL_SLEEP_US if oversubscribed else 0

    manifest = read_manifest(dest_path) if is_writer else None
    cached_here = (not is_writer) or (not force and manifest is not None
                                      and manifest.get("source") == info["source"]
                                      and manifest.get("fingerprint") == info["fingerprint"])
    host = socket.gethostname()
    roles = comm.allgather((host, rank, str(dest_path), is_writer, cached_here))
    writer_infos = [WriterInfo(h, r, d, c) for h, r, d, w, c in roles if w]
    if all(c for *_, c in roles):
        return StageResult(info["source"], str(dest_path), 0, info["size"],
                           time.monotonic() - t0, 0.0, True, manifest.get("checksum")
                           if manifest else None, writer_infos)

    tmp = _sibling(dest_path, "tmp")
    error = None
    if is_writer:
        same_host = [d for h, r, d, w, _ in roles if w and h == host]
        try:
            if same_host.count(str(dest_path)) > 1:
                raise ValueError(f"dest {dest_path} is used by several writer ranks on {host}; "
                                 "give each rank its own dest with writers='all'")
            _prepare_dest(dest_path, tmp, force)
        except (OSError, ValueError) as exc:
            error = (E_PREPARE, f"dest {dest_path}: "
                     f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}")
    try:
        _agree(comm, error)
        transfer = _transfer(MPI, ffi, lib, comm, source_path, tmp, root, chunk_size, depth,
                             is_writer, verify, max_count, poll_sleep_us, _fault,
                             progress and rank == root, info["size"])
        error = None
        if is_writer:
            try:
                manifest = {**info, "checksum": transfer["checksum"],
                            "stream_bytes": transfer["bytes"], "staged_at": time.time()}
                manifest_path = tmp / MANIFEST_NAME
                manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
                _swap_into_place(tmp, dest_path)
            except OSError as exc:  # after the transfer: a write failure, not bad input
                error = (E_WRITE, f"dest {dest_path}: {exc.strerror or exc}")
        _agree(comm, error)
    finally:
        if is_writer:
            _rmtree(tmp)  # a no-op once renamed into place

    seconds = time.monotonic() - t0
    return StageResult(info["source"], str(dest_path), transfer["bytes"], info["size"],
                       seconds, transfer["bytes"] / seconds if seconds > 0 else 0.0, False,
                       transfer["checksum"],
                       [dataclasses.replace(w, cached=False) for w in writer_infos])


def _transfer(MPI, ffi, lib, comm, source: Path, tmp: Path, root: int, chunk_size: int,
              depth: int, is_writer: bool, verify: bool, max_count: int, poll_sleep_us: int,
              fault,
              show_progress: bool, expected: int) -> dict[str, Any]:
    """One call into the C core; returns bytes and checksum or raises StagingError."""
    real = Path(os.path.realpath(source))
    src_dir, member = (str(real), ".") if real.is_dir() else (str(real.parent), real.name)
    opts = ffi.new("aegis_stage_opts *")
    opts.chunk_size, opts.depth, opts.root = chunk_size, depth, root
    opts.max_count, opts.is_writer, opts.verify = max_count, int(is_writer), int(bool(verify))
    opts.fault_rank = -1  # ffi.new zeroes the rest
    opts.poll_sleep_us = poll_sleep_us
    if fault:  # ("checksum" | "kill_writer" | "kill_reader", rank[, after_bytes])
        kind, fault_rank, *after = fault
        opts.fault_kind, opts.fault_rank = getattr(lib, "AEGIS_FAULT_" + kind.upper()), fault_rank
        opts.fault_after = after[0] if after else 0
    res = ffi.new("aegis_stage_result *")
    comm_ptr = ffi.cast("void *", MPI._addressof(comm))
    progress = (_Progress(res, expected, PROGRESS_INTERVAL_S) if show_progress
                else contextlib.nullcontext())
    with progress:
        code = lib.aegis_stage(comm_ptr, os.fsencode(src_dir), os.fsencode(member),
                               os.fsencode(str(tmp)), opts, res)
    if code != lib.AEGIS_OK:
        raise StagingError(code, res.failing_rank, ffi.string(res.host).decode(errors="replace"),
                           ffi.string(res.cause).decode(errors="replace")
                           or _CODE_NAMES.get(code, "unknown error"))
    return {"bytes": res.total_bytes,
            "checksum": f"{res.checksum:08x}" if verify else None}
