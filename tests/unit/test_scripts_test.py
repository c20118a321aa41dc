"""scripts/test, the command CI runs: every requested stage runs even after one fails, a
summary lists them all, the exit status says whether any failed; a failed machine or venv
set-up stops at once; the test Slurm cluster is stopped however the run ends.

The real script runs in a copy of the repository layout whose set-up scripts, stage scripts
and venv python are stand-ins: each records its call and answers with the exit status the
test asks for (FAKE_EXIT_<name>), in milliseconds."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, bash_path

# Records its call as "<name> <args>", then exits with FAKE_EXIT_<name>_<first argument> or
# FAKE_EXIT_<name> (a - in a name spelled _). The venv python calls itself pytest_<stage>
# after the tests it is asked to run and records the variables the stage exported first;
# FAKE_INTERRUPT=<stage> makes it play a Ctrl-C: SIGINT to its whole process group, as a
# terminal sends it.
_STUB = r"""#!/bin/bash
name=${0##*/} first=${1:-} exported=()
if [ "$name" = python ]; then
  case " $* " in
    *" tests/unit"*) name=pytest_unit ;;
    *" tests/integration"*) name=pytest_slurm ;;
    *" tests/e2e"*) name=pytest_vllm ;;
  esac
  mapfile -t exported < <(env | grep -E '^(AEGIS_REQUIRE_[A-Z]+|SLURM_CONF)=' | sort)
