"""Pure parts of staging: which ranks read, and the file index the root builds."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

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
