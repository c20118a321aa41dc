"""`aegis submit` end to end on the real test cluster, for both backends:

submit (sbatch, or the PBS script through slurm-wlm-torque's qsub) -> a 2-node job whose batch
script runs `python -m aegis.launch` as one MPI job, one rank per node -> the tiny model dir is
staged with the broadcast -> stand-in vLLM instances start -> endpoints file -> a completion
from every endpoint -> `aegis cancel` -> no job process left in the process table.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import pytest
import slurm_jobs as sj
import yaml
from harness import aegis_argv
from ports import free_port_block

pytestmark = pytest.mark.slurm

STANDIN = sj.REPO / "tests" / "standin_vllm.py"
MODEL = "aegis-test/tiny-standin"
NODES = 2


def job_env(venv_bin: Path) -> dict[str, str]:
    """What the submitting shell has (sbatch/qsub export it into the job): the venv first on
    PATH, so the batch script's `mpiexec` is PyPI mpich's hydra, and this tree importable."""
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(sj.REPO / "src"), env.get("PYTHONPATH"))
                                        if p)
    return env


def make_model_dir(root: Path) -> Path:
    """A small HF-style model directory with nested files and random (seeded) weights."""
    rng = random.Random(1234)
    model = root / "tiny-model"
    (model / "nested").mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (model / "model.safetensors").write_bytes(rng.randbytes(3 * 1024 * 1024 + 17))
    (model / "nested" / "tokenizer.json").write_text(json.dumps({"vocab": list("abcdef")}))
    return model


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def deployment(tmp_path):
    """Config for a 2-node deployment of stand-in instances on platform `local`."""
    from aegis.platforms import get_platform

    devices = get_platform("local").devices_per_node
    model_dir = make_model_dir(tmp_path)
    cache_name = f"aegis-it-{os.getpid()}-{tmp_path.name}"
    config = {
        "model": MODEL,
        "instances": NODES,
        # one instance fills a node, so NODES instances need NODES nodes on any machine
        "tensor_parallel_size": devices,
        "model_source": str(model_dir),
        "platform": "local",
        # node-local, as on a real cluster: the launcher expands $VARS in hf_home on each node.
        # (Not $TMPDIR: hydra's mpiexec hands the batch step's TMPDIR to every rank.)
        "hf_home": f"{sj.PREFIX}/nodes/$SLURMD_NODENAME/tmp/{cache_name}/hf_home",
        "run_dir": str(tmp_path / "runs"),
        "port_start": free_port_block(NODES + 1),  # the instances, then the router
        "vllm_command": f"{sys.executable} {STANDIN} serve",
        "startup_timeout": 120,
        "walltime": "00:10:00",
        "job_name": f"aegis-it-{tmp_path.name[-12:]}",
    }
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(config))
    yield {"path": path, "config": config, "model_dir": model_dir, "root": tmp_path,
           "cache_name": cache_name}
    for node_cache in sj.PREFIX.glob(f"nodes/*/tmp/{cache_name}"):
        shutil.rmtree(node_cache, ignore_errors=True)


def submit(venv_bin, deployment, *flags: str) -> tuple[str, Path]:
    proc = sj.run([*aegis_argv(), "submit", "-c", deployment["path"], *flags],
                  check=False, env=job_env(venv_bin), cwd=deployment["root"])
    assert proc.returncode == 0, f"aegis submit exited {proc.returncode}: {proc.stderr}"
    job_id = proc.stdout.strip()
    assert job_id and job_id.split(".")[0].isdigit(), f"stdout should be the job id: {proc.stdout!r}"
    run_dirs = list(Path(deployment["config"]["run_dir"]).iterdir())
    assert len(run_dirs) == 1, run_dirs
    assert str(run_dirs[0]) in proc.stderr, proc.stderr
    return job_id, run_dirs[0]


def job_log(run_dir: Path) -> str:
    """The batch job's output, wherever the batch system put it (for failure messages)."""
    # slurm-wlm-torque's qsub always passes its own -o/-e to sbatch, overriding the script's
    # "#PBS -o": a PBS job's output lands in job.sh.o<id> / job.sh.e<id> instead of job.log.
    logs = sorted(run_dir.glob("job.log")) + sorted(run_dir.glob("job.sh.[oe]*"))
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-4000:]}" for p in logs) or "no job log"


