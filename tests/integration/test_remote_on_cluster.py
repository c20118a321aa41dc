"""From a laptop to the real test cluster through a real login node (tests/login_node.py: sshd
on loopback, a user of its own): `aegis submit --remote --wait` (the config sent over the
connection, sbatch run there as that user) -> `aegis endpoints --remote --json` -> `aegis
forward` -> a completion with the OpenAI SDK through the tunnel -> `aegis cancel --remote`
-> the job cancelled, no process of it left, no ssh left on the laptop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import slurm_jobs as sj
from login_node import LoginNode, require
from ports import free_port_block

pytestmark = pytest.mark.slurm

STANDIN = sj.REPO / "tests" / "standin_vllm.py"
HOST = "aegis-login"


@pytest.fixture(scope="module")
def login():
    why = require()
    if why:
        pytest.fail(f"the --remote cluster test cannot run: {why}")
    node = LoginNode()
    yield node
    node.close()


def aegis(login, *args, env=None, timeout=300, **popen):
    argv = [sys.executable, "-m", "aegis", *args]
    full = login.laptop_env(**(env or {}))
    if popen.pop("popen", False):
        return subprocess.Popen(argv, env=full, **popen)
    return subprocess.run(argv, env=full, capture_output=True, text=True, timeout=timeout)


def test_submit_remote_wait_forward_cancel(login, tmp_path, jobs):
    standin = login.home / "standin_vllm.py"
    standin.write_bytes(STANDIN.read_bytes())
    os.chown(standin, login.uid, login.uid)
    from aegis.platforms import get_platform

    config = {  # paths name files on the login node: the user's home
        "platform": "local", "model": "org/tiny", "served_model_name": "tiny",
        "tensor_parallel_size": get_platform("local").devices_per_node,  # one whole node
        "port_start": free_port_block(1), "router": False,
        "node_local_dir": f"{login.home}/nl/$SLURMD_NODENAME",
        "vllm_command": f"{login.python} {standin} serve",
        "startup_timeout": 120, "walltime": "00:10:00", "job_name": "aegisRemote",
    }
    (tmp_path / "fleet.yaml").write_text(json.dumps(config))
    remote_aegis = login.aegis_command(SLURM_CONF=str(sj.SLURM_CONF),
                                       PATH=f"{Path(login.python).parent}:/usr/bin:/bin")
    env = {"AEGIS_REMOTE": HOST, "AEGIS_REMOTE_AEGIS": remote_aegis}
    done = aegis(login, "submit", "-c", str(tmp_path / "fleet.yaml"), "--wait", "--timeout",
                 "150", env=env)
    run_dirs = [p for p in (login.home / "aegis-runs").iterdir() if p.name != ".incoming"]
    for run_dir in run_dirs:
        if (run_dir / "job.id").exists():
            jobs.append((run_dir / "job.id").read_text().strip())
    logs = "".join((p / "job.log").read_text(errors="replace")[-3000:] for p in run_dirs
                   if (p / "job.log").exists())
    assert done.returncode == 0, f"{done.stderr}\n--- job.log\n{logs}"
    (run_dir,) = run_dirs
    run = f"aegis-runs/{run_dir.name}"
    assert done.stdout.strip().startswith("http://") and done.stdout.strip().endswith("/v1")
    assert (run_dir / "config.yaml").stat().st_uid == login.uid  # made there, by that user
    assert list((login.home / "aegis-runs" / ".incoming").iterdir()) == []

    listed = aegis(login, "endpoints", "--json", run, env=env)
    assert listed.returncode == 0, listed.stderr
    (record,) = json.loads(listed.stdout)
    assert record["state"] == "ready" and record["host"].startswith("node")
    key = aegis(login, "key", run, env=env).stdout.strip()

    forward = aegis(login, "forward", run, popen=True, env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    try:
        url = forward.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), forward.stderr.read() if not url else url
        from openai import OpenAI

        client = OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)
        assert client.completions.create(model="tiny", prompt="Hello", max_tokens=2).choices
        client.close()
    finally:
        forward.send_signal(signal.SIGINT)
        assert forward.wait(15) == 0

    cancelled = aegis(login, "cancel", run, "--wait", "--timeout", "60", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert sj.wait_finished(jobs[0]) in sj.FINISHED
    left = sj.wait_no_processes(str(standin), timeout=30)
    assert left == [], f"processes left after cancelling job {jobs[0]}: {left}"
    login.wait_for(lambda: not login.processes(), 30, "the login node's processes to end")
    login.close_masters()
    assert login.ssh_clients() == {}
