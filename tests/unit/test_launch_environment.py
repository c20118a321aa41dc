"""The environment forms: a packed environment unpacked once per node (atomically, conda-unpack
at its final place), and an Apptainer image run with the platform's flags and binds, through a
recording stand-in `apptainer` on PATH (Apptainer cannot be installed here)."""

import io
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from aegis.config import ConfigError, from_mapping
from aegis.launch.environment import (
    Runtime, runtime_for, source_name, staged_file, unpack_key, unpacked_dir)
from aegis.launch.instances import build_part, render_script
from aegis.launch.node import runtime_problem
from aegis.launch.pernode import NodeStepError, unpack_environment
from aegis.plan import make_plan
from aegis.platforms import get_platform

from test_launch_run import Run, _no_strays  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests" / "standin_vllm.py"

# conda-pack's conda-unpack rewrites prefixes for where it runs: record where that was.
CONDA_UNPACK = ("import os, sys\nhere = os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0])))\n"
                "open(os.path.join(here, 'unpacked-at'), 'w').write(here)\n")


def _unpack(args):
    tarball, node_local = args
    return unpack_environment(Path(tarball), node_local, "/lus/envs/env.tar.gz", timeout=30)


@pytest.fixture
def python_in_tarball(tmp_path, monkeypatch):
    """unpack_environment runs <env>/bin/python bin/conda-unpack: give the env a python."""
    def make():
        tb = tmp_path / "env.tar.gz"
        with tarfile.open(tb, "w:gz") as tar:
            for name, text in {"bin/conda-unpack": CONDA_UNPACK, "bin/activate": ""}.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("bin/python")
            link.type, link.linkname = tarfile.SYMTYPE, sys.executable
            tar.addfile(link)
        return tb
    return make


def test_unpack_once_per_node_conda_unpack_at_the_final_place(tmp_path, python_in_tarball):
    tarball = python_in_tarball()
    node_local = str(tmp_path / "local")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_unpack, [(str(tarball), node_local)] * 4)
    dirs = {r[0] for r in results}
    assert len(dirs) == 1 and sorted(r[1] for r in results) == [False, True, True, True]
    env = dirs.pop()
    assert env.parent == Path(node_local) / "aegis-env" and env.name.startswith("env-")
    # conda-unpack ran once the directory had its final name (prefixes point there)
    assert Path(env, "unpacked-at").read_text() == str(env)
    marker = json.loads((env / ".aegis-unpacked.json").read_text())
    assert marker["source"] == "/lus/envs/env.tar.gz"
    assert [p.name for p in env.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name] == []


def test_changed_tarball_unpacks_beside_the_old_one(tmp_path, python_in_tarball):
    tarball = python_in_tarball()
    first, _ = unpack_environment(tarball, str(tmp_path), "env.tar.gz", timeout=30)
    os.utime(tarball, ns=(1, 1))
    second, cached = unpack_environment(tarball, str(tmp_path), "env.tar.gz", timeout=30)
    assert not cached and second != first and first.is_dir()  # a running predecessor keeps its env


def test_an_unpack_killed_half_way_is_redone(tmp_path, python_in_tarball):
    tarball = python_in_tarball()
    st = tarball.stat()
    dest = unpacked_dir(str(tmp_path), "env.tar.gz", unpack_key(st.st_size, st.st_mtime_ns))
    dest.mkdir(parents=True)  # renamed into place, killed before its marker
    (dest / "half").write_text("x")
    leftover = dest.parent / f".{dest.name}.tmp-abc"
    leftover.mkdir()
    env, cached = unpack_environment(tarball, str(tmp_path), "env.tar.gz", timeout=30)
    assert env == dest and not cached and not (dest / "half").exists() and not leftover.exists()


def test_a_corrupt_tarball_is_one_line_and_leaves_nothing(tmp_path):
    bad = tmp_path / "env.tar.gz"
    bad.write_bytes(b"not a tarball at all")
    with pytest.raises(NodeStepError, match=r"unpacking env.tar.gz: exited with code 2: .*"):
        unpack_environment(bad, str(tmp_path / "l"), "env.tar.gz", timeout=30)
    assert [p for p in (tmp_path / "l" / "aegis-env").iterdir() if not p.name.endswith(".lock")] == []


def test_env_source_must_be_a_tarball_and_not_with_a_container():
    with pytest.raises(ConfigError, match=r"env_source: '/x/env.zip' is not a packed environment"):
        from_mapping({"model": "m", "env_source": "/x/env.zip"})
    with pytest.raises(ConfigError, match="container: cannot be combined with env_source"):
        from_mapping({"model": "m", "env_source": "/x/e.tar.gz", "container": "/x/v.sif"})


def test_source_names():
    assert source_name("/lus/envs/vllm-0.9.tar.gz") == "vllm-0.9"
    assert source_name("/lus/img/vllm rocm.sif") == "vllm_rocm"
    assert staged_file("/mnt/bb/u", "/o/v.sif") == Path("/mnt/bb/u/aegis-env/staged/v/v.sif")


def _container_parts(platform: str, tmp_path: Path, **cfg):
    config = from_mapping({"model": "org/M", "model_source": "/lus/m", "platform": platform,
                           "container": "/lus/images/vllm.sif", "hf_home": "/nl/hf",
                           "node_local_dir": "/nl", **cfg})
    plat = get_platform(platform)
    runtime = runtime_for(config, plat, node_local_dir="/nl", env_dir=None,
                          binds=["/nl/hf", "/nl/aegis-cache/j1"])
    plan = make_plan(config, plat)
    hosts = ["h0"] * plan.nodes_needed
    part = build_part(instance=plan.instances[0], model=config.models[0], config=config,
                      platform=plat, node_index=0, hosts=hosts, addresses=hosts, bind_host=None,
                      run_dir=str(tmp_path), cache_root=Path("/nl/aegis-cache/j1"),
                      runtime=runtime)
    return config, plat, runtime, part


