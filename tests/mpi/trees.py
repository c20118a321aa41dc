"""Source trees for staging tests and a content hash that covers every byte."""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path

from aegis.bcast import MANIFEST_NAME as MANIFEST

# names that break anything passing paths through a shell
AWKWARD_NAMES = [
    "with space.json",
    "quo\"te'd.bin",
    "$(touch PWNED).txt",
    "semi;colon&amp|pipe",
    "ünïcødé-模型.safetensors",
    "-leading-dash",
    "back\\slash",
]


def tree_digest(root: Path, staged: bool = False) -> dict[str, tuple]:
    """{relative path: (kind, permission bits, sha256 of content | link target)}.

    staged=True gives what stage() makes of the tree: directories gain u+rwx."""
    out: dict[str, tuple] = {}
    top = root.lstat()
    if stat.S_ISREG(top.st_mode):
        return {root.name: ("file", stat.S_IMODE(top.st_mode), _sha(root))}
    dir_bits = 0o700 if staged else 0
    out["."] = ("dir", stat.S_IMODE(top.st_mode) | dir_bits, "")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if rel == MANIFEST:
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode) | dir_bits, "")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), _sha(path))
    return out


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def make_fixed_tree(root: Path, big_bytes: int) -> Path:
    """Nested dirs, empty files, a symlink, a file larger than a chunk, awkward names, modes."""
    rng = random.Random(1234)
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "a" / "empty.txt").write_bytes(b"")
    (root / "a" / "b" / "c" / "deep.json").write_text('{"deep": true}\n')
    (root / "model.safetensors").write_bytes(rng.randbytes(big_bytes))
    for i, name in enumerate(AWKWARD_NAMES):
        (root / "a" / name).write_bytes(rng.randbytes(100 + 977 * i))
    os.symlink("a/b/c/deep.json", root / "link-to-deep")
    os.symlink("does-not-exist", root / "dangling")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho ok\n")
    script.chmod(0o755)
    (root / "a" / "private.key").write_bytes(b"secret-ish")
    (root / "a" / "private.key").chmod(0o600)
    (root / "a" / "readonly.cfg").write_bytes(b"ro")
    (root / "a" / "readonly.cfg").chmod(0o444)
    (root / "a" / "b").chmod(0o750)
    return root


def make_random_tree(root: Path, seed: int, max_bytes: int = 3 << 20) -> Path:
    """A seeded random tree: depth, fan-out, file sizes (incl. 0) and modes vary with seed."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    dirs = [root]
    for i in range(rng.randint(1, 12)):
        parent = rng.choice(dirs)
        d = parent / f"d{i}-{rng.choice(['x', 'y y', 'ž', '$z'])}"
        d.mkdir()
        dirs.append(d)
    budget = max_bytes
    for i in range(rng.randint(1, 30)):
        size = rng.choice([0, 1, rng.randint(2, 5000), rng.randint(5000, 1 << 20)])
        size = min(size, budget)
        budget -= size
        path = rng.choice(dirs) / f"f{i}{rng.choice(['.json', '.bin', ' sp', ''])}"
        path.write_bytes(rng.randbytes(size))
        path.chmod(rng.choice([0o644, 0o600, 0o755, 0o444]))
    if rng.random() < 0.5:
        os.symlink(f"f{rng.randint(0, 3)}", rng.choice(dirs) / "sym")
    return root


def make_long_names_tree(root: Path) -> Path:
    """Names GNU tar must carry in long-name records: a 120-byte name, a path over 255 bytes,
    a symlink with a 150-byte target, and a read-only (0555) directory around them."""
    deep = root / ("d" * 90) / ("e" * 90) / ("f" * 90)  # > 255 bytes with the file name
    deep.mkdir(parents=True)
    (deep / ("g" * 60 + ".json")).write_text('{"deep": 1}')
    (root / ("n" * 120 + ".bin")).write_bytes(random.Random(5).randbytes(70_000))
    (root / ("ü" * 50)).write_bytes(b"two bytes per character")  # 100 bytes of UTF-8
    os.symlink("../" + "t" * 150, root / "long-link")
    ro = root / "read-only"
    ro.mkdir()
    (ro / "inside.txt").write_text("in a 0555 directory")
    ro.chmod(0o555)
    root.chmod(0o555)
    return root
