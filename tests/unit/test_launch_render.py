"""Instance commands and scripts (incl. multi-node), the summary table and failure report."""

import os
import shlex
import subprocess


from aegis.config import from_mapping
from aegis.launch.endpoints import (
    InstanceState, endpoints_txt, failure_report, merge_parts, summary_table)
from aegis.launch.instances import build_part, render_script, sanitise, staged_model_dir
from aegis.plan import make_plan
from aegis.platforms import get_platform


def _parts(cfg: dict, platform="aurora", hosts=None, bind_host=None, run_dir="/runs/j1"):
    config = from_mapping(cfg)
    plat = get_platform(platform)
    plan = make_plan(config, plat)
    hosts = hosts or [f"x{n}" for n in range(plan.nodes_needed)]
    addresses = [f"10.0.0.{n + 1}" for n in range(len(hosts))]
    return [build_part(instance=inst, model=config.models[inst.model_index], config=config,
                       platform=plat, node_index=node, hosts=hosts, addresses=addresses,
                       bind_host=bind_host, run_dir=run_dir)
            for node in range(plan.nodes_needed) for inst in plan.on_node(node)]


# what the launcher gives every instance when api_key_env is unset: the run's own key
KEYED_ENV = {**os.environ, "AEGIS_API_KEY": "k" * 43}


def test_instance_env_reaches_the_script_exactly(tmp_path):
    value = "a b 'c' $(touch pwned) \"d\""
    part = _parts({"model": "m", "instance_env": {"MY_KNOB": value}}, platform="local",
                  run_dir=str(tmp_path))[0]
    script = render_script(part).replace("exec ", "printf '%s' \"$MY_KNOB\" #", 1)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env=KEYED_ENV)
    assert out.stdout == value and not (tmp_path / "pwned").exists()


