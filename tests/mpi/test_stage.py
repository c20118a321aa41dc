"""aegis.bcast.stage() under real MPI: round trips, cache, and failures ending on every rank."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from trees import MANIFEST, make_fixed_tree, make_long_names_tree, make_random_tree, tree_digest

from aegis import bcast
from aegis.bcast import StagingError, stage

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]

CHUNK = 64 << 10  # small chunks so modest files cross many chunk boundaries


def on_root_make(comm, fn):
    if comm.rank == 0:
        fn()
    comm.Barrier()


def check_round_trip(comm, src: Path, dests: list[Path]) -> None:
    """Every destination holds exactly the source: names, kinds, modes (directories with
    u+rwx added), every byte hashed."""
    expected = comm.bcast(tree_digest(src, staged=True) if comm.rank == 0 else None, root=0)
    for dest in dests:
        got = tree_digest(dest)
        if src.is_file():
            got = {k: v for k, v in got.items() if k != "."}
        assert got == expected


def expect_failure(comm, run, bound_s: float = 30.0) -> StagingError:
    """`run` must raise StagingError on every rank, the same error everywhere, in bounded time."""
    start = time.monotonic()
    with pytest.raises(StagingError) as info:
        run()
    elapsed = time.monotonic() - start
    err = info.value
    views = comm.allgather((err.code, err.rank, err.host, err.cause))
    assert all(view == views[0] for view in views), views
    assert 0 <= err.rank < comm.size and err.host, "the report must name a real rank and host"
    assert elapsed < bound_s
    return err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".aegis-tmp-" in p.name
                  or ".aegis-old-" in p.name)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_round_trip_fixed_tree(comm, shared_tmp, depth):
    src = shared_tmp / "src tree $(x)"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=5 * CHUNK + 123))
    dest = shared_tmp / f"dest {comm.rank}"
    result = stage(src, dest, comm, chunk_size=CHUNK, depth=depth, writers="all",
                   progress=False)
    comm.Barrier()
    check_round_trip(comm, src, [dest])
    assert not result.cached and result.bytes > 5 * CHUNK
    assert result.throughput > 0 and len(result.writers) == comm.size
    # nothing was evaluated by a shell anywhere
    assert not list(shared_tmp.rglob("PWNED")) and not Path("PWNED").exists()
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["checksum"] == result.checksum and manifest["source"] == str(src)
    assert leftovers(shared_tmp) == []


def test_single_file_source(comm, shared_tmp):
    src = shared_tmp / "weights ünï.safetensors"
    on_root_make(comm, lambda: src.write_bytes(random.Random(7).randbytes(3 * CHUNK + 5)))
    dest = shared_tmp / f"dest{comm.rank}"
    stage(src, dest, comm, chunk_size=CHUNK, writers="all", progress=False)
    comm.Barrier()
    assert sorted(p.name for p in dest.iterdir()) == sorted([src.name, MANIFEST])
    check_round_trip(comm, src, [dest / src.name])


def test_tiny_max_count_splits_every_chunk(comm, shared_tmp):
    """The 64-bit path: a chunk larger than max_count goes out as several MPI calls."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=3 * CHUNK + 17))
    dest = shared_tmp / f"dest{comm.rank}"
    stage(src, dest, comm, chunk_size=CHUNK, depth=3, writers="all", max_count=1000,
          progress=False)
    comm.Barrier()
    check_round_trip(comm, src, [dest])


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_random_trees(comm, shared_tmp, seed):
    rng = random.Random(seed)
    chunk = rng.choice([4096, 100_000, 1 << 20])
    depth = rng.choice([1, 2, 3, 8])
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_random_tree(src, seed))
    dest = shared_tmp / f"dest{comm.rank}"
    max_count = rng.choice([bcast.MAX_MPI_COUNT, 4000, 65536])
    stage(src, dest, comm, chunk_size=chunk, depth=depth,
          writers="all", max_count=max_count, progress=False)
    comm.Barrier()
    check_round_trip(comm, src, [dest])


def test_non_zero_root(comm, shared_tmp):
    root = comm.size - 1
    src = shared_tmp / "src"
    if comm.rank == root:
        make_random_tree(src, 99)
    comm.Barrier()
    dest = shared_tmp / f"dest{comm.rank}"
    stage(src, dest, comm, root=root, chunk_size=CHUNK, writers="all", progress=False)
    comm.Barrier()
    expected = comm.bcast(tree_digest(src, staged=True) if comm.rank == root else None,
                          root=root)
    assert tree_digest(dest) == expected


