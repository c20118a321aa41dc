"""aegis.bcast.stage() under real MPI: round trips, cache, and failures ending on every rank."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest
from trees import MANIFEST, make_fixed_tree, make_random_tree, tree_digest

from aegis import bcast
from aegis.bcast import StagingError, stage

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]

CHUNK = 64 << 10  # small chunks so modest files cross many chunk boundaries


def on_root_make(comm, fn):
    if comm.rank == 0:
        fn()
    comm.Barrier()


def check_round_trip(comm, src: Path, dests: list[Path]) -> None:
    """Every destination holds exactly the source: names, kinds, modes, every byte hashed."""
    expected = comm.bcast(tree_digest(src) if comm.rank == 0 else None, root=0)
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
    expected = comm.bcast(tree_digest(src) if comm.rank == root else None, root=root)
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


@pytest.mark.parametrize("who", ["root", "last"])
def test_tar_missing(comm, shared_tmp, monkeypatch, who):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_random_tree(src, 5))
    bad = 0 if who == "root" else comm.size - 1
    if comm.rank == bad:
        empty = shared_tmp / "empty-bin"
        empty.mkdir(exist_ok=True)
        monkeypatch.setenv("PATH", str(empty))
    dest = shared_tmp / f"dest{comm.rank}"
    err = expect_failure(comm, lambda: stage(src, dest, comm, writers="all", progress=False))
    assert err.rank == bad and err.code == 3 and "cannot run tar" in err.cause
    assert not any(shared_tmp.glob("dest*")) and leftovers(shared_tmp) == []


@pytest.mark.parametrize("depth", [1, 4])
def test_writer_tar_killed_mid_stream(comm, shared_tmp, depth):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=40 * CHUNK))
    bad = comm.size - 1
    dest = shared_tmp / f"dest{comm.rank}"
    err = expect_failure(comm, lambda: stage(
        src, dest, comm, chunk_size=CHUNK, depth=depth, writers="all", progress=False,
        _fault=("kill_writer", bad, 10 * CHUNK)))
    assert err.rank == bad and err.code == 5 and "killed by signal 9" in err.cause
    assert not any(shared_tmp.glob("dest*")) and leftovers(shared_tmp) == []


@pytest.mark.parametrize("depth", [1, 4])
def test_source_tar_killed_mid_stream(comm, shared_tmp, depth):
    src = shared_tmp / "src"
    on_root_make(comm, lambda: make_fixed_tree(src, big_bytes=40 * CHUNK))
    dest = shared_tmp / f"dest{comm.rank}"
    err = expect_failure(comm, lambda: stage(
        src, dest, comm, chunk_size=CHUNK, depth=depth, writers="all", progress=False,
        _fault=("kill_reader", 0, 10 * CHUNK)))
    assert err.rank == 0 and err.code == 4 and "tar -c was killed" in err.cause
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
