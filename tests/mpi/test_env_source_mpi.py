"""env_source at 2 and 4 ranks: a real venv-pack'd environment holding the stand-in server is
broadcast to node-local storage, unpacked once per node, and the instances run from it."""

import json
import sys
from pathlib import Path

import pytest

from aegis.launch.__main__ import main as run_rank  # one rank, in this process

from packed_env import make_packed_env
from ports import free_port_block


@pytest.mark.mpi(min_size=2)
def test_packed_environment_is_staged_unpacked_once_and_serves(comm, shared_tmp, capsys):
    tarball = make_packed_env(shared_tmp) if comm.rank == 0 else None
    tarball = comm.bcast(tarball, root=0)
    instances = 2 * comm.size  # local: 2 one-core devices per node, so every rank has two
    port = comm.bcast(free_port_block(instances) if comm.rank == 0 else None, root=0)
    node_local = shared_tmp / "node-local"
    count = shared_tmp / "prewarm-count"
    config = shared_tmp / "aegis.yaml"
    if comm.rank == 0:
        config.write_text(json.dumps({
            "platform": "local", "port_start": port, "internal_port_start": 31000,
            "hf_home": str(shared_tmp / "hf"), "node_local_dir": str(node_local),
            "env_source": str(tarball), "vllm_command": "vllm serve", "startup_timeout": 30,
            "prewarm_command": f"bash -c 'echo $$ >> {count}'",
            "models": [{"name": "org/Tiny", "served_model_name": "tiny",
                        "instances": instances}]}))
    comm.Barrier()

    def unpacked():
        return sorted(d for d in (node_local / "aegis-env").iterdir()
                      if d.name.startswith("standin-env-"))

    def launch(run):
        return run_rank(["--config", str(config), "--run-dir", str(shared_tmp / run), "--once",
                         "--poll-interval", "0.2", "--stop-grace", "3"])

    codes = comm.allgather(launch("run1"))
    first = capsys.readouterr().err
    assert codes == [0] * comm.size, first

    def check_run1():
        env_dirs = unpacked()
        assert len(env_dirs) == 1 and (env_dirs[0] / ".aegis-unpacked.json").is_file()
        staged = node_local / "aegis-env" / "staged" / "standin-env" / "standin-env.tar.gz"
        assert staged.read_bytes() == Path(tarball).read_bytes()
        doc = json.loads((shared_tmp / "run1" / "endpoints.json").read_text())
        assert [i["state"] for i in doc["instances"]] == ["stopped"] * instances  # verified, then --once
        assert {i["node"] for i in doc["instances"]} == set(range(comm.size))
        if comm.rank == 0:
            assert f"{instances}/{instances} instances ready" in first
        for k in range(instances):
            log = (shared_tmp / "run1" / "logs" / f"instance-{k:04d}.log").read_text()
            # the server ran the unpacked environment's own interpreter, on node-local storage
            assert f"(python {env_dirs[0]}/bin/python)" in log, log
            assert sys.executable not in log
        # every rank plays a node on this one machine: one unpack, one pre-warm
        assert len(count.read_text().split()) == 1
        if comm.rank == 0:
            assert "MB in" in first  # the tarball was moved

    # every rank checks, then all agree: one rank's failure must not leave the others hanging
    failed = None
    try:
        check_run1()
    except AssertionError as e:
        failed = f"rank {comm.rank}: {e}"
    failures = [f for f in comm.allgather(failed) if f]
    assert not failures, failures
    # one rank unpacked for the node (whichever took the lock first); the others found it done
    assert sum(err.count("environment unpacked in") for err in comm.allgather(first)) == 1
    env_dirs = unpacked()

    codes = comm.allgather(launch("run2"))  # same tarball: nothing moved, nothing unpacked
    second = capsys.readouterr().err
    assert codes == [0] * comm.size, second
    if comm.rank == 0:
        assert "(unchanged, not moved)" in second and "environment already unpacked" in second
    assert unpacked() == env_dirs
