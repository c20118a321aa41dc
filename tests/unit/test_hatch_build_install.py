"""hatch_build.install_atomically: a rebuild must not rewrite a .so that processes have mapped.

An in-place copy (the old shutil.copy2 onto the target) changed the pages of every process that
had the extension loaded: SIGBUS mid-transfer, SIGSEGV in ld.so's _dl_fini at exit."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import hatch_build  # noqa: E402  (needs hatchling: the dev venv has it)


def test_mapped_old_build_is_untouched_and_new_build_is_in_place(tmp_path):
    target = tmp_path / "_bcast.cpython-311-x86_64-linux-gnu.so"
    target.write_bytes(b"A" * 3 * mmap.PAGESIZE)
    built = tmp_path / "build" / target.name
    built.parent.mkdir()
    built.write_bytes(b"B" * mmap.PAGESIZE)  # shorter, like a different build
    with open(target, "rb") as fh:
        # private, read-only: how ld.so maps a library's text
        old = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    old_inode = target.stat().st_ino
    try:
        hatch_build.install_atomically(built, target)
        assert old[:mmap.PAGESIZE] == b"A" * mmap.PAGESIZE  # in place: b"B" * ...
        # past the new build's length an in-place rewrite raises SIGBUS here
        assert old[:] == b"A" * 3 * mmap.PAGESIZE
    finally:
        old.close()
    assert target.read_bytes() == b"B" * mmap.PAGESIZE
    assert target.stat().st_ino != old_inode
    assert os.access(target, os.X_OK) == os.access(built, os.X_OK)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_bcast.cpython-311-x86_64-linux-gnu.so",
                                                        "build"]


def test_failed_copy_leaves_target_and_no_temp(tmp_path):
    target = tmp_path / "mod.so"
    target.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        hatch_build.install_atomically(tmp_path / "missing.so", target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["mod.so"]
