"""The launcher as MPI ranks: every rank of this pytest job runs aegis.launch.run_rank in
process (rank r plays node r), staging a tiny model directory through aegis.bcast first."""

import json
import os
import sys
from pathlib import Path

import pytest

from aegis.launch.__main__ import main as run_rank  # one rank, in this process

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


def _hub_cache(where: Path, files: dict, rev: str) -> Path:
    """models--ORG--NAME as the hub writes it: blobs, relative links in snapshots/<rev>."""
    (where / "refs").mkdir(parents=True)
    (where / "refs" / "main").write_text(rev)
    (where / "blobs").mkdir()
    (where / "snapshots" / rev).mkdir(parents=True)
    for i, (name, data) in enumerate(files.items()):
        (where / "blobs" / f"blob{i}").write_bytes(data)
        os.symlink(f"../../blobs/blob{i}", where / "snapshots" / rev / name)
    return where


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("form", ["plain", "hub-cache", "snapshot"])
def test_every_model_source_form_stages_and_serves(comm, shared_tmp, form):
    """The stand-in, like vLLM, refuses a directory without config.json at its top: a
    hub-cache directory served as it is fails there, after the whole broadcast."""
    files = {"config.json": b'{"architectures": ["LlamaForCausalLM"]}',
             "model.safetensors": bytes(range(256)) * 800, "tokenizer.json": b"{}"}  # same on every rank
    rev = "c0ffee" * 6 + "c0ff"
    hub = shared_tmp / "models--org--Tiny"
    if comm.rank == 0:
        if form == "plain":
            (shared_tmp / "plain").mkdir()
            for name, data in files.items():
                (shared_tmp / "plain" / name).write_bytes(data)
        else:
            _hub_cache(hub, files, rev)
    source = {"plain": shared_tmp / "plain", "hub-cache": hub,
              "snapshot": hub / "snapshots" / rev}[form]
    config = shared_tmp / "aegis.yaml"
    port = _port_block(comm, 2)
    if comm.rank == 0:
        config.write_text(json.dumps({
            "platform": "local", "port_start": port, "hf_home": str(shared_tmp / "hf"),
            "internal_port_start": 31000,
            "vllm_command": f"{sys.executable} {STANDIN} serve", "startup_timeout": 30,
            "models": [{"name": "org/Tiny", "instances": 2, "model_source": str(source)}]}))
    comm.Barrier()
    code = run_rank(["--config", str(config), "--run-dir", str(shared_tmp / "run"), "--once",
                     "--poll-interval", "0.2", "--stop-grace", "3"])
    assert comm.allgather(code) == [0] * comm.size
    staged = shared_tmp / "hf" / "aegis-models" / "org--Tiny"
    loaded = staged if form == "plain" else staged / "snapshots" / rev
    for name, data in files.items():  # every file arrives, links resolve inside the copy
        assert (loaded / name).read_bytes() == data
        assert (loaded / name).resolve().is_relative_to(staged)
    log = (shared_tmp / "run" / "logs" / "instance-0000.log").read_text()
    assert f"'serve', '{loaded}'" in log


@pytest.mark.mpi(min_size=2)
def test_a_bad_model_source_stops_every_rank_before_any_byte_moves(comm, shared_tmp, capfd):
    hub = shared_tmp / "models--org--Tiny"
    if comm.rank == 0:
        _hub_cache(hub, {"config.json": b"{}"}, "abc")
        (hub / "refs" / "main").write_text("def")  # names a snapshot that is not there
    config = shared_tmp / "aegis.yaml"
    if comm.rank == 0:
        config.write_text(json.dumps({
            "platform": "local", "hf_home": str(shared_tmp / "hf"),
            "vllm_command": f"{sys.executable} {STANDIN} serve",
            "models": [{"name": "org/Tiny", "instances": 4, "model_source": str(hub)}]}))
    comm.Barrier()
    code = run_rank(["--config", str(config), "--run-dir", str(shared_tmp / "run"), "--once"])
    assert comm.allgather(code) == [2] * comm.size
    err = capfd.readouterr().err
    expected = (f"aegis launch: error: model_source: {hub}: refs/main names revision def but "
                "snapshots/def is missing\n")
    assert err == (expected if comm.rank == 0 else "")
    assert not (shared_tmp / "hf").exists() and not (shared_tmp / "run").exists()
