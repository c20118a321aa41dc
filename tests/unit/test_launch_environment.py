"""The environment forms: a packed environment unpacked once per node (atomically, conda-unpack
at its final place), and an Apptainer image run with the platform's flags and binds, through a
recording stand-in `apptainer` on PATH (Apptainer cannot be installed here)."""

import hashlib
import io
import json
import multiprocessing
import os
import stat
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
    tarball.write_bytes(tarball.read_bytes() + b"\0" * 1024)  # other bytes (tar padding)
    second, cached = unpack_environment(tarball, str(tmp_path), "env.tar.gz", timeout=30)
    assert not cached and second != first and first.is_dir()  # a running predecessor keeps its env


def _same_size_same_mtime(old: Path, new: Path) -> None:
    """Replace `old` by `new`'s bytes keeping its size and mtime (a rebuilt tarball copied
    over with cp -p, or written within the same second)."""
    st = old.stat()
    data = new.read_bytes()
    assert len(data) == st.st_size
    old.write_bytes(data)
    os.utime(old, ns=(st.st_atime_ns, st.st_mtime_ns))


def _tarball(path: Path, files: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_tarball_replaced_with_the_same_size_and_mtime_is_a_new_environment(tmp_path):
    """Regression (e12ed61): the unpack cache was keyed by size + mtime, so a tarball replaced
    with the same size and mtime ran the OLD environment. Now the key is its content: the
    checksum the broadcast computed, else a SHA-256 of the file."""
    tarball = _tarball(tmp_path / "env.tar", {"bin/vllm": b"old version\n"})
    first, _ = unpack_environment(tarball, str(tmp_path / "nl"), "env.tar", timeout=30)
    _same_size_same_mtime(tarball, _tarball(tmp_path / "new.tar", {"bin/vllm": b"new version\n"}))
    second, cached = unpack_environment(tarball, str(tmp_path / "nl"), "env.tar", timeout=30)
    assert not cached and second != first
    assert (second / "bin" / "vllm").read_bytes() == b"new version\n"
    # with the broadcast's checksum: that is the key (no second read of the file)
    third, cached = unpack_environment(tarball, str(tmp_path / "nl"), "env.tar", timeout=30,
                                       checksum="1234abcd")
    assert not cached and third not in (first, second)
    again, cached = unpack_environment(tarball, str(tmp_path / "nl"), "env.tar", timeout=30,
                                       checksum="1234abcd")
    assert cached and again == third


def _member(name: str, kind: bytes, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


@pytest.mark.parametrize("evil, why", [
    (_member("dev/sda", tarfile.CHRTYPE, devmajor=8, devminor=0), "character device"),
    (_member("dev/loop", tarfile.BLKTYPE, devmajor=7, devminor=0), "block device"),
    (_member("run/pipe", tarfile.FIFOTYPE), "FIFO"),
    (_member("../../outside", tarfile.REGTYPE), "outside the destination"),
    (_member("lib/hard", tarfile.LNKTYPE, linkname="/etc/passwd"), "absolute path"),
    (_member("lib/up", tarfile.SYMTYPE, linkname="../../../etc"), "outside the destination"),
])
def test_unpacking_allows_only_files_directories_and_links_inside(tmp_path, evil, why):
    """Regression (e12ed61): unpacking as root created device nodes and FIFOs, and followed
    whatever the tarball said. Each is refused, naming the member; nothing is left."""
    tarball = tmp_path / "env.tar"
    with tarfile.open(tarball, "w") as tar:
        ok = tarfile.TarInfo("bin/activate")
        tar.addfile(ok, io.BytesIO(b""))
        tar.addfile(evil)
    with pytest.raises(NodeStepError) as err:
        unpack_environment(tarball, str(tmp_path / "nl"), "env.tar", timeout=30)
    assert f"member {evil.name!r}" in str(err.value) and why in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert [p.name for p in (tmp_path / "nl" / "aegis-env").iterdir()
            if not p.name.endswith(".lock")] == []
    assert not (tmp_path / "outside").exists() and not os.path.exists("/etc/evil")


def test_a_link_to_outside_is_never_written_through(tmp_path):
    """venv-pack keeps bin/python -> /usr/bin/python3.x, so an absolute link is kept; a later
    member that would be written through it (lib -> /tmp/x, then lib/evil) is refused."""
    target = tmp_path / "victim"
    target.mkdir()
    tarball = tmp_path / "env.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.addfile(_member("lib", tarfile.SYMTYPE, linkname=str(target)))
        data = b"pwned"
        tar.addfile(_member("lib/evil", tarfile.REGTYPE, size=len(data)), io.BytesIO(data))
    with pytest.raises(NodeStepError, match=r"member 'lib/evil' would be written outside"):
        unpack_environment(tarball, str(tmp_path / "nl"), "env.tar", timeout=30)
    assert list(target.iterdir()) == []


def test_a_venv_whose_python_links_outside_unpacks(tmp_path):
    """A plain venv (not --copies): bin/python3 -> /usr/bin/python3.x (absolute), and
    bin/python -> python3 (relative, resolving outside through it). Both are kept."""
    tarball = tmp_path / "env.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.addfile(_member("bin", tarfile.DIRTYPE, mode=0o755))
        tar.addfile(_member("bin/python3", tarfile.SYMTYPE, linkname=sys.executable))
        tar.addfile(_member("bin/python", tarfile.SYMTYPE, linkname="python3"))
    env, _ = unpack_environment(tarball, str(tmp_path / "nl"), "env.tar", timeout=30)
    assert os.readlink(env / "bin" / "python") == "python3"
    assert os.path.realpath(env / "bin" / "python") == os.path.realpath(sys.executable)


def test_set_id_bits_and_owners_are_not_kept_and_absolute_names_stay_inside(tmp_path):
    tarball = tmp_path / "env.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.addfile(_member(f"{tmp_path}/evil", tarfile.REGTYPE))
        data = b"#!/bin/sh\n"
        tar.addfile(_member("bin/su", tarfile.REGTYPE, size=len(data), mode=0o6777, uid=0,
                            gid=0, uname="root", gname="root"), io.BytesIO(data))
        tar.addfile(_member("share", tarfile.DIRTYPE, mode=0o1777, uid=4242, gid=4242))
    env, _ = unpack_environment(tarball, str(tmp_path / "nl"), "env.tar", timeout=30)
    mode = (env / "bin" / "su").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID) and not mode & 0o022, oct(mode)
    assert not (env / "share").stat().st_mode & (stat.S_ISVTX | 0o022)
    assert (env / "share").stat().st_uid == os.getuid()
    assert not (tmp_path / "evil").exists()  # a leading / is stripped: inside the env
    assert (env / str(tmp_path).lstrip("/") / "evil").is_file()


def test_a_truncated_tarball_names_the_member_it_broke_in(tmp_path):
    big = os.urandom(300_000)
    whole = _tarball(tmp_path / "whole.tar.gz", {"bin/activate": b"", "lib/big.so": big},
                     mode="w:gz")
    cut = tmp_path / "env.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(NodeStepError, match=r"unpacking env.tar.gz: member 'lib/big.so': "):
        unpack_environment(cut, str(tmp_path / "nl"), "env.tar.gz", timeout=30)


def test_an_unpack_killed_half_way_is_redone(tmp_path, python_in_tarball):
    tarball = python_in_tarball()
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    dest = unpacked_dir(str(tmp_path), "env.tar.gz",
                        unpack_key(tarball.stat().st_size, f"sha256:{digest}"))
    dest.mkdir(parents=True)  # renamed into place, killed before its marker
    (dest / "half").write_text("x")
    leftover = dest.parent / f".{dest.name}.tmp-abc"
    leftover.mkdir()
    env, cached = unpack_environment(tarball, str(tmp_path), "env.tar.gz", timeout=30)
    assert env == dest and not cached and not (dest / "half").exists() and not leftover.exists()


def test_a_corrupt_tarball_is_one_line_and_leaves_nothing(tmp_path):
    bad = tmp_path / "env.tar.gz"
    bad.write_bytes(b"not a tarball at all")
    with pytest.raises(NodeStepError, match=r"^unpacking env.tar.gz: [^\n]+$"):
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