@pytest.mark.parametrize("platform, flags", [("frontier", ["--rocm"]), ("polaris", ["--nv"]),
                                             ("aurora", [])])
def test_container_command_has_the_platform_flags_and_binds(platform, flags, tmp_path):
    _config, _plat, _runtime, part = _container_parts(platform, tmp_path)
    image = "/nl/aegis-env/staged/vllm/vllm.sif"
    assert list(part.argv[:part.argv.index(image) + 1]) == [
        "apptainer", "exec", *flags, "--bind", "/nl/hf", "--bind", "/nl/aegis-cache/j1", image]
    assert list(part.argv[part.argv.index(image) + 1:][:3]) == [
        "vllm", "serve", "/nl/hf/aegis-models/org--M"]
    subprocess.run(["bash", "-n", "-c", render_script(part)], check=True)


RECORDER = """#!/usr/bin/env python3
# Stand-in apptainer: records its argv, then runs what follows the image (exec IMAGE CMD...).
import json, os, sys
with open(os.environ["APPTAINER_RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
image = next(i for i, a in enumerate(args) if a.endswith(".sif"))
assert args[0] == "exec" and os.path.isfile(args[image]), args
os.execvp(args[image + 1], args[image + 1:])
"""


def test_container_launch_through_a_recording_apptainer(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(RECORDER)
    (bin_dir / "apptainer").chmod(0o755)
    image = tmp_path / "images" / "vllm.sif"
    image.parent.mkdir()
    image.write_bytes(os.urandom(50_000))
    record = tmp_path / "record.jsonl"
    node_local = tmp_path / "nl"
    run = Run(tmp_path, [{"name": "org/tiny", "instances": 2, "served_model_name": "tiny"}],
              container=str(image), node_local_dir=str(node_local),
              vllm_command=f"{sys.executable} {STANDIN} serve")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "APPTAINER_RECORD": str(record)}
    for var in ("PBS_NODEFILE", "SLURM_JOB_NODELIST", "PMI_SIZE", "PMI_RANK", "AEGIS_LAUNCH_RANKS"):
        env.pop(var, None)
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    res = run.launch("--once", env=env)
    assert res.returncode == 0, res.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    staged = node_local / "aegis-env" / "staged" / "vllm" / "vllm.sif"
    assert staged.read_bytes() == image.read_bytes()  # ran from node-local storage
    serving = [c for c in calls if "serve" in c]
    assert len(serving) == 2
    for call in serving:
        assert call[:call.index(str(staged)) + 1] == [
            "exec", "--bind", str(tmp_path / "hf"),
            "--bind", call[call.index(str(tmp_path / "hf")) + 2], str(staged)]
        assert call[call.index(str(staged)) + 1:][:3] == [sys.executable, str(STANDIN), "serve"]
    prewarm = [c for c in calls if "serve" not in c]
    assert len(prewarm) == 1 and "python3" in prewarm[0]  # the pre-warm ran in the image too


def test_missing_container_runtime_is_one_line_exit_2(tmp_path):
    image = tmp_path / "vllm.sif"
    image.write_bytes(b"sif")
    run = Run(tmp_path, [{"name": "org/tiny"}], container=str(image),
              node_local_dir=str(tmp_path / "nl"))
    env = {k: v for k, v in os.environ.items() if k not in ("PBS_NODEFILE", "SLURM_JOB_NODELIST")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not os.path.exists(os.path.join(p, "apptainer")))
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    res = run.launch("--once", env=env)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert errors == ["aegis launch: error: container: 'apptainer' not found on PATH on node 127.0.0.1"]


def test_vllm_command_missing_from_the_env_is_named(tmp_path):
    config = from_mapping({"model": "m", "env_source": "/lus/e.tar.gz", "vllm_command": "vllm serve"})
    (tmp_path / "bin").mkdir()
    problem = runtime_problem(config, Runtime(env_dir=str(tmp_path)), "n7")
    assert problem == (f"vllm_command: 'vllm' not found in env_source /lus/e.tar.gz "
                       f"(looked in {tmp_path}/bin on node n7)")
    (tmp_path / "bin" / "vllm").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "vllm").chmod(0o755)
    assert runtime_problem(config, Runtime(env_dir=str(tmp_path)), "n7") is None


def test_packed_env_is_activated_before_the_command(tmp_path):
    config = from_mapping({"model": "m", "env_source": "/lus/e.tar.gz", "platform": "local",
                           "vllm_command": "which-am-i"})
    env_dir = tmp_path / "env"
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "bin" / "activate").write_text(f'export PATH="{env_dir}/bin:$PATH"\n')
    (env_dir / "bin" / "which-am-i").write_text("#!/bin/sh\necho \"$0\"\n")
    (env_dir / "bin" / "which-am-i").chmod(0o755)
    plat = get_platform("local")
    plan = make_plan(config, plat)
    part = build_part(instance=plan.instances[0], model=config.models[0], config=config,
                      platform=plat, node_index=0, hosts=["h"], addresses=["h"], bind_host=None,
                      run_dir=str(tmp_path), runtime=Runtime(env_dir=str(env_dir)))
    out = subprocess.run(["bash", "-c", render_script(part)], capture_output=True, text=True,
                         check=True, env={**os.environ, "AEGIS_API_KEY": "k" * 43})
    assert out.stdout.strip() == f"{env_dir}/bin/which-am-i"
