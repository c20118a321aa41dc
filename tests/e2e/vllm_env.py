"""Shared by the vLLM end-to-end tests and benchmarks/bench_launch.py: where the vLLM venv is,
the environment a CPU instance needs, the tiny model, and the process table."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# RUN_MARKER=token in the launcher's environment marks every process it starts.
from harness import RUN_MARKER, kill_marked, marked_processes, wait_gone  # noqa: F401

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


def venv_problem(venv: Path) -> str | None:
    """Why `venv` is not a finished vLLM venv, or None."""
    if not (venv / "bin" / "vllm").is_file():
        return f"no vLLM venv at {venv} (no bin/vllm)"
    if not (venv / STAMP).is_file():
        return f"the vLLM venv at {venv} is unfinished (no {STAMP})"
    return None


def make_tiny_model(out: Path, *options: str) -> subprocess.CompletedProcess:
    """The project's tiny Llama (scripts/make-tiny-model, run by the vLLM venv's python)."""
    return subprocess.run([str(VLLM_VENV / "bin" / "python"),
                           str(REPO / "scripts" / "make-tiny-model"), str(out), *options],
                          capture_output=True, text=True, timeout=300)
