"""The test cluster itself does what the product relies on: multi-node sbatch jobs, one MPI rank
per node (srun and the venv's hydra mpiexec), PBS-style qsub/qstat/qdel with PBS_NODEFILE,
cancel ending every job process, and clear failures for a bad partition or queue."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
import slurm_jobs as sj

pytestmark = pytest.mark.slurm

# Each rank writes its MPI rank/size and the Slurm node it runs on to its own file in argv[1]
# (ranks' stdout lines interleave).
MPI_PROBE = ("import json, os, sys; from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "open(os.path.join(sys.argv[1], str(c.rank)), 'w').write("
             "json.dumps([c.rank, c.size, os.environ.get('SLURMD_NODENAME')]))")


def write_script(path, body: str):
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def ranks_in(directory) -> list[list]:
    return sorted(json.loads(p.read_text()) for p in directory.iterdir())


def test_sbatch_two_nodes_one_mpi_rank_per_node(tmp_path, jobs, venv_bin):
    out = tmp_path / "job.out"
    script = write_script(tmp_path / "job.sh", f"""
        #!/bin/bash
        #SBATCH -N 2
        #SBATCH -t 00:05:00
        #SBATCH -J aegis-smoke
        #SBATCH -o {out}
        set -e
        echo "nodelist $SLURM_JOB_NODELIST"
        echo "nodefile $(tr '\\n' ' ' < "$PBS_NODEFILE")"
        mkdir {tmp_path}/srun {tmp_path}/hydra
        srun -N 2 --ntasks-per-node=1 {venv_bin}/python -c "{MPI_PROBE}" {tmp_path}/srun
        {venv_bin}/mpiexec -n 2 -ppn 1 {venv_bin}/python -c "{MPI_PROBE}" {tmp_path}/hydra
    """)
    job_id = sj.sbatch(script, cwd=tmp_path)
    jobs.append(job_id)
    assert sj.wait_finished(job_id) == "COMPLETED", out.read_text() if out.exists() else "no output"
    text = out.read_text()
    nodes = sj.job_nodes(job_id)
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    assert f"nodefile {' '.join(nodes)} " in text, text  # PBS_NODEFILE from the TaskProlog
    # one MPI job of 2 ranks, rank r on the r-th node, with both launchers
    expected = [[0, 2, nodes[0]], [1, 2, nodes[1]]]
    assert ranks_in(tmp_path / "srun") == expected, text
    assert ranks_in(tmp_path / "hydra") == expected, text


def test_qsub_pbs_script_qstat_and_qdel(tmp_path, jobs):
    started = tmp_path / "started"
    token = f"aegis-qsub-sleeper-{tmp_path.name}"
    script = write_script(tmp_path / "pbs_job.sh", f"""
        #!/bin/bash
        #PBS -l select=2
        #PBS -l walltime=00:05:00
        #PBS -N aegis-pbs-smoke
        {{ echo "$PBS_JOBID"; cat "$PBS_NODEFILE"; }} > {started}.tmp && mv {started}.tmp {started}
        exec -a {token} sleep 300
    """)
    job_id = sj.qsub(script, "-j", "oe", "-o", str(tmp_path / "pbs_job.out"), cwd=tmp_path)
    jobs.append(job_id)
    lines = sj.wait_for_file(started, 30, job_id).split()
    assert lines[0] == job_id  # PBS_JOBID from spank_pbs
    assert len(lines[1:]) == 2 and lines[1:] == sj.job_nodes(job_id)  # PBS_NODEFILE, one line per node
    info = sj.qstat_full(job_id)
    assert info["job_state"] == "R", info
    assert info["Resource_List.nodect"] == "2", info
    assert sj.processes_named(token), "the job's sleeper should be running"

    sj.run(["qdel", job_id])
    assert sj.wait_state(job_id, {"CANCELLED"}) == "CANCELLED"
    assert sj.qstat_full(job_id)["job_state"] == "C"
    assert sj.wait_no_processes(token) == []


def test_scancel_ends_every_task_on_every_node(tmp_path, jobs):
    token = f"aegis-srun-sleeper-{tmp_path.name}"
    script = write_script(tmp_path / "job.sh", f"""
        #!/bin/bash
        #SBATCH -N 2
        #SBATCH -o {tmp_path}/job.out
        srun -N 2 --ntasks-per-node=1 bash -c 'exec -a {token} sleep 300'
    """)
    job_id = sj.sbatch(script, cwd=tmp_path)
    jobs.append(job_id)
    sj.wait_state(job_id, {"RUNNING"})
    for _ in range(120):  # one sleeper per node
        if len(sj.processes_named(token)) == 2:
            break
        time.sleep(0.25)
    assert len(sj.processes_named(token)) == 2, sj.processes_with(token)
    sj.cancel(job_id)
    assert sj.wait_finished(job_id) == "CANCELLED"
    assert sj.wait_no_processes(token) == []


@pytest.mark.parametrize("submit", [
    ["sbatch", "-p", "no-such-partition"],
    ["qsub", "-q", "no-such-queue"],
])
def test_bad_partition_or_queue_is_refused_with_a_reason(tmp_path, submit):
    script = write_script(tmp_path / "job.sh", "#!/bin/bash\ntrue\n")
    proc = sj.run([*submit, script], check=False, cwd=tmp_path)
    assert proc.returncode != 0
    # slurm-wlm-torque's qsub reports sbatch's error on stdout, not stderr: a backend must
    # pass both on
    said = proc.stderr + proc.stdout
    assert "invalid partition" in said.lower(), said
    assert not list(tmp_path.glob("*.o*")) and not list(tmp_path.glob("slurm-*.out"))
