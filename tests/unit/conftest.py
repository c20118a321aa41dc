"""Shared helpers for the pure unit tests of config / plan / scheduler / CLI."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
GOLDEN = ROOT / "tests" / "golden"

# A stand-in batch command: records its argv (one per line) and whether HF_TOKEN reached its
# environment, then answers with FAKE_<NAME>_OUT / _ERR / _EXIT. Only bash builtins, so it
# runs with PATH pointing at the fake directory alone.
_FAKE = r"""#!/bin/bash
name=${0##*/}
printf '%s\n' "$@" > "$FAKE_LOG/$name.argv"
printf '%s' "${HF_TOKEN-<unset>}" > "$FAKE_LOG/$name.hf_token"
up=${name^^}
out="FAKE_${up}_OUT"; err="FAKE_${up}_ERR"; code="FAKE_${up}_EXIT"
printf '%s' "${!out-}"
printf '%s' "${!err-}" >&2
exit "${!code-0}"
"""

BATCH_COMMANDS = ("qsub", "qstat", "qdel", "sbatch", "squeue", "sacct", "scancel", "scontrol")


class FakeBatch:
    def __init__(self, bin_dir: Path, log_dir: Path, monkeypatch):
        self.bin_dir, self.log_dir, self._mp = bin_dir, log_dir, monkeypatch

    def answer(self, command: str, out: str = "", err: str = "", exit: int = 0) -> None:
        up = command.upper()
        self._mp.setenv(f"FAKE_{up}_OUT", out)
        self._mp.setenv(f"FAKE_{up}_ERR", err)
        self._mp.setenv(f"FAKE_{up}_EXIT", str(exit))

    def argv(self, command: str) -> list[str] | None:
        path = self.log_dir / f"{command}.argv"
        return path.read_text().splitlines() if path.exists() else None

    def hf_token_seen(self, command: str) -> str:
        return (self.log_dir / f"{command}.hf_token").read_text()

    def remove(self, command: str) -> None:
        (self.bin_dir / command).unlink()


@pytest.fixture
def fake_batch(tmp_path, monkeypatch) -> FakeBatch:
    bin_dir, log_dir = tmp_path / "fakebin", tmp_path / "fakelog"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name in BATCH_COMMANDS:
        path = bin_dir / name
        path.write_text(_FAKE)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bin_dir))  # the real qsub/sbatch must not be reached
    monkeypatch.setenv("FAKE_LOG", str(log_dir))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return FakeBatch(bin_dir, log_dir, monkeypatch)


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def bash_path() -> str:
    for candidate in ("/bin/bash", "/usr/bin/bash"):
        if os.path.exists(candidate):
            return candidate
    raise AssertionError("bash not found")