fi
echo "$name ${exported[*]} $*" | tr -s ' ' >> "$FAKE_LOG"
[ "${FAKE_INTERRUPT:-}" != "${name#pytest_}" ] || kill -INT 0
[ "$name $first" != "slurm-cluster env" ] || echo "export SLURM_CONF=/fake/slurm.conf"
var=FAKE_EXIT_${name//-/_} sub=FAKE_EXIT_${name//-/_}_${first//[^a-z]/_}
exit "${!sub:-${!var:-0}}"
"""
STUBS = ["setup-system", "setup-dev", "run-mpi-tests", "slurm-cluster", "setup-vllm"]


@pytest.fixture
def fake_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "test", repo / "scripts" / "test")
    for path in [repo / "scripts" / name for name in STUBS] + [repo / ".venv" / "bin" / "python"]:
        path.write_text(_STUB)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return repo


def run_test_script(repo: Path, *stages: str, **exits: str
                    ) -> tuple[subprocess.CompletedProcess, list[str]]:
    """scripts/test STAGES in the fake repo, in a session of its own (a Ctrl-C it plays
    reaches only it); returns the result and the calls, in order."""
    log = repo.parent / "calls"
    log.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FAKE_", "AEGIS_", "SLURM_"))}
    env.update(FAKE_LOG=str(log), **exits)
    proc = subprocess.run([bash_path(), str(repo / "scripts" / "test"), *stages], env=env,
                          capture_output=True, text=True, timeout=60, start_new_session=True)
    return proc, log.read_text().splitlines()


def summary(stderr: str) -> list[tuple[str, str]]:
    """(stage, result) of each line of the summary at the end of the output."""
    lines = stderr[stderr.index("] summary\n"):].splitlines()[1:]
    rows = [line.split(None, 2) for line in lines if line.startswith("  ")]
    return [(stage, result) for stage, _took, result in rows]


def names(calls: list[str]) -> list[str]:
    return [" ".join(c.split()[:2]) if c.startswith("slurm-cluster") else c.split()[0]
            for c in calls]


EVERY_STAGE = ["setup-system", "setup-dev", "pytest_unit", "run-mpi-tests",
               "slurm-cluster start", "slurm-cluster env", "pytest_slurm", "setup-vllm",
               "pytest_vllm", "slurm-cluster stop"]


def test_all_stages_pass(fake_repo):
    proc, calls = run_test_script(fake_repo)
    assert proc.returncode == 0, proc.stderr
    assert names(calls) == EVERY_STAGE
    assert summary(proc.stderr) == [(s, "passed") for s in ("unit", "mpi", "slurm", "vllm")]
    assert "all requested stages passed (unit mpi slurm vllm)" in proc.stderr
    # the slurm stage's pytest runs against the started cluster, required
    (slurm,) = [c for c in calls if c.startswith("pytest_slurm")]
    assert "AEGIS_REQUIRE_SLURM=1 SLURM_CONF=/fake/slurm.conf " in slurm and "-m slurm" in slurm
    (vllm,) = [c for c in calls if c.startswith("pytest_vllm")]
    assert "AEGIS_REQUIRE_VLLM=1 " in vllm and "-m vllm" in vllm


@pytest.mark.parametrize("failing, exit_var, result", [
    ("unit", "FAKE_EXIT_pytest_unit", "FAILED (exit 1)"),
    ("unit", "FAKE_EXIT_pytest_unit", "FAILED (exit 5: no tests ran)"),  # pytest: no test
    ("mpi", "FAKE_EXIT_run_mpi_tests", "FAILED (exit 1)"),
    ("slurm", "FAKE_EXIT_pytest_slurm", "FAILED (exit 1)"),
    ("vllm", "FAKE_EXIT_setup_vllm", "FAILED (exit 1)"),  # its own set-up belongs to it
])
def test_a_failed_stage_does_not_hide_the_others(fake_repo, failing, exit_var, result):
    code = "5" if "exit 5" in result else "1"
    proc, calls = run_test_script(fake_repo, **{exit_var: code})
    assert proc.returncode == 1, proc.stderr
    expected = [c for c in EVERY_STAGE if not (failing == "vllm" and c == "pytest_vllm")]
    assert names(calls) == expected  # every stage ran; the cluster stopped once, at the end
    assert summary(proc.stderr) == [(s, result if s == failing else "passed")
                                    for s in ("unit", "mpi", "slurm", "vllm")]
    assert proc.stderr.rstrip().endswith(f"FAILED: 1 of 4 stages ({failing})")


def test_a_cluster_that_does_not_start_fails_its_stage_and_is_stopped(fake_repo):
    proc, calls = run_test_script(fake_repo, "slurm", "vllm", FAKE_EXIT_slurm_cluster_start="3")
    assert proc.returncode == 1
    # no tests against a cluster that is not up; what it started is stopped anyway
    assert names(calls) == ["setup-system", "setup-dev", "slurm-cluster start", "setup-vllm",
                            "pytest_vllm", "slurm-cluster stop"]
    assert summary(proc.stderr) == [("slurm", "FAILED (exit 3)"), ("vllm", "passed")]


def test_every_failure_is_listed_and_only_requested_stages_run(fake_repo):
    proc, calls = run_test_script(fake_repo, "mpi", "unit", FAKE_EXIT_pytest_unit="2",
                                  FAKE_EXIT_run_mpi_tests="1")
    assert proc.returncode == 1
    assert names(calls) == ["setup-system", "setup-dev", "pytest_unit", "run-mpi-tests"]
    assert summary(proc.stderr) == [("unit", "FAILED (exit 2)"), ("mpi", "FAILED (exit 1)")]
    assert proc.stderr.rstrip().endswith("FAILED: 2 of 2 stages (unit mpi)")
    assert "slurm-cluster stop" not in calls  # never started, never stopped


@pytest.mark.parametrize("setup", ["setup-system", "setup-dev"])
def test_a_failed_setup_stops_before_any_stage(fake_repo, setup):
    proc, calls = run_test_script(fake_repo, **{f"FAKE_EXIT_{setup.replace('-', '_')}": "1"})
    assert proc.returncode == 1
    assert names(calls) == EVERY_STAGE[:EVERY_STAGE.index(setup) + 1]
    assert "no stage can run" in proc.stderr and "summary" not in proc.stderr


def test_an_interrupt_stops_the_whole_run_and_the_cluster(fake_repo):
    proc, calls = run_test_script(fake_repo, FAKE_INTERRUPT="slurm")
    assert proc.returncode == 130, proc.stderr
    assert names(calls) == EVERY_STAGE[:EVERY_STAGE.index("pytest_slurm") + 1] + [
        "slurm-cluster stop"]  # no vLLM stage after a Ctrl-C


def test_an_unknown_stage_is_refused_before_anything_runs(fake_repo):
    proc, calls = run_test_script(fake_repo, "unit", "intergration")
    assert proc.returncode == 2
    assert proc.stderr == ("scripts/test: unknown stage 'intergration' "
                           "(stages: unit mpi slurm vllm)\n")
    assert calls == []