def wait_endpoints(run_dir: Path, job_id: str, timeout: float = 180.0) -> dict:
    path = run_dir / "endpoints.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            data = json.loads(path.read_text())  # written atomically by the launcher
            if data.get("total") and data.get("ready") == data["total"]:
                return data
        if sj.job_state(job_id) in sj.FINISHED:
            break
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} ({sj.job_state(job_id)}): no complete endpoints file at "
                         f"{path} after {timeout:.0f} s\n{job_log(run_dir)}")


def run_key(run_dir) -> str:
    """The key the run's instances and routers require (made by its launcher)."""
    from aegis.run import Run

    return Run.open(run_dir).api_key()


def complete(base_url: str, model: str, key: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key, timeout=30, max_retries=0)
    reply = client.completions.create(model=model, prompt="Hello", max_tokens=1)
    return reply.choices[0].text


def instance_processes(token: str) -> dict[int, str]:
    """HTTP port -> SLURMD_NODENAME of the stand-in instance processes of this test."""
    found = {}
    for pid, cmdline in sj.processes_with(token):
        words = cmdline.split()
        if str(STANDIN) not in words or "--port" not in words:
            continue
        env = dict(item.split("=", 1) for item in
                   Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                   if "=" in item)
        found[int(words[words.index("--port") + 1])] = env.get("SLURMD_NODENAME", "")
    return found


def check_running_deployment(job_id: str, run_dir: Path, deployment) -> None:
    endpoints = wait_endpoints(run_dir, job_id)
    nodes = sj.job_nodes(job_id)
    assert len(nodes) == NODES, nodes
    instances = endpoints["instances"]
    assert endpoints["job"] == job_id
    assert [i["state"] for i in instances] == ["ready"] * NODES, instances
    # instance i on node i of the allocation, each at its planned port
    port0 = deployment["config"]["port_start"]
    assert [(i["host"], i["port"]) for i in instances] == [(nodes[k], port0 + k) for k in range(NODES)]
    assert (run_dir / "endpoints.txt").read_text().split() == [f"{n}:{port0 + k}" for k, n in enumerate(nodes)]

    # every endpoint answers a real completion
    for inst in instances:
        assert complete(inst["base_url"], inst["served_name"], run_key(run_dir)), inst

    # one launcher rank per node: each instance runs inside the Slurm task of its own node
    assert instance_processes(str(deployment["root"])) == {port0 + k: n for k, n in enumerate(nodes)}

    # the model directory was staged (broadcast) into every node's own cache, byte for byte
    from aegis.launch.instances import staged_model_dir

    source = tree_digest(deployment["model_dir"])
    for node in nodes:
        hf_home = sj.PREFIX / "nodes" / node / "tmp" / deployment["cache_name"] / "hf_home"
        staged = tree_digest(Path(staged_model_dir(str(hf_home), MODEL)))
        assert staged.pop(".aegis-manifest.json", None), f"no staging manifest on {node}"
        assert staged == source, node


def cancel_and_check_nothing_left(venv_bin, job_id: str, run_dir: Path, token: str, scheduler: str):
    proc = sj.run([*aegis_argv(), "cancel", "--scheduler", scheduler, job_id],
                  check=False, env=job_env(venv_bin))
    assert proc.returncode == 0, proc.stderr
    assert sj.wait_finished(job_id) == "CANCELLED"
    left = sj.wait_no_processes(token, timeout=30)
    assert left == [], f"processes left after cancelling job {job_id}: {left}"
    status = json.loads(sj.run([*aegis_argv(), "status", "--json", "--scheduler", scheduler,
                                job_id], env=job_env(venv_bin)).stdout)
    # No longer active. How it ended is all the batch system can say: the test cluster has no
    # accounting (no sacct: Slurm says "unknown" once the job left squeue), and the Torque-style
    # qstat says job_state C (completed) for a deleted job.
    assert status["job_state"] in {"cancelled", "completed", "unknown"}, status
    assert status.get("phase", "ended") == "ended", status


def test_submit_slurm_two_nodes_endpoints_then_cancel(deployment, jobs, venv_bin):
    job_id, run_dir = submit(venv_bin, deployment, "--scheduler", "slurm")
    jobs.append(job_id)
    script = (run_dir / "job.sh").read_text()
    assert "#SBATCH -N 2" in script and "-m aegis.launch" in script, script
    assert sj.wait_state(job_id, {"RUNNING"} | sj.FINISHED) == "RUNNING", job_log(run_dir)

    check_running_deployment(job_id, run_dir, deployment)
    cancel_and_check_nothing_left(venv_bin, job_id, run_dir, str(deployment["root"]), "slurm")


