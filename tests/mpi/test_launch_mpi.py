"""The launcher as MPI ranks: every rank of this pytest job runs aegis.launch.run_rank in
process (rank r plays node r), staging a tiny model directory through aegis.bcast first."""

import json
import os
import sys
from pathlib import Path

import pytest

from aegis.launch import run_rank

from ports import free_port_block

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests" / "standin_vllm.py"


def _port_block(comm, n):
    """Free HTTP ports below the ephemeral range (32768+), chosen by rank 0."""
    base = None
    if comm.rank == 0:
        base = free_port_block(n)
    return comm.bcast(base, root=0)


@pytest.mark.mpi(min_size=2)
def test_launch_stages_the_model_then_starts_instances_on_two_nodes(comm, shared_tmp, capsys):
    source = shared_tmp / "src-model"
    if comm.rank == 0:
        source.mkdir()
        (source / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (source / "model.safetensors").write_bytes(os.urandom(300_000))
        (source / "tokenizer").mkdir()
        (source / "tokenizer" / "tokenizer.json").write_text("{}")
    comm.Barrier()
    port = _port_block(comm, 4)
    config = shared_tmp / "aegis.yaml"
    hf_home = shared_tmp / "hf"
    if comm.rank == 0:
        config.write_text(json.dumps({
            "platform": "local", "port_start": port, "hf_home": str(hf_home),
            "internal_port_start": 31000,
            "vllm_command": f"{sys.executable} {STANDIN} serve", "startup_timeout": 30,
            "models": [{"name": "org/Tiny", "served_model_name": "tiny", "instances": 4,
                        "model_source": str(source)}]}))
    comm.Barrier()

    def launch(run):
        return run_rank(["--config", str(config), "--run-dir", str(shared_tmp / run), "--once",
                         "--poll-interval", "0.2", "--stop-grace", "3"])

    codes = comm.allgather(launch("run1"))
    assert codes == [0] * comm.size
    staged = hf_home / "aegis-models" / "org--Tiny"
    assert (staged / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert (staged / "tokenizer" / "tokenizer.json").is_file()
    doc = json.loads((shared_tmp / "run1" / "endpoints.json").read_text())
    # all 4 were verified ready (exit 0); --once then stopped them, and the file says so
    assert doc["total"] == 4 and doc["launcher"]["ranks"] == comm.size
    assert [i["state"] for i in doc["instances"]] == ["stopped"] * 4
    # local has 2 one-core devices per node: 4 instances on nodes 0 and 1 (ranks 0 and 1)
    assert [i["node"] for i in doc["instances"]] == [0, 0, 1, 1]
    for k in range(4):
        log = (shared_tmp / "run1" / "logs" / f"instance-{k:04d}.log").read_text()
        assert f"'serve', '{staged}'" in log  # the instance was pointed at the staged copy
    first = capsys.readouterr().err

    codes = comm.allgather(launch("run2"))  # same source again: staging moves nothing
    assert codes == [0] * comm.size
    second = capsys.readouterr().err
    if comm.rank == 0:
        assert "MB in" in first and f"staged {source} -> {staged} (unchanged, not moved)" in second
