"""Shared by the vLLM end-to-end tests and benchmarks/bench_launch.py: where the vLLM venv is,
the environment a CPU instance needs, the tiny model, and the process table."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("AEGIS_VLLM_VENV")
                 or Path.home() / ".cache" / "aegis" / "vllm-venv")
STAMP = ".aegis-vllm-stamp"  # written last by scripts/setup-vllm

# The arguments that make vLLM fit this 2-core, CPU-only box (docs/vllm-cpu.md).
VLLM_CPU_ARGS = ("--dtype", "float32", "--max-model-len", "256", "--enforce-eager")
# Environment for every CPU instance: 1 GiB of KV cache keeps one at ~2.5 GB; no telemetry,
# no hub access (the model is local).
VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
# Set in the launcher's environment; every process it starts inherits it, so the process
# table shows what a run left behind (vLLM renames its children, e.g. "VLLM::EngineCore").
RUN_MARKER = "AEGIS_E2E_RUN"


def venv_problem(venv: Path) -> str | None:
    """Why `venv` is not a finished vLLM venv, or None."""
    if not (venv / "bin" / "vllm").is_file():
        return f"no vLLM venv at {venv} (no bin/vllm)"
    if not (venv / STAMP).is_file():
        return f"the vLLM venv at {venv} is unfinished (no {STAMP})"
    return None


def make_tiny_model(out: Path) -> subprocess.CompletedProcess:
    """The project's tiny Llama (scripts/make-tiny-model, run by the vLLM venv's python)."""
    return subprocess.run([str(VLLM_VENV / "bin" / "python"),
                           str(REPO / "scripts" / "make-tiny-model"), str(out)],
                          capture_output=True, text=True, timeout=300)


def marked_processes(token: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment holds RUN_MARKER=token."""
    needle = f"{RUN_MARKER}={token}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if _is_zombie(entry):
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found[int(entry.name)] = cmd.strip()
    return found


def _is_zombie(entry: Path) -> bool:
    stat = (entry / "stat").read_text()
    return stat[stat.rindex(")") + 2] == "Z"


def wait_gone(token: str, timeout: float) -> dict[int, str]:
    """Wait until no marked process is left; returns what is still there at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        left = marked_processes(token)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def kill_marked(token: str) -> None:
    """Last-resort cleanup so a failing test or benchmark leaves nothing running."""
    for pid in marked_processes(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