def test_writers_node_writes_exactly_one_copy(comm, shared_tmp):
    """One machine is one shared-memory node: one writer, one copy, even with many ranks."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=2 * CHUNK))
    dest = shared_tmp / "node-local"  # the same path on every rank, as on a real node
    result = stage(src, dest, comm, chunk_size=CHUNK, writers="node", progress=False)
    comm.Barrier()
    assert [w.rank for w in result.writers] == [0]
    assert sorted(p.name for p in shared_tmp.iterdir()) == ["node-local", "src"]
    check_round_trip(comm, src, [dest])


# --------------------------------------------------------------------------- cache


def test_cached_restage_and_force(comm, shared_tmp):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=CHUNK))
    dest = shared_tmp / f"dest{comm.rank}"
    first = stage(src, dest, comm, chunk_size=CHUNK, writers="all", progress=False)
    staged_at = json.loads((dest / MANIFEST).read_text())["staged_at"]
    (dest / "marker-from-first-stage").write_text("x")  # survives only if nothing re-stages

    again = stage(src, dest, comm, chunk_size=CHUNK, writers="all", progress=False)
    assert again.cached and again.bytes == 0 and again.checksum == first.checksum
    assert (dest / "marker-from-first-stage").exists()

    forced = stage(src, dest, comm, chunk_size=CHUNK, writers="all", force=True,
                   progress=False)
    assert not forced.cached and forced.bytes == first.bytes
    assert not (dest / "marker-from-first-stage").exists()
    assert json.loads((dest / MANIFEST).read_text())["staged_at"] > staged_at
    comm.Barrier()
    check_round_trip(comm, src, [dest])


def test_changed_source_restages(comm, shared_tmp):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=CHUNK))
    dest = shared_tmp / f"dest{comm.rank}"
    stage(src, dest, comm, chunk_size=CHUNK, writers="all", progress=False)
    comm.Barrier()
    on_root_make(comm, lambda: (src / "a" / "new.json").write_text("{}"))
    result = stage(src, dest, comm, chunk_size=CHUNK, writers="all", progress=False)
    assert not result.cached
    comm.Barrier()
    check_round_trip(comm, src, [dest])


@pytest.mark.parametrize("new_inode", [False, True])
def test_file_replaced_with_same_size_and_mtime_restages(comm, shared_tmp, new_inode):
    """`cp new old; touch -r ...` (same inode) or a rename over it (new inode), keeping size
    and mtime: the re-stage moves the new bytes instead of keeping the stale copy."""
    src = shared_tmp / "src"
    weights = src / "model.safetensors"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=2 * CHUNK))
    dest = shared_tmp / f"dest{comm.rank}"
    stage(src, dest, comm, chunk_size=CHUNK, writers="all", progress=False)
    comm.Barrier()

    def replace():
        st = weights.stat()
        new = bytes(b ^ 0xFF for b in weights.read_bytes())
        time.sleep(0.02)  # a later ctime even where the kernel's timestamps are coarse
        target = weights.with_name("replacement") if new_inode else weights
        target.write_bytes(new)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        if new_inode:
            os.replace(target, weights)
        assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (st.st_size,
                                                                         st.st_mtime_ns)
    on_root_make(comm, replace)
    result = stage(src, dest, comm, chunk_size=CHUNK, writers="all", progress=False)
    assert not result.cached
    comm.Barrier()
    check_round_trip(comm, src, [dest])


def test_leftovers_of_killed_runs_are_removed(comm, shared_tmp):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_random_tree(src, 8))
    dest = shared_tmp / f"dest{comm.rank}"
    host = socket.gethostname()
    dead = shared_tmp / f".{dest.name}.aegis-tmp-{host}-999999999"  # no such pid
    alive = shared_tmp / f".{dest.name}.aegis-old-{host}-{os.getpid()}"  # a running stage
    dead.mkdir()
    (dead / "partial.bin").write_bytes(b"x")
    alive.mkdir()
    stage(src, dest, comm, writers="all", progress=False)
    assert not dead.exists() and alive.exists()
    alive.rmdir()
    comm.Barrier()
    check_round_trip(comm, src, [dest])


def test_refuses_foreign_dest_unless_forced(comm, shared_tmp):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_random_tree(src, 3))
    dest = shared_tmp / f"dest{comm.rank}"
    dest.mkdir()
    (dest / "users-own-file").write_text("keep me")
    err = expect_failure(comm, lambda: stage(src, dest, comm, writers="all", progress=False))
    assert err.code == bcast.E_PREPARE and "not staged by aegis" in err.cause
    assert (dest / "users-own-file").read_text() == "keep me"
    stage(src, dest, comm, writers="all", force=True, progress=False)
    comm.Barrier()
    check_round_trip(comm, src, [dest])


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("how", ["inside", "holds", "bind mount"])
def test_dest_nested_with_source_is_refused_everywhere(comm, shared_tmp, how):
    """A dest inside the source (a re-run would nest another copy), or holding it (replacing
    it would delete the source), found by the last rank only: every rank raises the same
    code-10 error naming both paths, before anything is written. The bind mount is an alias
    realpath cannot see (needs root to mount)."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=CHUNK))
    alias = shared_tmp / "alias"
    bad = comm.size - 1
    if how == "bind mount":
        assert os.geteuid() == 0, "this test bind-mounts a directory and must run as root"
        if comm.rank == 0:
            alias.mkdir()
            subprocess.run(["mount", "--bind", str(src), str(alias)], check=True)
        comm.Barrier()
    bad_dest = {"inside": src / "a" / "staged", "holds": shared_tmp,
                "bind mount": alias / "staged"}[how]
    dest = bad_dest if comm.rank == bad else shared_tmp / f"dest{comm.rank}"
    before = comm.bcast(sorted(str(p) for p in shared_tmp.rglob("*")) if comm.rank == 0
                        else None)
    try:
        err = expect_failure(comm, lambda: stage(src, dest, comm, writers="all", force=True,
                                                 progress=False))
        assert err.code == bcast.E_PREPARE and err.rank == bad
        assert str(src) in err.cause and str(bad_dest) in err.cause, err.cause
        comm.Barrier()
        assert sorted(str(p) for p in shared_tmp.rglob("*")) == before
    finally:
        comm.Barrier()
        if how == "bind mount" and comm.rank == 0:
            subprocess.run(["umount", str(alias)], check=True)
        comm.Barrier()


def test_source_missing(comm, shared_tmp):
    dest = shared_tmp / f"dest{comm.rank}"
    err = expect_failure(comm, lambda: stage(shared_tmp / "nope", dest, comm, writers="all",
                                             progress=False))
    assert err.rank == 0 and "No such file" in err.cause
    assert not dest.exists() and leftovers(shared_tmp) == []


def test_bad_arguments_fail_everywhere(comm, shared_tmp):
    err = expect_failure(comm, lambda: stage(shared_tmp, shared_tmp / "d", comm, depth=0))
    assert err.code == bcast.E_ARGS and "depth" in err.cause
    err = expect_failure(comm, lambda: stage(shared_tmp, shared_tmp / "d", comm,
                                             writers="some"))
    assert "writers" in err.cause


def test_dest_not_writable(comm, shared_tmp):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_random_tree(src, 4))
    blocker = shared_tmp / "a-file"
    on_root_make(comm, lambda: blocker.write_text("not a directory"))
    bad = comm.size - 1
    dest = (blocker / "dest") if comm.rank == bad else shared_tmp / f"dest{comm.rank}"
    err = expect_failure(comm, lambda: stage(src, dest, comm, writers="all", progress=False))
    assert err.rank == bad and err.code == bcast.E_PREPARE
    assert not any(shared_tmp.glob("dest*")) and leftovers(shared_tmp) == []


def test_checksum_mismatch_injected(comm, shared_tmp):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=3 * CHUNK))
    bad = comm.size - 1
    dest = shared_tmp / f"dest{comm.rank}"
    err = expect_failure(comm, lambda: stage(src, dest, comm, chunk_size=CHUNK,
                                             writers="all", progress=False,
                                             _fault=("checksum", bad)))
    assert err.rank == bad and err.code == 6 and "CRC32C mismatch" in err.cause
    assert not any(shared_tmp.glob("dest*")) and leftovers(shared_tmp) == []


def test_disk_full(comm, shared_tmp):
    """A real ENOSPC: the last rank extracts into a 1 MiB tmpfs (needs root to mount)."""
    assert os.geteuid() == 0, "this test mounts a tmpfs and must run as root"
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=4 << 20))
    bad = comm.size - 1
    small = shared_tmp / f"tmpfs{comm.rank}"
    if comm.rank == bad:
        small.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                       check=True)
    try:
        dest = small / "dest"
        err = expect_failure(comm, lambda: stage(src, dest, comm, chunk_size=CHUNK,
                                                 writers="all", progress=False))
        assert err.rank == bad and err.code == 5 and "No space left" in err.cause
        if comm.rank == bad:
            assert sorted(p.name for p in small.iterdir()) == []
    finally:
        if comm.rank == bad:
            subprocess.run(["umount", str(small)], check=True)
    assert not any(shared_tmp.glob("tmpfs*/dest")) and leftovers(shared_tmp) == []


