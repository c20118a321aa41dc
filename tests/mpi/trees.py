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


def tree_digest(root: Path) -> dict[str, tuple]:
    """{relative path: (kind, permission bits, sha256 of content | link target)}."""
    out: dict[str, tuple] = {}
    top = root.lstat()
    if stat.S_ISREG(top.st_mode):
        return {root.name: ("file", stat.S_IMODE(top.st_mode), _sha(root))}
    out["."] = ("dir", stat.S_IMODE(top.st_mode), "")
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
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
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
