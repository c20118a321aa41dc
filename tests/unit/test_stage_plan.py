"""Pure parts of staging: which ranks read, and the file index the root builds."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aegis.bcast import pick_readers, scan


def test_readers_prefer_one_rank_per_node():
    hosts = ["n1", "n1", "n2", "n2", "n3", "n3"]
    assert pick_readers(hosts, 0, 1) == [0]
    assert pick_readers(hosts, 0, 3) == [0, 2, 4]
    assert pick_readers(hosts, 3, 3) == [3, 0, 4]  # the root reads first, its node once
    assert pick_readers(hosts, 0, 5) == [0, 2, 4, 1, 3]  # then the other ranks in order
    assert pick_readers(["a"] * 4, 2, 4) == [2, 0, 1, 3]


def _entries(index: bytes) -> list[tuple[str, bytes, int, bytes]]:
    assert index[:8] == b"AEGIDX01"
    (count,), off, out = struct.unpack_from("<Q", index, 8), 16, []
    for _ in range(count):
        kind, _mode, _mtime, size, _uid, _gid, plen, llen = struct.unpack_from(
            "<B3xIqQIIII", index, off)
        off += 40
        out.append((chr(kind), index[off:off + plen], size, index[off + plen:off + plen + llen]))
        off += plen + llen
    assert off == len(index)
    return out


def test_index_is_sorted_parents_first_with_links(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.bin").write_bytes(b"12345")
    (tmp_path / "a b").write_bytes(b"")
    os.symlink("b/x.bin", tmp_path / "link")
    result = scan(tmp_path)
    assert result.src_dir == str(tmp_path)
    assert _entries(result.index) == [("5", b".", 0, b""), ("0", b"a b", 0, b""),
                                      ("5", b"b", 0, b""), ("0", b"b/x.bin", 5, b""),
                                      ("2", b"link", 0, b"b/x.bin")]
    assert result.info["size"] == 5 and result.info["entries"] == 4


def test_index_of_one_file_and_refusals(tmp_path):
    (tmp_path / "env.tar.gz").write_bytes(b"abc")
    one = scan(tmp_path / "env.tar.gz")
    assert one.src_dir == str(tmp_path / "env.tar.gz")
    assert _entries(one.index) == [("0", b"env.tar.gz", 3, b"")]
    os.symlink("env.tar.gz", tmp_path / "current.tar.gz")  # lands under the name it was given
    assert _entries(scan(tmp_path / "current.tar.gz").index)[0][1] == b"current.tar.gz"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="FIFO"):
        scan(tmp_path)
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "missing")


@pytest.mark.parametrize("flag,value,message", [
    ("--stall-timeout", "nan", "stall_timeout must be a number of seconds"),
    ("--stall-timeout", "0", "--stall-timeout"),
    ("--readers", "2", "readers must be an integer in [1, 1]"),
])
def test_stage_cli_refuses_bad_knobs_with_one_line(tmp_path, flag, value, message):
    """One rank (no mpiexec): bad staging knobs exit 2 with one line, nothing created."""
    (tmp_path / "src").mkdir()
    run = subprocess.run([sys.executable, "-m", "aegis", "stage", "-q", flag, value,
                          str(tmp_path / "src"), str(tmp_path / "dest")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) <= 3 and "Traceback" not in run.stderr
    assert not (tmp_path / "dest").exists()


def _same_size_and_mtime(path, data: bytes, *, new_inode: bool) -> None:
    """Replace path's content with data (same length) and put its mtime back, as
    `cp new old; touch -r ...` (new_inode=False) or `mv new old` after `touch -r` would."""
    st = os.stat(path)
    assert len(data) == st.st_size
    time.sleep(0.02)  # a later ctime even where the kernel's timestamps are coarse
    if new_inode:
        other = path.with_name(path.name + ".new")
        other.write_bytes(data)
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(other, path)
    else:
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("new_inode", [False, True])
@pytest.mark.parametrize("file_source", [False, True])
def test_fingerprint_sees_a_replaced_file_with_the_same_size_and_mtime(tmp_path, new_inode,
                                                                         file_source):
    """The no-op check must not keep a stale copy: a source file rewritten in place or
    replaced by another file, both with its size and mtime, changes the fingerprint (it
    covers st_ino and st_ctime_ns, and a user cannot set ctime)."""
    src = tmp_path / "src"
    src.mkdir()
    weights = src / "model.safetensors"
    weights.write_bytes(b"old weights!")
    target = weights if file_source else src
    before = scan(target).info["fingerprint"]
    assert scan(target).info["fingerprint"] == before  # nothing changed: the same
    _same_size_and_mtime(weights, b"new weights!", new_inode=new_inode)
    assert scan(target).info["fingerprint"] != before


def _stage_cli(*args: str) -> subprocess.CompletedProcess:
    """`aegis stage` on one rank (no mpiexec: MPI starts as a singleton)."""
    return subprocess.run([sys.executable, "-m", "aegis", "stage", "-q", *args],
                          capture_output=True, text=True, timeout=60)


def _listing(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _nesting_cases(tmp_path):
    """(source, dest, the path the refusal names besides dest) for every way a stage could
    write into its own source or replace (delete) the directory holding it."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"w" * 1000)
    os.symlink(src, tmp_path / "link-to-src")           # a link to the source
    os.symlink(src / "sub", tmp_path / "link-to-sub")   # a link into it
    return {
        "dest inside source": (src, src / "staged", src),
        "dest deep inside source": (src, src / "sub" / "a" / "b", src),
        "dest is the source": (src, src, src),
        "dest through a link into the source": (src, tmp_path / "link-to-sub" / "x", src),
        "source given through a link": (tmp_path / "link-to-src", src / "x", src),
        "source inside dest": (src / "sub", src, src / "sub"),
        "file source in dest": (src / "weights.bin", src, src / "weights.bin"),
        "file source is dest": (src / "weights.bin", src / "weights.bin", src / "weights.bin"),
        "dest is / ": (src, Path("/"), src),
    }


CASES = ["dest inside source", "dest deep inside source", "dest is the source",
         "dest through a link into the source", "source given through a link",
         "source inside dest", "file source in dest", "file source is dest", "dest is / "]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("force", [False, True])
def test_stage_refuses_a_dest_nested_with_its_source(tmp_path, case, force):
    """`aegis stage SRC SRC/sub` nested a new copy into the shared source on every re-run; a
    dest holding the source would be replaced, deleting it. Refused before anything is
    written, with --force too: exit 2, one line naming both (resolved) paths."""

    source, dest, named = _nesting_cases(tmp_path)[case]
    before = _listing(tmp_path)
    run = _stage_cli(*(["--force"] if force else []), str(source), str(dest))
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert os.path.realpath(dest) in lines[0] and str(named) in lines[0], lines[0]
    assert _listing(tmp_path) == before  # nothing written, nothing removed


def test_stage_allows_neighbours_of_its_source(tmp_path):
    """Not nested: a sibling whose name starts with the source's, the source's parent's
    other children, a file source staged next to itself."""
    src = tmp_path / "model"
    src.mkdir()
    (src / "w.bin").write_bytes(b"x" * 100)
    for dest in (tmp_path / "model2", tmp_path / "model-staged" / "deep", tmp_path / "m"):
        run = _stage_cli(str(src), str(dest))
        assert run.returncode == 0, run.stderr
        assert (dest / "w.bin").read_bytes() == b"x" * 100
    run = _stage_cli(str(src / "w.bin"), str(tmp_path / "model-file"))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "model-file" / "w.bin").exists()
