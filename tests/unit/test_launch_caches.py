"""Nothing shared that can race: per-instance node-local caches, a pre-warm that runs once per
node under a lock, then leaves the node's tokenizer caches read-only."""

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aegis.config import MANAGED_ENV, ConfigError, from_mapping
from aegis.launch.caches import ALL_VARS, NODE_CACHES, job_cache_root, node_cache_dir
from aegis.launch.environment import Runtime
from aegis.launch.instances import build_part, render_prewarm, render_script
from aegis.launch.pernode import NodeStepError, node_lock, prewarm_node, remove_job_caches
from aegis.plan import make_plan
from aegis.platforms import get_platform

DUMP_ENV = f"{sys.executable} -c 'import json, os; print(json.dumps(dict(os.environ)))'"


def _node_parts(tmp_path, platform="local", instances=2, **cfg):
    config = from_mapping({"model": "m", "instances": instances, "platform": platform,
                           "vllm_command": DUMP_ENV} | cfg)
    plat = get_platform(platform)
    plan = make_plan(config, plat)
    root = job_cache_root(str(tmp_path / "local"), "123.pbs-host")
    hosts = ["n0"] * plan.nodes_needed
    parts = [build_part(instance=inst, model=config.models[0], config=config, platform=plat,
                        node_index=0, hosts=hosts, addresses=hosts, bind_host=None,
                        run_dir=str(tmp_path / "run"), cache_root=root)
             for inst in plan.on_node(0)]
    return config, plat, root, parts


def _environment_of(part, tmp_path) -> dict:
    """What the instance process really gets: run its script with a command that dumps it."""
    out = subprocess.run(["bash", "-c", render_script(part)], capture_output=True, text=True,
                         check=True, cwd=tmp_path,
                         env={**os.environ, "AEGIS_API_KEY": "k" * 43})  # the run's key
    return json.loads(out.stdout)


def test_two_instances_on_a_node_never_share_a_writable_cache(tmp_path):
    config, _plat, root, parts = _node_parts(tmp_path)
    assert len(parts) == 2 and parts[0].node_index == parts[1].node_index
    envs = [_environment_of(p, tmp_path) for p in parts]
    node_vars = {var for var, _ in NODE_CACHES}
    for var in ALL_VARS:
        assert all(var in e for e in envs), var
        paths = [Path(e[var]) for e in envs]
        assert all(str(p).startswith(str(root)) for p in paths), (var, paths)  # node-local
        if var in node_vars:  # read-only after the pre-warm, shared on purpose
            assert paths[0] == paths[1]
            continue
        assert paths[0] != paths[1], var
        assert not paths[0].is_relative_to(paths[1]) and not paths[1].is_relative_to(paths[0])
        assert all(p.is_dir() for p in paths), "the script creates its cache directories"
    # every writable cache var of one instance is disjoint from every one of the other
    writable = [{Path(e[v]) for v in ALL_VARS if v not in node_vars} for e in envs]
    assert not any(a == b or a.is_relative_to(b) or b.is_relative_to(a)
                   for a in writable[0] for b in writable[1])


def test_platform_cache_variables_are_per_instance_too(tmp_path):
    _config, _plat, root, parts = _node_parts(tmp_path, platform="frontier")
    envs = [dict(p.env) for p in parts]
    for var in ("MIOPEN_USER_DB_PATH", "MIOPEN_CUSTOM_CACHE_DIR"):
        assert envs[0][var] != envs[1][var] and envs[0][var].startswith(str(root))


def test_cache_variables_cannot_be_overridden_by_instance_env():
    for var in ALL_VARS:
        assert var in MANAGED_ENV
    with pytest.raises(ConfigError, match="VLLM_CACHE_ROOT is set by aegis"):
        from_mapping({"model": "m", "instance_env": {"VLLM_CACHE_ROOT": "/shared"}})


def test_job_cache_root_is_per_job_and_safe():
    assert job_cache_root("/tmp", "123.aurora-pbs/x") == Path("/tmp/aegis-cache/123.aurora-pbs_x")
    assert job_cache_root("/tmp", "..") == Path("/tmp/aegis-cache/job")


def _prewarm_script(tmp_path, config, plat, root, count_file):
    script = tmp_path / "prewarm.sh"
    cfg = config.replace(prewarm_command=f"bash -c 'echo $$ >> {count_file}; sleep 0.3'")
    script.write_text(render_prewarm(models=["m"], config=cfg, platform=plat, node_host="n0",
                                     cache_root=root, runtime=Runtime(), script_path=str(script)))
    return script


def _prewarm_once(args):
    script, root, log = args
    return prewarm_node(Path(script), Path(root), timeout=30, log_path=Path(log))