def test_local_platform_binds_one_core_list_per_tp_rank():
    # vLLM's CPU backend wants "0|1" for TP 2 ("0,1" makes it die at start).
    parts = _parts({"model": "m", "instances": 1, "tensor_parallel_size": 2}, platform="local")
    assert dict(parts[0].env)["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_single_node_instances_get_disjoint_devices_ports_and_env():
    parts = _parts({"model": "meta-llama/Llama-3.1-8B", "instances": 3, "tensor_parallel_size": 4,
                    "extra_vllm_args": "--max-model-len 4096"})
    assert [p.node_index for p in parts] == [0, 0, 0]
    env = [dict(p.env) for p in parts]
    assert [e["ZE_AFFINITY_MASK"] for e in env] == ["0,1,2,3", "4,5,6,7", "8,9,10,11"]
    assert env[0]["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT"  # platform.instance_env
    assert env[0]["HF_HUB_OFFLINE"] == "1" and env[0]["VLLM_HOST_IP"] == "10.0.0.1"
    assert len({e["VLLM_PORT"] for e in env}) == 3 and len({e["MASTER_PORT"] for e in env}) == 3
    assert list(parts[1].argv) == [
        "vllm", "serve", "meta-llama/Llama-3.1-8B", "--host", "10.0.0.1", "--port", "8001",
        "--tensor-parallel-size", "4", "--served-model-name", "meta-llama/Llama-3.1-8B",
        "--max-model-len", "4096"]
    assert parts[1].script_path == "/runs/j1/instances/instance-0001.sh"
    assert parts[1].log_path == "/runs/j1/logs/instance-0001.log"


def test_multi_node_instance_head_and_headless_workers():
    parts = _parts({"model": "big/405B", "tensor_parallel_size": 24, "port_start": 9000},
                   hosts=["h0", "h1"])
    head, worker = parts
    assert (head.node_index, head.node_rank, worker.node_index, worker.node_rank) == (0, 0, 1, 1)
    assert head.argv[-8:] == ("--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.1",
                              "--master-port", dict(head.env)["MASTER_PORT"])
    assert worker.argv[-9:] == ("--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                                "--master-port", dict(head.env)["MASTER_PORT"], "--headless")
    assert "--headless" not in head.argv
    assert dict(worker.env)["MASTER_ADDR"] == "10.0.0.1"
    assert dict(worker.env)["VLLM_HOST_IP"] == "10.0.0.2"
    assert dict(worker.env)["ZE_AFFINITY_MASK"] == ",".join(map(str, range(12)))
    assert head.script_path.endswith("instance-0000-node0.sh")
    assert worker.script_path.endswith("instance-0000-node1.sh")
    script = render_script(worker)
    assert "node rank 1 of 2" in script
    assert script.rstrip().splitlines()[-1] == "exec " + shlex.join(worker.argv)


def test_staged_model_is_passed_as_a_path_with_the_served_name():
    parts = _parts({"model": "org/Tiny Model", "model_source": "/lus/models/tiny",
                    "hf_home": "/tmp/hf"})
    assert staged_model_dir("/tmp/hf", "org/Tiny Model") == "/tmp/hf/aegis-models/org--Tiny--Model"
    assert parts[0].argv[2] == "/tmp/hf/aegis-models/org--Tiny--Model"
    assert parts[0].argv[parts[0].argv.index("--served-model-name") + 1] == "org/Tiny Model"
    assert sanitise("../../etc") == "etc" and "/" not in sanitise("a/b/../c")


def test_script_quotes_everything_and_runs_as_written(tmp_path):
    odd = "it's a \"model\"; $(touch pwned)"
    parts = _parts({"model": "m", "served_model_name": odd, "vllm_command": "printf '%s\\n'",
                    "hf_home": str(tmp_path / "h f")}, platform="local", run_dir=str(tmp_path))
    script = render_script(parts[0])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env=KEYED_ENV)
    lines = out.stdout.splitlines()
    assert lines[lines.index("--served-model-name") + 1] == odd
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
    subprocess.run(["bash", "-n", "-c", script], check=True)


def test_api_key_is_taken_from_the_environment_never_written(monkeypatch, tmp_path):
    parts = _parts({"model": "m", "api_key_env": "MY_KEY", "vllm_command": "printenv VLLM_API_KEY"},
                   platform="local", run_dir=str(tmp_path))
    script = render_script(parts[0])
    assert "sekrit" not in script and "MY_KEY" in script
    assert "--api-key" not in parts[0].argv
    ok = subprocess.run(["bash", "-c", script], env={**os.environ, "MY_KEY": "sekrit-123"},
                        capture_output=True, text=True)
    assert ok.stdout.strip() == "sekrit-123"
    missing = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"]},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "set MY_KEY to the API key" in missing.stderr


def test_bind_host_override_keeps_node_address_for_vllm():
    part = _parts({"model": "m"}, bind_host="0.0.0.0")[0]
    assert part.argv[part.argv.index("--host") + 1] == "0.0.0.0"
    assert dict(part.env)["VLLM_HOST_IP"] == "10.0.0.1"


def _state(i, state="ready", **kw):
    base = dict(id=i, model="org/m", served_name="m", node=i // 2, host=f"n{i // 2}",
                port=8000 + i, state=state, log=f"/r/logs/instance-{i:04d}.log")
    return InstanceState(**{**base, **kw})


def test_merge_parts_fails_a_multi_node_instance_when_a_worker_failed():
    head = _state(0, "ready", node_rank=0)
    worker = _state(0, "failed", node=1, node_rank=1, error="exited with code 1")
    assert merge_parts([worker, head])[0].state == "failed"
    ok_worker = _state(0, "ready", node=1, node_rank=1)
    assert merge_parts([ok_worker, head]) == [head]


def test_summary_and_failure_report_show_log_tail():
    states = [_state(0), _state(1, "failed", exit_code=3, error="exited with code 3",
                                 log_tail=("RuntimeError: boom",))]
    table = summary_table(states)
    assert "1/2 instances ready, 1 failed" in table
    report = failure_report(states)
    assert "instance 1 (m) on n0:8001 failed (exit code 3): exited with code 3" in report
    assert "  | RuntimeError: boom" in report and "instance 0" not in report
    assert endpoints_txt(states) == "n0:8000\n"