# --------------------------------------------------------------------------- progress, CRC


def test_progress_lines_on_root_only(comm, shared_tmp, monkeypatch, capfd):
    monkeypatch.setattr(bcast, "PROGRESS_INTERVAL_S", 0.02)
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=32 << 20))
    dest = shared_tmp / f"dest{comm.rank}"
    stage(src, dest, comm, chunk_size=CHUNK, depth=1, writers="all")
    err = capfd.readouterr().err
    if comm.rank == 0:
        assert "GB/s" in err and "ETA" in err
    else:
        assert "GB/s" not in err
    quiet = shared_tmp / f"quiet{comm.rank}"
    stage(src, quiet, comm, chunk_size=CHUNK, depth=1, writers="all", progress=False)
    assert "GB/s" not in capfd.readouterr().err


def test_crc32c_matches_reference():
    assert bcast.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert bcast.crc32c(b"123456789", software=True) == 0xE3069283
    data = random.Random(3).randbytes(100_003)
    for cut in (0, 1, 7, 8, 9, 4095, 100_003):
        whole = bcast.crc32c(data[:cut])
        assert bcast.crc32c(data[:cut], software=True) == whole
        # streaming in two pieces gives the same value
        assert bcast.crc32c(data[cut // 2:cut], bcast.crc32c(data[:cut // 2])) == whole


def test_mpi_family_tells_mpich_from_open_mpi():
    """The mismatch check behind the ImportError of aegis.bcast._extension()."""
    family = bcast._mpi_family
    assert family("MPICH 5.0.2") == family("MPICH Version:      4.2.0\nMPICH ABI: 16") == "MPICH"
    assert family("MPI VERSION    : CRAY MPICH version 8.1.28") == "MPICH"
    assert family("Intel(R) MPI Library 2021.11 for Linux") == "MPICH"
    assert family("Open MPI v5.0.3, package: ...") == "Open MPI" != family("MPICH 5.0.2")


def test_crc32c_combine_matches_whole():
    data = random.Random(4).randbytes(50_001)
    for cut in (0, 1, 511, 512, 4097, 50_001):
        a, b = data[:cut], data[cut:]
        assert bcast.crc32c_combine(bcast.crc32c(a), bcast.crc32c(b), len(b)) == \
            bcast.crc32c(data)


# --------------------------------------------------------------------------- the stream


def test_long_names_and_read_only_dirs(comm, shared_tmp):
    """GNU long-name and long-link records, a path over 255 bytes, 0555 directories (the
    staged tree gets u+rwx on directories, so its owner can write the manifest and remove it)."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_long_names_tree(src))
    dest = shared_tmp / f"dest{comm.rank}"
    stage(src, dest, comm, chunk_size=4096, depth=3, writers="all", progress=False)
    comm.Barrier()
    check_round_trip(comm, src, [dest])
    assert oct((dest / "read-only").stat().st_mode & 0o777) == oct(0o755)
    shutil.rmtree(dest)  # removable without chmod


@pytest.mark.parametrize("readers", [1, 2, 4])
def test_many_readers_round_trip(comm, shared_tmp, readers):
    """readers=k: chunk k comes from reader k % k'; more readers than ranks is refused."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=9 * CHUNK + 77))
    dest = shared_tmp / f"dest{comm.rank}"
    run = lambda: stage(src, dest, comm, chunk_size=CHUNK, depth=3, writers="all",  # noqa: E731
                        readers=readers, progress=False)
    if readers > comm.size:
        err = expect_failure(comm, run)
        assert err.code == bcast.E_ARGS and "readers" in err.cause
        return
    result = run()
    assert len(result.readers) == readers and result.readers[0] == 0
    comm.Barrier()
    check_round_trip(comm, src, [dest])


@pytest.mark.parametrize("writers", ["all", "node"])
@pytest.mark.parametrize("readers", [1, 2])
@pytest.mark.parametrize("share_ring", [True, False])
def test_rings_round_trip(comm, shared_tmp, share_ring, readers, writers):
    """The ranks of a host share one ring per reader there (share_ring) or each have their
    own: every writer gets the exact tree whether its ring reads the chunk, receives it over
    MPI, or only holds it for its writers (with readers=2 and writers="node", the second
    reader's ring has no writer and relays nothing)."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=13 * CHUNK + 5))
    dest = shared_tmp / f"dest{comm.rank}"
    result = stage(src, dest, comm, chunk_size=CHUNK, depth=2, writers=writers,
                   readers=readers, share_ring=share_ring, progress=False)
    writer_ranks = [w.rank for w in result.writers]
    assert writer_ranks == (list(range(comm.size)) if writers == "all" else [0])
    assert dest.exists() == (comm.rank in writer_ranks)
    comm.Barrier()
    check_round_trip(comm, src, [dest] if comm.rank in writer_ranks else [])
    sums = comm.allgather(result.checksum)
    assert len(set(sums)) == 1 and sums[0] == f"{bcast.crc32c(capture_stream(comm, src, shared_tmp)):08x}"


def capture_stream(comm, src: Path, tmp: Path) -> bytes:
    """The raw tar stream of src as stage() sends it (captured by rank 0's writer)."""
    cap = tmp / "stream.tar"
    stage(src, tmp / f"cap{comm.rank}", comm, chunk_size=CHUNK, writers="all", progress=False,
          _capture=str(cap) if comm.rank == 0 else None)
    comm.Barrier()
    return cap.read_bytes()


def test_ring_too_big_for_dev_shm_fails_cleanly(comm, shared_tmp):
    """A shared ring that /dev/shm cannot hold is refused up front (reserved, not faulted in
    later as a SIGBUS): the same one-line error on every rank, nothing written, no ring left."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=CHUNK))
    dest = shared_tmp / f"dest{comm.rank}"
    err = expect_failure(comm, lambda: stage(src, dest, comm, chunk_size=1 << 40, depth=1,
                                             writers="all", progress=False))
    assert err.code == bcast.E_NOMEM and "/dev/shm" in err.cause and "share_ring" in err.cause
    assert not dest.exists() and leftovers(shared_tmp) == []


def test_ring_of_a_killed_leader_is_removed(comm, shared_tmp):
    """A leader SIGKILLed between creating its ring's name and unlinking it leaves
    /dev/shm/aegis-ring-<pid>-*: the next stage on that host removes it, and keeps a live one."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    names = [bcast.SHM_DIR / f"aegis-ring-{dead.pid}-1{comm.rank}",
             bcast.SHM_DIR / f"aegis-ring-{os.getpid()}-0{comm.rank}"]
    for path in names:
        path.write_bytes(b"x")
    comm.Barrier()
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=CHUNK))
    stage(src, shared_tmp / f"dest{comm.rank}", comm, chunk_size=CHUNK, writers="all",
          progress=False)
    comm.Barrier()
    assert not names[0].exists() and names[1].exists()
    names[1].unlink()


