"""The click CLI: flags from the key table, submit (with stand-in qsub/sbatch), status,
cancel, plan, and the installed `aegis` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from aegis.cli import main
from aegis.config import KEYS, LOGIN_KEYS, load_config

from conftest import EXAMPLES, tree

EXAMPLE = str(EXAMPLES / "aurora-single.yaml")


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_bare_aegis_prints_the_help_readably():
    result = invoke()
    assert result.exit_code != 0 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Usage: ") and "Commands:" in lines
    assert any(line.split()[:1] == ["status"] for line in lines)


def test_every_config_key_has_a_flag_on_submit_and_plan():
    for command in ("submit", "plan"):
        params = {p.name: p for p in main.commands[command].params}
        for key in KEYS:
            if command == "plan" and key in LOGIN_KEYS:  # the login side's: submit only
                assert key.name not in params
                continue
            assert key.name in params, f"{command}: no flag for {key.name}"
            assert key.flag in params[key.name].opts
    # Each flag really reaches its key (one per kind, plus the secret file flag).
    assert "--tensor-parallel-size" in main.commands["submit"].params[
        [p.name for p in main.commands["submit"].params].index("tensor_parallel_size")].opts


def test_flags_override_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    token = tmp_path / "token"
    token.write_text("hf_fromfile\n")
    result = invoke("plan", "-c", EXAMPLE, "--instances", "3", "--port-start", "9100",
                    "--format", "json", "--no-allow-partial", "--hf-token-file", str(token))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [i["port"] for i in data["instances"]] == [9100, 9101, 9102]
    assert data["nodes_needed"] == 2


def test_plan_table(tmp_path):
    result = invoke("plan", "-c", str(EXAMPLES / "aurora-multi.yaml"))
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "# 3 instance(s) on 2 node(s) of aurora (12 devices per node)"
    assert lines[2].split() == ["0", "0", "0-5", "8000", "30000", "30001",
                                "meta-llama/Llama-3.3-70B-Instruct"]


def test_extra_vllm_args_flag_takes_dashed_value(tmp_path):
    result = invoke("plan", "--model", "m", "--extra-vllm-args", "--max-model-len 4096",
                    "--format", "json")
    assert result.exit_code == 0, result.stderr


def test_dry_run_prints_script_and_writes_nothing(tmp_path, monkeypatch, fake_batch):
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    result = invoke("submit", "-c", EXAMPLE, "--dry-run")
    assert result.exit_code == 0
    assert result.stdout.startswith("#!/bin/bash\n#PBS -N aegis\n")
    assert tree(tmp_path) == before
    assert fake_batch.argv("qsub") is None


def test_legacy_keys_warn_on_stderr(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text("model: m\nregistry_port: 8471\n")
    result = invoke("submit", "-c", "c.yaml", "--dry-run", "--account", "A")
    assert result.exit_code == 0
    assert "aegis: warning: ignoring legacy key 'registry_port'" in result.stderr


def test_submit_pbs_writes_run_dir_and_prints_job_id(tmp_path, monkeypatch, fake_batch):
    monkeypatch.chdir(tmp_path)
    fake_batch.answer("qsub", out="1234.aurora-pbs-0001\n")
    token = tmp_path / "tok"
    token.write_text("hf_SECRET_VALUE")
    result = invoke("submit", "-c", EXAMPLE, "--hf-token-file", str(token),
                    "--api-key-env", "MY_KEY", "--run-dir", "runs")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "1234.aurora-pbs-0001\n"
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert sorted(os.listdir(run_dir)) == ["config.yaml", "job.id", "job.sh"]
    assert fake_batch.argv("qsub") == ["-j", "oe", "-o", str(run_dir / "job.log"), "-v", "HF_TOKEN",
                                       str(run_dir / "job.sh")]
    assert fake_batch.hf_token_seen("qsub") == "hf_SECRET_VALUE"  # by environment only
    for name in ("config.yaml", "job.sh", "job.id"):
        assert "SECRET" not in (run_dir / name).read_text()
    assert "api_key_env: MY_KEY is not set here" in result.stderr
    reloaded = load_config(str(run_dir / "config.yaml"))
    assert reloaded.endpoints_file == str(run_dir / "endpoints.json")
    assert reloaded.models == load_config(EXAMPLE).models
    assert f"--config {run_dir}/config.yaml" in (run_dir / "job.sh").read_text()
    assert os.access(run_dir / "job.sh", os.X_OK)


def test_submit_slurm_uses_sbatch_parsable(tmp_path, monkeypatch, fake_batch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    fake_batch.answer("sbatch", out="77;cluster\n")
    result = invoke("submit", "-c", str(EXAMPLES / "frontier.yaml"))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "77\n"
    (run_dir,) = (tmp_path / "aegis-runs").iterdir()
    assert fake_batch.argv("sbatch") == ["--parsable", "--export=ALL", str(run_dir / "job.sh")]
    assert "#SBATCH -N 2" in (run_dir / "job.sh").read_text()


def test_scheduler_flag_overrides_platform(tmp_path, monkeypatch, fake_batch):
    monkeypatch.chdir(tmp_path)
    fake_batch.answer("sbatch", out="5\n")
    result = invoke("submit", "-c", EXAMPLE, "--scheduler", "slurm")
    assert result.exit_code == 0, result.stderr
    assert fake_batch.argv("sbatch") is not None and fake_batch.argv("qsub") is None


# The example's model_source is on Aurora's file system, not on this machine: a note, no error.
NOT_VISIBLE = ("aegis: warning: model_source: /flare/datasets/model-weights/hub/models--meta-llama"
               "--Llama-3.3-70B-Instruct is not visible here; it is checked on the first node "
               "before staging\n")


def test_qsub_missing_is_one_line_exit_1_and_writes_nothing(tmp_path, monkeypatch, fake_batch):
    monkeypatch.chdir(tmp_path)
    fake_batch.remove("qsub")
    result = invoke("submit", "-c", EXAMPLE)
    assert result.exit_code == 1
    assert result.stderr == (NOT_VISIBLE + "aegis: error: qsub not found on PATH: not a PBS "
                             "login node? (use --dry-run to print the script without "
                             "submitting)\n")
    assert not (tmp_path / "aegis-runs").exists()


def test_qsub_failing_shows_its_stderr_and_keeps_run_dir(tmp_path, monkeypatch, fake_batch):
    monkeypatch.chdir(tmp_path)
    fake_batch.answer("qsub", err="qsub: Unknown queue\n", exit=3)
    result = invoke("submit", "-c", EXAMPLE)
    assert result.exit_code == 1
    (run_dir,) = (tmp_path / "aegis-runs").iterdir()
    assert result.stderr == (NOT_VISIBLE + f"aegis: error: qsub failed (exit 3): qsub: Unknown "
                             f"queue (run directory kept: {run_dir})\n")
    assert sorted(os.listdir(run_dir)) == ["config.yaml", "job.sh"]


def test_two_submits_get_distinct_run_dirs(tmp_path, monkeypatch, fake_batch):
    monkeypatch.chdir(tmp_path)
    fake_batch.answer("qsub", out="1\n")
    assert invoke("submit", "-c", EXAMPLE).exit_code == 0
    assert invoke("submit", "-c", EXAMPLE).exit_code == 0
    assert len(list((tmp_path / "aegis-runs").iterdir())) == 2


@pytest.mark.parametrize("qstat_out,expected", [
    ("Job Id: 1.pbs\n    job_state = R\n    queue = debug\n", "running"),
    ("Job Id: 1.pbs\n    job_state = Q\n", "queued"),
    ("Job Id: 1.pbs\n    job_state = F\n    Exit_status = 0\n", "completed"),
    ("Job Id: 1.pbs\n    job_state = F\n    Exit_status = 271\n", "failed"),
    ("Job Id: 1.pbs\n    job_state = C\n", "completed"),
])
def test_status_pbs(fake_batch, qstat_out, expected):
    fake_batch.answer("qstat", out=qstat_out)
    result = invoke("status", "1.pbs", "--platform", "aurora")
    assert (result.exit_code, result.stdout) == (0, f"{expected}\n")
    assert fake_batch.argv("qstat") == ["-f", "1.pbs"]


def test_status_pbs_unknown_job(fake_batch):
    fake_batch.answer("qstat", err="qstat: Unknown Job Id 9\n", exit=153)
    result = invoke("status", "9", "--scheduler", "pbs")
    assert (result.exit_code, result.stdout) == (0, "unknown\n")
    assert fake_batch.argv("qstat") == ["-x", "-f", "9"]


@pytest.mark.parametrize("squeue_out,sacct_out,scontrol_out,expected", [
    ("RUNNING\n", "", "", "running"),
    ("PENDING\n", "", "", "queued"),
    ("", "CANCELLED by 0\n", "", "cancelled"),
    ("", "COMPLETED\n", "", "completed"),
    ("", "TIMEOUT\n", "", "failed"),
    ("", "", "JobId=42 JobName=aegis JobState=CANCELLED Reason=None\n", "cancelled"),
    ("", "", "", "unknown"),
])
def test_status_slurm(fake_batch, squeue_out, sacct_out, scontrol_out, expected):
    fake_batch.answer("squeue", out=squeue_out)
    fake_batch.answer("sacct", out=sacct_out)
    fake_batch.answer("scontrol", out=scontrol_out)
    result = invoke("status", "42", "--scheduler", "slurm")
    assert (result.exit_code, result.stdout) == (0, f"{expected}\n")


def test_status_from_run_dir(tmp_path, monkeypatch, fake_batch):
    monkeypatch.chdir(tmp_path)
    fake_batch.answer("sbatch", out="88\n")
    assert invoke("submit", "-c", str(EXAMPLES / "frontier.yaml")).exit_code == 0
    (run_dir,) = (tmp_path / "aegis-runs").iterdir()
    fake_batch.answer("squeue", out="RUNNING\n")
    result = invoke("status", str(run_dir))
    assert result.stdout == ("job 88 (slurm): running; 0/9 instance(s) ready; starting "
                             "(no endpoints file yet)\n")
    assert fake_batch.argv("squeue") == ["-h", "-j", "88", "-o", "%T"]


def test_cancel_both_backends(fake_batch):
    assert invoke("cancel", "5.pbs", "--scheduler", "pbs").exit_code == 0
    assert fake_batch.argv("qdel") == ["5.pbs"]
    assert invoke("cancel", "6", "--scheduler", "slurm").exit_code == 0
    assert fake_batch.argv("scancel") == ["6"]


@pytest.mark.parametrize("present,expected", [
    (("qstat",), "pbs"), (("squeue",), "slurm"),
    ((), "neither qstat nor squeue is on PATH"), (("qstat", "squeue"), "both qstat and squeue are on PATH"),
])
def test_bare_job_id_asks_the_batch_system_on_path(fake_batch, present, expected):
    for command in ("qstat", "squeue"):
        if command not in present:
            (fake_batch.bin_dir / command).unlink()
    fake_batch.answer("qstat", out="Job Id: 7\n    job_state = R\n")
    fake_batch.answer("squeue", out="PENDING\n")
    result = invoke("status", "7")
    if expected in ("pbs", "slurm"):
        assert (result.exit_code, result.stdout) == (0, "running\n" if expected == "pbs" else "queued\n")
    else:
        assert result.exit_code == 2
        assert result.stderr == (f"aegis: error: 7: no such run directory; as a job id: "
                                 f"{expected}; say which with --scheduler pbs|slurm\n")


def test_cancel_failure_exit_1(fake_batch):
    fake_batch.answer("scancel", err="scancel: error: Invalid job id 6\n", exit=1)
    result = invoke("cancel", "6", "--scheduler", "slurm")
    assert result.exit_code == 1
    assert result.stderr == ("aegis: error: scancel 6 failed (exit 1): scancel: error: "
                             "Invalid job id 6\n")


def test_bad_job_id_is_exit_2(fake_batch):
    result = invoke("cancel", "-rf")
    assert result.exit_code == 2
    assert fake_batch.argv("qdel") is None


def _installed_aegis() -> str:
    path = Path(sys.executable).parent / "aegis"
    if not path.exists():  # a missing install must fail, not skip
        pytest.fail(f"{path} not found: install the package (scripts/setup-dev)")
    return str(path)


def test_installed_command_dry_run_and_error(tmp_path):
    aegis = _installed_aegis()
    ok = subprocess.run([aegis, "submit", "-c", EXAMPLE, "--dry-run"], capture_output=True,
                        text=True, cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith("#!/bin/bash\n")
    bad = subprocess.run([aegis, "submit", "--model", "m", "--instances", "0", "--dry-run"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr == "aegis: error: instances (--instances): 0 is out of range; must be between 1 and 65535\n"
    assert os.listdir(tmp_path) == []


def test_stage_with_a_missing_source_is_bad_input(tmp_path):
    # One rank (no mpiexec): the collective is just this process.
    result = subprocess.run([sys.executable, "-m", "aegis", "stage", "-q", str(tmp_path / "nope"),
                             str(tmp_path / "dest")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("aegis: error: stage failed: staging failed on rank 0 (")
    assert result.stderr.rstrip().endswith("No such file or directory")
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "dest").exists()