def test_prewarm_runs_once_per_node_however_many_processes_ask(tmp_path):
    config, plat, root, _parts = _node_parts(tmp_path)
    count = tmp_path / "count"
    script = _prewarm_script(tmp_path, config, plat, root, count)
    subprocess.run(["bash", "-n", str(script)], check=True)
    args = [(str(script), str(root), str(tmp_path / f"log{i}")) for i in range(6)]
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        ran = pool.map(_prewarm_once, args)
    assert sorted(ran) == [False] * 5 + [True]
    assert len(count.read_text().split()) == 1
    for _var, sub in NODE_CACHES:  # instances can only read the tokenizer caches now
        path = node_cache_dir(root) / sub
        assert not os.access(path, os.W_OK) or os.geteuid() == 0
        assert oct(path.stat().st_mode & 0o222) == "0o0"
    assert prewarm_node(script, root, timeout=5, log_path=tmp_path / "again") is False


def test_a_failing_prewarm_fails_and_is_retried_next_time(tmp_path):
    config, plat, root, _parts = _node_parts(tmp_path)
    script = tmp_path / "prewarm.sh"
    cfg = config.replace(prewarm_command="false")
    script.write_text(render_prewarm(models=["m"], config=cfg, platform=plat, node_host="n0",
                                     cache_root=root, runtime=Runtime(), script_path=str(script)))
    with pytest.raises(NodeStepError, match="pre-warm: exited with code 1"):
        prewarm_node(script, root, timeout=10, log_path=tmp_path / "log")
    assert not (node_cache_dir(root) / ".prewarmed").exists()


def test_prewarm_timeout_kills_its_process_group(tmp_path):
    config, plat, root, _parts = _node_parts(tmp_path)
    script = tmp_path / "prewarm.sh"
    pidfile = tmp_path / "pid"
    cfg = config.replace(prewarm_command=f"bash -c 'sleep 60 & echo $! > {pidfile}; wait'")
    script.write_text(render_prewarm(models=["m"], config=cfg, platform=plat, node_host="n0",
                                     cache_root=root, runtime=Runtime(), script_path=str(script)))
    with pytest.raises(NodeStepError, match="did not finish within 1s"):
        prewarm_node(script, root, timeout=1, log_path=tmp_path / "log")
    pid = int(pidfile.read_text())

    def state():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return "gone"
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously
    while state() not in ("gone", "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state() in ("gone", "Z")


def test_node_lock_times_out_with_one_line(tmp_path):
    lock = tmp_path / "l"
    with node_lock(lock, 5):
        holder = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from aegis.launch.pernode import node_lock, NodeStepError\n"
             "try:\n  node_lock(Path(sys.argv[1]), 0.3).__enter__()\n"
             "except NodeStepError as e:\n  print(e); sys.exit(3)", str(lock)],
            capture_output=True, text=True)
    assert holder.returncode == 3 and "still held by another process after 0.3s" in holder.stdout


def test_job_caches_are_removed_at_the_end_read_only_ones_too(tmp_path):
    _config, _plat, root, parts = _node_parts(tmp_path)
    for p in parts:
        _environment_of(p, tmp_path)
    tok = node_cache_dir(root) / "tiktoken"
    tok.mkdir(parents=True)
    tok.chmod(0o500)
    remove_job_caches(root, [root / parts[0].name])
    assert root.exists()  # the other instance's directory is still there
    remove_job_caches(root, [root / parts[1].name])
    assert not root.exists()


def test_prewarm_uses_the_python_beside_vllm_command(tmp_path):
    bin_dir = tmp_path / "vllm-env" / "bin"
    bin_dir.mkdir(parents=True)
    record = tmp_path / "called"
    (bin_dir / "python3").write_text(f'#!/bin/sh\necho "$@" > {record}\necho "TIKTOKEN=$TIKTOKEN_CACHE_DIR" >> {record}\n')
    (bin_dir / "python3").chmod(0o755)
    config, plat, root, _parts = _node_parts(tmp_path, vllm_command=f"{bin_dir}/vllm serve")
    script = tmp_path / "prewarm.sh"
    script.write_text(render_prewarm(models=["/nl/hf/aegis-models/org--M"], config=config,
                                     platform=plat, node_host="n0", cache_root=root,
                                     runtime=Runtime(), script_path=str(script)))
    assert prewarm_node(script, root, timeout=10, log_path=tmp_path / "log")
    called = record.read_text()
    assert "AutoTokenizer" in called and " /nl/hf/aegis-models/org--M\n" in called
    assert f"TIKTOKEN={node_cache_dir(root) / 'tiktoken'}" in called