def test_file_of_8_gib_and_more(comm, shared_tmp):
    """Past 2^31, 2^32 and 2^33 bytes: 64-bit offsets all the way, and the size in the file's
    tar header in GNU base-256 (octal stops at 8 GiB - 1), which GNU tar reads: it lists the
    file and finds the next member after it. The source is sparse and the capture keeps
    zeros as holes, so only the one writer's copy costs disk."""
    src, size = shared_tmp / "src", (8 << 30) + 3
    marks = {0: b"head", (1 << 31) - 2: b"2^31", (1 << 32) + 1: b"2^32", size - 3: b"end"}

    def make():
        src.mkdir()
        with open(src / "huge.bin", "wb") as fh:
            for at, mark in marks.items():
                fh.seek(at)
                fh.write(mark)
        (src / "next.txt").write_text("after the huge one")
    on_root_make(comm, make)
    cap, dest = shared_tmp / "stream.tar", shared_tmp / "dest"
    result = stage(src, dest, comm, writers="node", chunk_size=64 << 20, progress=False,
                   _capture=str(cap) if comm.rank == 0 else None)
    assert result.source_bytes >= size
    if comm.rank == 0:
        with open(dest / "huge.bin", "rb") as fh:
            assert os.fstat(fh.fileno()).st_size == size
            for at, mark in marks.items():
                fh.seek(at)
                assert fh.read(len(mark)) == mark
            fh.seek(3 << 30)
            assert fh.read(1 << 20) == bytes(1 << 20)
        assert (dest / "next.txt").read_text() == "after the huge one"
        listing = subprocess.run(["tar", "-tvf", str(cap)], capture_output=True, text=True,
                                 check=True).stdout
        assert str(size) in listing and "./next.txt" in listing
        out = subprocess.run(["tar", "-xOf", str(cap), "./next.txt"], capture_output=True,
                             check=True).stdout
        assert out == b"after the huge one"
    comm.Barrier()


class _Leaves(BaseException):
    """Not an Exception: like KeyboardInterrupt, it skips stage()'s own error agreement."""


def test_a_rank_that_leaves_alone_cannot_hang_the_others(comm, shared_tmp, monkeypatch):
    """The last rank stops right after its transfer (an interrupt, a peer that gave up alone):
    the others, whose trees are complete, end with code 9 within twice the stall timeout plus
    5 s instead of waiting forever; then a new stage() on the same ranks works (private
    communicators: it cannot meet what the abandoned one left pending)."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=3 * CHUNK))
    leaver = comm.size - 1
    if comm.rank == leaver:
        def leave(*args):
            raise _Leaves()
        monkeypatch.setattr(bcast, "_swap_into_place", leave)
    dest = shared_tmp / f"dest{comm.rank}"
    run = lambda: stage(src, dest, comm, chunk_size=CHUNK, writers="all",  # noqa: E731
                        stall_timeout=1, progress=False)
    start = time.monotonic()
    if comm.rank == leaver:
        with pytest.raises(_Leaves):
            run()
    else:
        with pytest.raises(StagingError) as info:
            run()
        assert info.value.code == bcast.E_STALL and "no answer" in info.value.cause
        assert time.monotonic() - start < 30
        assert (dest / MANIFEST).exists()  # its own copy was complete and stays usable
    monkeypatch.undo()
    comm.Barrier()
    again = stage(src, shared_tmp / f"again{comm.rank}", comm, chunk_size=CHUNK,
                  writers="all", progress=False)
    assert not again.cached
    check_round_trip(comm, src, [shared_tmp / f"again{comm.rank}"])


def test_late_checksum_mismatch(comm, shared_tmp):
    """The checksum fault fires at its offset (never in a chunk before it): a mismatch in a
    late chunk still ends every rank, with nothing left behind."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=12 * CHUNK))
    dest = shared_tmp / f"dest{comm.rank}"
    err = expect_failure(comm, lambda: stage(src, dest, comm, chunk_size=CHUNK, writers="all",
                                             progress=False,
                                             _fault=("checksum", comm.size - 1, 9 * CHUNK)))
    # helpers drain several chunks at once: the first mismatch noticed is chunk 9 or later
    chunk = re.search(r"mismatch in chunk (\d+)", err.cause)
    assert err.code == bcast.E_CHECKSUM and chunk and int(chunk[1]) >= 9, err.cause
    assert not dest.exists() and leftovers(shared_tmp) == []


def test_captured_stream_extracts_identically_with_gnu_tar(comm, shared_tmp):
    """The wire is a tar stream: GNU tar (and Python's tarfile) extract the captured bytes to
    the same tree stage() wrote, and its CRC32C is the one stage() reports."""
    src = shared_tmp / "src"

    def make():
        make_fixed_tree(src / "fixed", big_bytes=3 * CHUNK + 1)
        (src / "fixed").chmod(0o755)
        make_long_names_tree(src / "long")
    on_root_make(comm, make)
    dest = shared_tmp / f"dest{comm.rank}"
    capture = shared_tmp / f"stream{comm.rank}.tar"
    result = stage(src, dest, comm, chunk_size=CHUNK, writers="all", progress=False,
                   _capture=str(capture))
    comm.Barrier()
    data = capture.read_bytes()
    assert len(data) == result.bytes and len(data) % 10240 == 0
    assert f"{bcast.crc32c(data):08x}" == result.checksum
    out = shared_tmp / f"gnu{comm.rank}"
    out.mkdir()
    subprocess.run(["tar", "-x", "-p", "-f", str(capture), "-C", str(out)], check=True)
    expected = tree_digest(src)
    assert tree_digest(out) == expected
    assert tree_digest(dest) == tree_digest(src, staged=True)
    with tarfile.open(capture) as tar:  # a second, independent reader of the format
        names = tar.getnames()
    assert f"./long/{'n' * 120}.bin" in names and len(names) == len(expected)


