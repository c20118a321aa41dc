"""Batch scripts: golden files for the examples, bash -n and shellcheck on every rendering,
and the directives the issue asks for. Update goldens with AEGIS_UPDATE_GOLDEN=1 (the run
then fails so an update is never mistaken for a pass)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from aegis.config import dump_yaml, load_config
from aegis.plan import make_plan
from aegis.platforms import get_platform
from aegis.scheduler import get_backend
from aegis.scheduler.submit import resolved_for_run

from conftest import EXAMPLES, GOLDEN, bash_path

RUN_DIR = "/home/user/aegis-runs/aegis-20250101-120000"
PYTHON = "/soft/aegis/bin/python"

# (golden name, example, flag overrides)
GOLDEN_CASES = [
    ("aurora-single.pbs.sh", "aurora-single.yaml", {}),
    ("aurora-multi.pbs.sh", "aurora-multi.yaml", {}),
    ("aurora-multi.slurm.sh", "aurora-multi.yaml", {"scheduler": "slurm"}),
    ("frontier.slurm.sh", "frontier.yaml", {}),
]


def render(example: str, overrides: dict | None = None, run_dir: str = RUN_DIR,
           python: str = PYTHON) -> str:
    config = load_config(str(EXAMPLES / example), overrides or {})
    platform = get_platform(config.platform)
    backend = get_backend(config.effective_scheduler)
    return backend.render(config, make_plan(config, platform), platform, run_dir, python=python)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("AEGIS_UPDATE_GOLDEN"):
        path.write_text(text)
        pytest.fail(f"updated {path}; re-run without AEGIS_UPDATE_GOLDEN")
    assert path.exists(), f"missing golden {path} (AEGIS_UPDATE_GOLDEN=1 writes it)"
    assert text == path.read_text()


@pytest.mark.parametrize("golden,example,overrides", GOLDEN_CASES,
                         ids=[c[0] for c in GOLDEN_CASES])
def test_golden_scripts(golden, example, overrides):
    check_golden(golden, render(example, overrides))


def test_golden_resolved_config():
    config = load_config(str(EXAMPLES / "aurora-single.yaml"))
    check_golden("aurora-single.config.yaml",
                 dump_yaml(resolved_for_run(config, RUN_DIR).to_mapping()))


def directive_lines(script: str, prefix: str) -> list[str]:
    return [line[len(prefix) + 1:] for line in script.splitlines() if line.startswith(prefix)]


def test_pbs_single_model_directives():
    lines = directive_lines(render("aurora-single.yaml"), "#PBS")
    assert lines == ["-N aegis", "-l select=1", "-l walltime=01:00:00",
                     "-l filesystems=flare:home", "-A MyProject", "-q debug", "-j oe",
                     f"-o {RUN_DIR}/job.log", "-l place=scatter"]


def test_pbs_multi_model_nodes_and_ports():
    script = render("aurora-multi.yaml")
    assert "-l select=2" in directive_lines(script, "#PBS")
    assert "ports 8000-8001" in script and "ports 8002" in script


def test_pbs_optional_directives_left_out():
    config = load_config(str(EXAMPLES / "local.yaml"), {"scheduler": "pbs"})
    platform = get_platform("local")
    script = get_backend("pbs").render(config, make_plan(config, platform), platform, RUN_DIR)
    pbs = directive_lines(script, "#PBS")
    assert not any(line.startswith(("-A", "-q", "-l filesystems")) for line in pbs)
    assert "-l select=1" in pbs and "-j oe" in pbs


def test_slurm_directives_frontier():
    lines = directive_lines(render("frontier.yaml"), "#SBATCH")
    assert lines == ["-J aegis", "-N 2", "-t 01:00:00", "-A ABC123", "-p batch",
                     f"-o {RUN_DIR}/job.log", "--exclusive", "-C nvme"]


def test_body_runs_launcher_once_per_node_with_config_in_run_dir():
    script = render("aurora-multi.yaml")
    last = script.rstrip("\n").splitlines()[-1]
    assert last == (f"exec mpiexec -n 2 --ppn 1 --cpu-bind none {PYTHON} -m aegis.launch "
                    f"--config {RUN_DIR}/config.yaml --run-dir {RUN_DIR}")
    assert "module load frameworks" in script  # platform setup, not template text
    assert f"cd {RUN_DIR}" in script


def test_conda_env_activates_and_uses_its_python():
    script = render("aurora-single.yaml", {"conda_env": "/lus/envs/my vllm"}, python=None)
    assert "conda activate '/lus/envs/my vllm'" in script
    assert " python -m aegis.launch " in script


def test_default_python_is_the_submitting_interpreter():
    import sys

    assert f" {sys.executable} -m aegis.launch " in render("aurora-single.yaml", python=None)


def test_no_secret_in_script(monkeypatch):
    config = load_config(str(EXAMPLES / "aurora-single.yaml"), {})
    config = config.replace(hf_token="hf_TOPSECRET", api_key_env="MY_API_KEY")
    platform = get_platform("aurora")
    for name in ("pbs", "slurm"):
        script = get_backend(name).render(config, make_plan(config, platform), platform, RUN_DIR)
        assert "TOPSECRET" not in script
    assert "hf_token" not in dump_yaml(config.to_mapping())
    assert "TOPSECRET" not in repr(config)


def _all_renderings() -> list[tuple[str, str, str]]:
    """(name, script, shellcheck severity). Scripts quoting hostile values on purpose get
    SC2016 ("expressions don't expand in single quotes") as info: that is the point."""
    out = [(g, render(e, o), "style") for g, e, o in GOLDEN_CASES]
    out.append(("conda", render("aurora-single.yaml", {"conda_env": "it's $(env)"}, python=None),
                "warning"))
    out.append(("local", render("local.yaml", {}, run_dir="/tmp/run dir with space"), "style"))
    return out


@pytest.mark.parametrize("name,script,severity", _all_renderings(),
                         ids=[r[0] for r in _all_renderings()])
def test_scripts_pass_bash_n(name, script, severity, tmp_path):
    path = tmp_path / "job.sh"
    path.write_text(script)
    result = subprocess.run([bash_path(), "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name,script,severity", _all_renderings(),
                         ids=[r[0] for r in _all_renderings()])
def test_scripts_pass_shellcheck(name, script, severity, tmp_path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:  # a missing tool must fail, not skip: scripts/setup-system installs it
        pytest.fail("shellcheck is not installed (apt-get install shellcheck; scripts/setup-system)")
    path = tmp_path / "job.sh"
    path.write_text(script)
    result = subprocess.run([shellcheck, "--shell=bash", f"--severity={severity}", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