def test_submit_wait_endpoints_router_completion_cancel(deployment, jobs, venv_bin):
    """What a user does: submit --wait -> endpoints --json -> a completion through the router
    -> cancel -> nothing left."""
    env = job_env(venv_bin)
    proc = sj.run([*aegis_argv(), "submit", "-c", deployment["path"], "--scheduler", "slurm",
                   "--wait", "--timeout", "180"], check=False, env=env, cwd=deployment["root"])
    (run_dir,) = Path(deployment["config"]["run_dir"]).iterdir()
    job_id = (run_dir / "job.id").read_text().strip()
    jobs.append(job_id)
    assert proc.returncode == 0, f"{proc.stderr}\n{job_log(run_dir)}"
    router = proc.stdout.strip()
    nodes = sj.job_nodes(job_id)
    router_port = deployment["config"]["port_start"] + NODES
    assert router == f"http://{nodes[0]}:{router_port}/v1", proc.stdout  # on the first node

    records = json.loads(sj.run([*aegis_argv(), "endpoints", str(run_dir), "--json"],
                                env=env).stdout)
    assert [(r["host"], r["node"], r["state"]) for r in records] == [
        (n, k, "ready") for k, n in enumerate(nodes)]
    assert sj.run([*aegis_argv(), "endpoints", job_id, "--router", "--scheduler", "slurm"],
                  env=env).stdout.strip() == router  # a job id finds its run directory
    served = {complete_by(router, MODEL, run_key(run_dir)) for _ in range(8)}
    port0 = deployment["config"]["port_start"]
    assert served == {f"standin-{port0 + k}" for k in range(NODES)}  # both nodes, routed

    assert sj.run([*aegis_argv(), "cancel", str(run_dir)], check=False,
                  env=env).returncode == 0
    assert sj.wait_finished(job_id) == "CANCELLED"
    left = sj.wait_no_processes(str(deployment["root"]), timeout=30)
    assert left == [], f"processes left after cancelling job {job_id}: {left}"
    assert not sj.processes_with(f"--port {router_port}"), "the router outlived the job"
    status = json.loads(sj.run([*aegis_argv(), "status", str(run_dir), "--json"],
                               env=env).stdout)
    assert status["phase"] == "ended" and status["ready"] == 0, status


def complete_by(base_url: str, model: str, key: str) -> str:
    """Which server answered a completion (the stand-in names itself)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key, timeout=30, max_retries=0)
    return client.completions.create(model=model, prompt="Hello", max_tokens=1).system_fingerprint


def test_submit_pbs_script_through_qsub(deployment, jobs, venv_bin):
    job_id, run_dir = submit(venv_bin, deployment, "--scheduler", "pbs")
    jobs.append(job_id)
    script = (run_dir / "job.sh").read_text()
    assert "#PBS -l select=2" in script and "-m aegis.launch" in script, script
    assert "#SBATCH" not in script
    sj.wait_state(job_id, {"RUNNING"} | sj.FINISHED)

    check_running_deployment(job_id, run_dir, deployment)
    assert sj.qstat_full(job_id)["job_state"] == "R"
    status = json.loads(sj.run([*aegis_argv(), "status", "--json", "--scheduler", "pbs", job_id],
                               env=job_env(venv_bin)).stdout)
    assert status["job_state"] == "running", status
    # the launcher found its nodes in PBS_NODEFILE (written by the cluster's TaskProlog)
    assert "from PBS_NODEFILE" in job_log(run_dir)

    cancel_and_check_nothing_left(venv_bin, job_id, run_dir, str(deployment["root"]), "pbs")
    assert sj.qstat_full(job_id)["job_state"] == "C"


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_submit_refused_by_the_scheduler_exits_1_and_keeps_the_run_dir(deployment, venv_bin,
                                                                       scheduler):
    name = deployment["config"]["job_name"]
    proc = sj.run([*aegis_argv(), "submit", "-c", deployment["path"], "--scheduler",
                   scheduler, "--queue", "no-such-queue"],
                  check=False, env=job_env(venv_bin), cwd=deployment["root"])
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert "invalid partition" in proc.stderr.lower(), proc.stderr  # the scheduler's own words
    run_dirs = list(Path(deployment["config"]["run_dir"]).iterdir())
    assert len(run_dirs) == 1 and str(run_dirs[0]) in proc.stderr, (run_dirs, proc.stderr)
    assert (run_dirs[0] / "job.sh").exists() and (run_dirs[0] / "config.yaml").exists()
    assert not (run_dirs[0] / "job.id").exists()
    assert name not in sj.run(["squeue", "-h", "-o", "%j"]).stdout