def test_file_source_is_cached_and_restaged(comm, shared_tmp):
    """A single file (a packed environment, an image) stages like a tree: manifest, cache."""
    src = shared_tmp / "env.tar.gz"
    on_root_make(comm, lambda: src.write_bytes(random.Random(2).randbytes(2 * CHUNK + 9)))
    dest = shared_tmp / f"dest{comm.rank}"
    first = stage(src, dest, comm, chunk_size=CHUNK, writers="all", progress=False)
    again = stage(src, dest, comm, chunk_size=CHUNK, writers="all", progress=False)
    assert not first.cached and again.cached and again.checksum == first.checksum
    assert (dest / "env.tar.gz").read_bytes() == src.read_bytes()
    link = shared_tmp / "current.sif"  # a link lands under its own name, with the content
    on_root_make(comm, lambda: os.symlink(src.name, link))
    stage(link, shared_tmp / f"linked{comm.rank}", comm, writers="all", progress=False)
    assert (shared_tmp / f"linked{comm.rank}" / "current.sif").read_bytes() == src.read_bytes()
    comm.Barrier()  # everyone has compared before root changes the source
    on_root_make(comm, lambda: src.write_bytes(b"changed"))
    assert not stage(src, dest, comm, writers="all", progress=False).cached
    assert (dest / "env.tar.gz").read_bytes() == b"changed"


def test_needs_no_tar_and_leaves_no_child(comm, shared_tmp, monkeypatch):
    """No subprocess at all: works with an empty PATH and leaves this process childless."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_random_tree(src, 5))
    monkeypatch.setenv("PATH", str(shared_tmp / "no-bin"))
    dest = shared_tmp / f"dest{comm.rank}"
    stage(src, dest, comm, writers="all", progress=False)
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)
    comm.Barrier()
    check_round_trip(comm, src, [dest])


def test_read_only_source_as_non_root_user(comm, shared_tmp):
    """A 0555 source tree staged by an ordinary user (root ignores permissions, so this runs a
    one-rank stage as 'nobody'): the staged tree is writable and removable by its owner."""
    if comm.rank == 0:
        src = make_long_names_tree(shared_tmp / "src")
        out = shared_tmp / "nobody"
        out.mkdir()
        shutil.chown(out, "nobody", "nogroup")
        shared_tmp.chmod(0o755)
        script = (
            "import shutil, sys\n"
            "from mpi4py import MPI\n"
            "from aegis.bcast import stage\n"
            f"r = stage({str(src)!r}, {str(out / 'model')!r}, MPI.COMM_SELF, progress=False)\n"
            f"stage({str(src)!r}, {str(out / 'model')!r}, MPI.COMM_SELF, progress=False,"
            " force=True)\n"
            f"open({str(out / 'model' / 'read-only' / 'new.txt')!r}, 'w').write('x')\n"
            f"shutil.rmtree({str(out / 'model')!r})\n"
            "print('ok', r.bytes)\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "HYDRA"))}
        run = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                              sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]
        assert sorted(p.name for p in out.iterdir()) == []
        for d in [p for p in src.rglob("*") if p.is_dir()] + [src]:
            d.chmod(0o755)
    comm.Barrier()


# --------------------------------------------------------------------------- ranks that disagree


@pytest.mark.parametrize("option,values", [
    ("chunk_size", (CHUNK, 2 * CHUNK)), ("depth", (2, 3)), ("max_count", (1 << 20, 4096)),
    ("verify", (True, False)), ("writers", ("all", "node")), ("readers", (1, 2)),
    ("root", (0, 1)), ("stall_timeout", (60, 61)), ("share_ring", (True, False))])
def test_disagreeing_options_fail_everywhere(comm, shared_tmp, option, values):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_random_tree(src, 6))
    odd = comm.size - 1
    kwargs = {"writers": "all", "chunk_size": CHUNK, option: values[comm.rank == odd]}
    err = expect_failure(comm, lambda: stage(src, shared_tmp / f"dest{comm.rank}", comm,
                                             progress=False, **kwargs))
    assert err.code == bcast.E_ARGS and err.rank == odd and f"different {option}" in err.cause
    assert not any(shared_tmp.glob("dest*")) and leftovers(shared_tmp) == []


def test_core_checks_options_itself(comm, shared_tmp, monkeypatch):
    """The C core does not rely on the Python check: with it disabled, a different
    chunk_size on one rank still ends every rank with the same error (once, no heap damage)."""
    monkeypatch.setattr(bcast, "_check_same_options", lambda *args: None)
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=4 * CHUNK))
    chunk = 2 * CHUNK if comm.rank == comm.size - 1 else CHUNK
    err = expect_failure(comm, lambda: stage(src, shared_tmp / f"dest{comm.rank}", comm,
                                             chunk_size=chunk, writers="all", progress=False))
    assert err.code == bcast.E_ARGS and "different chunk_size" in err.cause


def _index(*entries) -> bytes:
    out = [b"AEGIDX01", struct.pack("<Q", len(entries))]
    for kind, path, size, link in entries:
        out += [struct.pack("<B3xIqQIIII", ord(kind), 0o644, 0, size, 0, 0, len(path),
                            len(link)), path, link]
    return b"".join(out)


@pytest.mark.parametrize("index,what", [
    (_index(("5", b".", 0, b""), ("0", b"../escape", 1, b"")), "unsafe path"),
    (_index(("5", b".", 0, b""), ("0", b"/etc/passwd", 1, b"")), "unsafe path"),
    (_index(("5", b".", 0, b""), ("0", b"a/./b", 1, b"")), "unsafe path"),
    (_index(("5", b".", 0, b""), ("0", b"b", 1, b""), ("0", b"a", 1, b"")), "out of order"),
    (_index(("5", b".", 0, b""), ("0", b"a", 1, b""), ("0", b"a", 1, b"")), "out of order"),
    (_index(("5", b".", 0, b""), ("0", b"big", 1 << 60, b"")), "bad size"),
    (_index(("5", b".", 0, b""), ("2", b"l", 0, b"")), "link target"),
    (_index(("5", b".", 0, b""), ("7", b"dev", 0, b"")), "unknown type"),
    (_index(("5", b".", 0, b""), ("0", b"nul\0x", 1, b"")), "NUL"),
    (_index(("5", b".", 0, b""), ("0", b"abc", 1, b""))[:-1], "truncated"),
    (_index(("5", b".", 0, b"")) + b"x", "trailing"),
    (b"AEGIDX01" + struct.pack("<Q", 1 << 60), "cannot fit"),
    (b"NOTANIDX" + bytes(40), "bad header"),
])
def test_malformed_index_is_refused_everywhere(comm, shared_tmp, index, what):
    """Whatever the root sends, writers check it before creating anything."""
    MPI, ffi, lib = bcast._extension()
    tmp = shared_tmp / f"tmp{comm.rank}"
    tmp.mkdir()
    params = dict(root=0, chunk_size=CHUNK, depth=2, readers=[0], is_writer=True, verify=True,
                  max_count=bcast.MAX_MPI_COUNT, stall_timeout=10, io_threads=2, fault=None,
                  capture=None, share_ring=True)
    err = expect_failure(comm, lambda: bcast._transfer(
        MPI, ffi, lib, comm, str(shared_tmp), index if comm.rank == 0 else None, tmp, params,
        False, 0))
    assert err.code == lib.AEGIS_E_INDEX and what in err.cause and err.rank == 0
    assert list(tmp.iterdir()) == [] and not (shared_tmp / "escape").exists()


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("depth", [1, 4])
def test_write_error_mid_stream(comm, shared_tmp, depth):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=40 * CHUNK))
    bad = comm.size - 1
    dest = shared_tmp / f"dest{comm.rank}"
    err = expect_failure(comm, lambda: stage(
        src, dest, comm, chunk_size=CHUNK, depth=depth, writers="all", progress=False,
        _fault=("write_error", bad, 10 * CHUNK)))
    assert err.rank == bad and err.code == bcast.E_WRITE and "Input/output error" in err.cause
    assert not any(shared_tmp.glob("dest*")) and leftovers(shared_tmp) == []


@pytest.mark.parametrize("readers", [1, 2])
def test_read_error_on_any_reader(comm, shared_tmp, readers):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=40 * CHUNK))
    reader = readers - 1  # with readers=2 the failing reader is rank 1, not the root
    dest = shared_tmp / f"dest{comm.rank}"
    err = expect_failure(comm, lambda: stage(
        src, dest, comm, chunk_size=CHUNK, writers="all", readers=readers, progress=False,
        _fault=("read_error", reader, 10 * CHUNK)))
    assert err.rank == reader and err.code == bcast.E_SOURCE and "Input/output" in err.cause
    assert not any(shared_tmp.glob("dest*")) and leftovers(shared_tmp) == []


def test_source_changed_while_staging(comm, shared_tmp, monkeypatch):
    """A file that shrinks between the scan and the read is an error, not a short copy."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=8 * CHUNK))
    real_scan = bcast.scan

    def scan_then_truncate(path, *args):
        result = real_scan(path, *args)
        os.truncate(src / "model.safetensors", CHUNK)
        return result
    monkeypatch.setattr(bcast, "scan", scan_then_truncate)
    err = expect_failure(comm, lambda: stage(src, shared_tmp / f"dest{comm.rank}", comm,
                                             chunk_size=CHUNK, writers="all", progress=False))
    assert err.code == bcast.E_SOURCE and "model.safetensors shrank" in err.cause


@pytest.mark.parametrize("kind,who", [("stall_writer", "last"), ("stall_reader", "root"),
                                      ("stall_reader", "second reader")])
def test_stalled_helper_ends_every_rank(comm, shared_tmp, kind, who):
    """A reader or writer thread hung on I/O (a stopped helper, a hung file system) ends the
    stage on every rank after stall_timeout, naming that rank."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=20 * CHUNK))
    bad = {"last": comm.size - 1, "root": 0, "second reader": 1}[who]
    dest = shared_tmp / f"dest{comm.rank}"
    start = time.monotonic()
    err = expect_failure(comm, lambda: stage(
        src, dest, comm, chunk_size=CHUNK, writers="all", progress=False, stall_timeout=1.0,
        readers=2, _fault=(kind, bad, 5 * CHUNK)), bound_s=20)
    assert err.code == bcast.E_STALL and err.rank == bad and "no progress" in err.cause
    assert time.monotonic() - start >= 1.0
    assert not any(shared_tmp.glob("dest*")) and leftovers(shared_tmp) == []


def test_python_exception_on_one_rank_reaches_all(comm, shared_tmp):
    """A corrupt manifest that makes json raise RecursionError on one writer ends the stage
    on every rank with that cause instead of leaving the others waiting."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_random_tree(src, 7))
    dest = shared_tmp / f"dest{comm.rank}"
    stage(src, dest, comm, writers="all", progress=False)
    bad = comm.size - 1
    if comm.rank == bad:
        (dest / MANIFEST).write_text("[" * 200_000)
    err = expect_failure(comm, lambda: stage(src, dest, comm, writers="all", progress=False))
    assert err.rank == bad and err.code == bcast.E_PREPARE and "RecursionError" in err.cause


def test_leftovers_removed_when_cached(comm, shared_tmp):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_random_tree(src, 9))
    dest = shared_tmp / f"dest{comm.rank}"
    stage(src, dest, comm, writers="all", progress=False)
    dead = shared_tmp / f".{dest.name}.aegis-tmp-{socket.gethostname()}-999999998"
    dead.mkdir()
    (dead / "ro").mkdir(mode=0o555)
    assert stage(src, dest, comm, writers="all", progress=False).cached
    assert not dead.exists()


# --------------------------------------------------------------------------- signals

SLOW = ("slow", 0, 0)  # the root's helpers take 20 ms more per piece: a transfer of seconds
SLOW_CHUNKS = 200  # with io_threads=2: over 4 s to fill and drain on the root
DEFAULT_HANDLERS = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}


class Flag:
    """A caller's own handler, as the launcher's stop flag: records the signals it gets."""

    def __init__(self):
        self.got: list[int] = []

    def __call__(self, signum, _frame):
        self.got.append(signum)


@contextlib.contextmanager
def caller_handlers(kind: str):
    """The SIGINT/SIGTERM handlers stage()'s caller has: pytest's defaults, or a Flag."""
    flag = Flag()
    assert {s: signal.getsignal(s) for s in DEFAULT_HANDLERS} == DEFAULT_HANDLERS
    previous = {s: signal.signal(s, flag) for s in DEFAULT_HANDLERS} if kind == "flag" else {}
    try:
        yield flag
        for sig in DEFAULT_HANDLERS:  # stage() gave the caller's handlers back
            assert signal.getsignal(sig) is (flag if kind == "flag" else DEFAULT_HANDLERS[sig])
        assert signal.set_wakeup_fd(-1) == -1  # and left no wakeup fd behind
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def signal_later(delay: float, *signums: int) -> threading.Timer:
    """Sends this process the signals after delay seconds; .sent: when."""
    def send():
        for signum in signums:
            timer.sent.append(time.monotonic())
            os.kill(os.getpid(), signum)
    timer = threading.Timer(delay, send)
    timer.sent = []
    timer.start()
    return timer


def nothing_left(comm, shared_tmp: Path) -> None:
    """No dest, no temporary sibling, no shared ring of any rank of this job."""
    comm.Barrier()
    pids = set(comm.allgather(os.getpid()))
    assert not any(shared_tmp.glob("dest*")) and leftovers(shared_tmp) == []
    rings = [p.name for p in bcast.SHM_DIR.glob("aegis-ring-*")
             if p.name.split("-")[2].isdigit() and int(p.name.split("-")[2]) in pids]
    assert rings == []


@pytest.mark.parametrize("caller", ["default", "flag"])
@pytest.mark.parametrize("sig,who", [(signal.SIGTERM, "last"), (signal.SIGTERM, "root"),
                                     (signal.SIGINT, "last"), (signal.SIGINT, "root"),
                                     (signal.SIGTERM, "second reader")])
def test_signal_mid_transfer_cancels_every_rank(comm, shared_tmp, sig, who, caller):
    """SIGTERM (scancel) or SIGINT (Ctrl-C) to one rank in the middle of a transfer: that
    rank's C core reads the signal from Python's wakeup fd, and every rank raises the same
    code-11 error within seconds; nothing is left (dest, temporary, ring). The caller's
    handlers are back afterwards, and a caller's own handler (the launcher's stop flag) has
    heard the signal; with the defaults, no KeyboardInterrupt and no exit."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=SLOW_CHUNKS * CHUNK))
    bad = {"root": 0, "last": comm.size - 1, "second reader": 1}[who]
    readers = 2 if who == "second reader" else 1
    dest = shared_tmp / f"dest{comm.rank}"
    with caller_handlers(caller) as flag:
        timer = signal_later(0.5, sig) if comm.rank == bad else None
        err = expect_failure(comm, lambda: stage(src, dest, comm, chunk_size=CHUNK,
                                                 writers="all", readers=readers, io_threads=2,
                                                 progress=False, _fault=SLOW), bound_s=10)
        ended = time.monotonic()
        if timer:
            timer.join()
    assert err.code == bcast.E_CANCELLED and err.rank == bad and err.signum == sig
    assert f"cancelled by {signal.Signals(sig).name}" in err.cause
    sent = comm.bcast(timer.sent[0] if timer else None, root=bad)
    assert ended - sent < 5, f"rank {comm.rank} ended {ended - sent:.1f} s after the signal"
    assert flag.got == ([sig] if caller == "flag" and comm.rank == bad else [])
    nothing_left(comm, shared_tmp)


def test_signal_on_every_rank_cancels_once(comm, shared_tmp):
    """scancel signals every task, at about the same time: all ranks report the first one.
    A rank whose own signal comes after its stage already ended hands it to its caller's
    handler (here a flag, as the launcher's; SIG_DFL would end the process, as it should)."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=SLOW_CHUNKS * CHUNK))
    dest = shared_tmp / f"dest{comm.rank}"
    with caller_handlers("flag") as flag:
        timer = signal_later(0.5 + 0.05 * comm.rank, signal.SIGTERM)
        err = expect_failure(comm, lambda: stage(src, dest, comm, chunk_size=CHUNK,
                                                 writers="all", io_threads=2, progress=False,
                                                 _fault=SLOW), bound_s=10)
        timer.join()
    assert err.code == bcast.E_CANCELLED and err.rank == 0 and err.signum == signal.SIGTERM
    assert flag.got == [signal.SIGTERM]
    nothing_left(comm, shared_tmp)


@pytest.mark.parametrize("when", ["root's scan", "a writer's dest check"])
def test_signal_before_the_transfer_cancels_every_rank(comm, shared_tmp, monkeypatch, when):
    """A signal while a rank runs stage()'s Python steps (the root scanning the source, a
    writer looking at its dest) is seen at the next agreement: the scan stops early, the C
    core is never entered, nothing is written."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_random_tree(src, 11))
    bad = 0 if when == "root's scan" else comm.size - 1
    stopped, entered = [], []
    if comm.rank == bad and when == "root's scan":
        real_scan = bcast.scan

        def signalled_scan(path, should_stop=None):
            os.kill(os.getpid(), signal.SIGTERM)
            try:
                return real_scan(path, should_stop)
            except InterruptedError:
                stopped.append(True)
                raise
        monkeypatch.setattr(bcast, "scan", signalled_scan)
    elif comm.rank == bad:
        real_remove = bcast._remove_stale_siblings

        def signalled_check(dest):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_remove(dest)
        monkeypatch.setattr(bcast, "_remove_stale_siblings", signalled_check)
    real_transfer = bcast._transfer
    monkeypatch.setattr(bcast, "_transfer", lambda *a: entered.append(1) or real_transfer(*a))
    with caller_handlers("flag") as flag:
        err = expect_failure(comm, lambda: stage(src, shared_tmp / f"dest{comm.rank}", comm,
                                                 writers="all", progress=False))
    assert err.code == bcast.E_CANCELLED and err.rank == bad and "SIGTERM" in err.cause
    assert entered == [] and flag.got == ([signal.SIGTERM] if comm.rank == bad else [])
    assert stopped == ([True] if comm.rank == bad and when == "root's scan" else [])
    nothing_left(comm, shared_tmp)


def test_signal_just_before_the_core_cancels_inside_it(comm, shared_tmp, monkeypatch):
    """A signal right before the C call: its number waits in the wakeup pipe, and the core
    cancels at its first poll, in its setup (before any chunk moves), on every rank."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=3 * CHUNK))
    bad = comm.size - 1
    seen = []
    real_transfer = bcast._transfer

    def signal_then_transfer(MPI, ffi, lib, c, src_dir, index, tmp, params, *rest):
        if comm.rank == bad:
            os.kill(os.getpid(), signal.SIGTERM)
        seen.append(params["cancel_fd"] >= 0)
        return real_transfer(MPI, ffi, lib, c, src_dir, index, tmp, params, *rest)
    monkeypatch.setattr(bcast, "_transfer", signal_then_transfer)
    with caller_handlers("default"):
        err = expect_failure(comm, lambda: stage(src, shared_tmp / f"dest{comm.rank}", comm,
                                                 chunk_size=CHUNK, writers="all",
                                                 progress=False))
    assert err.code == bcast.E_CANCELLED and err.rank == bad and seen == [True]
    nothing_left(comm, shared_tmp)


def test_signal_while_the_last_chunks_are_written(comm, shared_tmp):
    """Every chunk has crossed; one writer is still placing the last one (here it hangs) and
    gets SIGTERM: it ends its wait at once and every rank is cancelled, not stalled."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=6 * CHUNK))
    probe = stage(src, shared_tmp / f"probe{comm.rank}", comm, chunk_size=CHUNK,
                  writers="all", progress=False)
    comm.Barrier()
    shutil.rmtree(shared_tmp / f"probe{comm.rank}")
    bad = comm.size - 1
    with caller_handlers("default"):
        timer = signal_later(1.0, signal.SIGTERM) if comm.rank == bad else None
        err = expect_failure(comm, lambda: stage(
            src, shared_tmp / f"dest{comm.rank}", comm, chunk_size=CHUNK, writers="all",
            progress=False, stall_timeout=60,
            _fault=("stall_writer", bad, probe.bytes - CHUNK)), bound_s=10)
        if timer:
            timer.join()
    assert err.code == bcast.E_CANCELLED and err.rank == bad
    nothing_left(comm, shared_tmp)


def test_signal_after_the_transfer_before_the_rename_cancels(comm, shared_tmp, monkeypatch):
    """The C core returned, the rename has not begun: the signal still cancels everywhere
    and the complete temporary is removed. A rank that got no signal may have renamed its
    complete tree into place before it learned of the cancel: it keeps it (a later stage
    finds it cached), as after any failure in the final step."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=3 * CHUNK))
    bad = comm.size - 1
    if comm.rank == bad:
        real_transfer = bcast._transfer

        def then_signal(*args):
            result = real_transfer(*args)
            os.kill(os.getpid(), signal.SIGTERM)
            return result
        monkeypatch.setattr(bcast, "_transfer", then_signal)
    with caller_handlers("flag") as flag:
        err = expect_failure(comm, lambda: stage(src, shared_tmp / f"dest{comm.rank}", comm,
                                                 chunk_size=CHUNK, writers="all",
                                                 progress=False))
    assert err.code == bcast.E_CANCELLED and err.rank == bad
    assert flag.got == ([signal.SIGTERM] if comm.rank == bad else [])
    dest = shared_tmp / f"dest{comm.rank}"
    if dest.exists():  # complete, or absent
        assert comm.rank != bad and tree_digest(dest) == tree_digest(src, staged=True)
        shutil.rmtree(dest)
    nothing_left(comm, shared_tmp)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_the_rename_lets_the_stage_complete(comm, shared_tmp, monkeypatch, sig):
    """Once the rename began the stage completes on every rank; the caller hears the signal
    when stage() returns: its handler is called, or (SIGINT's default) KeyboardInterrupt is
    raised then. SIGTERM's default (exit) is the same path and would end this test process:
    the CLI test covers it (tests/unit/test_stage_cancel.py)."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=3 * CHUNK))
    bad = comm.size - 1
    if comm.rank == bad:
        real_swap = bcast._swap_into_place

        def signal_then_swap(tmp, dest):
            os.kill(os.getpid(), sig)
            real_swap(tmp, dest)
        monkeypatch.setattr(bcast, "_swap_into_place", signal_then_swap)
    dest = shared_tmp / f"dest{comm.rank}"
    run = lambda: stage(src, dest, comm, chunk_size=CHUNK, writers="all",  # noqa: E731
                        progress=False)
    caller = "flag" if sig == signal.SIGTERM else "default"
    with caller_handlers(caller) as flag:
        if comm.rank == bad and caller == "default":
            with pytest.raises(KeyboardInterrupt):
                run()
        else:
            assert not run().cached
    assert flag.got == ([sig] if comm.rank == bad and caller == "flag" else [])
    comm.Barrier()
    check_round_trip(comm, src, [dest])
    assert leftovers(shared_tmp) == []


def test_repeated_signals_and_one_during_cleanup(comm, shared_tmp, monkeypatch):
    """SIGTERM then SIGINT at once on one rank mid-transfer, then SIGTERM on every rank while
    it removes its temporary: the stage is cancelled once (by one of the two), the cleanup
    completes, no signal kills the process or raises KeyboardInterrupt, and the caller's
    handler hears each signal once."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=SLOW_CHUNKS * CHUNK))
    bad = comm.size - 1
    real_rmtree = bcast._rmtree

    def signal_then_remove(path):
        if ".aegis-tmp-" in path.name and path.exists():
            os.kill(os.getpid(), signal.SIGTERM)
        real_rmtree(path)
    monkeypatch.setattr(bcast, "_rmtree", signal_then_remove)
    with caller_handlers("default"):
        timer = signal_later(0.5, signal.SIGTERM, signal.SIGINT) if comm.rank == bad else None
        err = expect_failure(comm, lambda: stage(src, shared_tmp / f"dest{comm.rank}", comm,
                                                 chunk_size=CHUNK, writers="all", io_threads=2,
                                                 progress=False, _fault=SLOW), bound_s=10)
        if timer:
            timer.join()
    # two signals pending at once are taken lowest number first: SIGINT may come first
    assert err.code == bcast.E_CANCELLED and err.rank == bad
    assert err.signum in (signal.SIGTERM, signal.SIGINT)
    nothing_left(comm, shared_tmp)
    with caller_handlers("flag") as flag:
        timer = signal_later(0.5, signal.SIGTERM, signal.SIGINT) if comm.rank == bad else None
        expect_failure(comm, lambda: stage(src, shared_tmp / f"dest{comm.rank}", comm,
                                           chunk_size=CHUNK, writers="all", io_threads=2,
                                           progress=False, _fault=SLOW), bound_s=10)
        if timer:
            timer.join()
    assert sorted(flag.got) == ([signal.SIGINT, signal.SIGTERM] if comm.rank == bad
                                else [signal.SIGTERM])
    nothing_left(comm, shared_tmp)


def test_signal_ends_a_rank_whose_writer_hangs(comm, shared_tmp):
    """The rank whose writer is stuck in I/O (a hung file system) gets SIGTERM: it ends the
    stage on every rank at once instead of after the stall timeout."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=20 * CHUNK))
    bad = comm.size - 1
    with caller_handlers("default"):
        timer = signal_later(1.0, signal.SIGTERM) if comm.rank == bad else None
        err = expect_failure(comm, lambda: stage(
            src, shared_tmp / f"dest{comm.rank}", comm, chunk_size=CHUNK, writers="all",
            progress=False, stall_timeout=60, _fault=("stall_writer", bad, 5 * CHUNK)),
            bound_s=10)
        if timer:
            timer.join()
    assert err.code == bcast.E_CANCELLED and err.rank == bad
    nothing_left(comm, shared_tmp)


def test_no_cancel_on_signals_leaves_handlers_alone(comm, shared_tmp):
    """cancel_on_signals=False: stage() touches no handler and no wakeup fd."""
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_random_tree(src, 12))
    seen = []

    def spy(*_args):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real_transfer(*_args)
    real_transfer = bcast._transfer
    bcast._transfer = spy
    try:
        with caller_handlers("default"):
            stage(src, shared_tmp / f"dest{comm.rank}", comm, writers="all", progress=False,
                  cancel_on_signals=False)
    finally:
        bcast._transfer = real_transfer
    assert seen == [signal.SIG_DFL]
