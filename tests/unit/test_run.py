"""aegis.Run and the commands over it (status, wait, endpoints, cancel, submit --wait), against
stand-in batch commands and hand-written endpoints files. The launcher writing those files for
real is covered in test_launch_run.py (stand-in servers, real vllm-router)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import aegis
from aegis.cli import EXIT_TIMEOUT, main
from aegis.config import ConfigError, load_config
from aegis.layout import RunLayout
from aegis.runfiles import STALE_AFTER
from aegis.run import Run, RunError, WaitTimeout

from conftest import EXAMPLES


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def instance(i: int, state: str = "ready", model: str = "m", port: int = 8000) -> dict:
    return {"id": i, "model": model, "served_name": model, "node": 0, "host": "n1",
            "port": port + i, "state": state, "log": f"/x/instance-{i:04d}.log", "restarts": 0,
            "exit_code": None, "error": "" if state != "failed" else "exited with code 3",
            "base_url": f"http://n1:{port + i}/v1"}


def write_doc(run_dir: Path, instances: list[dict], routers=(), launcher=None) -> None:
    doc = {"schema": 1, "job": "j", "run_dir": str(run_dir), "ready": sum(i["state"] == "ready"
                                                             for i in instances),
           "total": len(instances), "instances": instances, "routers": list(routers)}
    doc["launcher"] = launcher or launcher_record()
    (run_dir / "endpoints.json").write_text(json.dumps(doc))


def proc_identity(pid: int) -> dict:
    """What the launcher records to name its process: start time (field 22 of
    /proc/<pid>/stat, None when gone) and boot id. Read here without aegis.pids."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    except OSError:
        ticks = None
    with open("/proc/sys/kernel/random/boot_id") as f:
        return {"start_ticks": ticks, "boot_id": f.read().strip()}


def launcher_record(pid=None, host=None, heartbeat=None, state="serving",
                    identity=True) -> dict:
    """A launcher record; on this host (host=None) with the identity of `pid` (default: this
    test process) unless identity=False (a file of an older aegis)."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, **(proc_identity(pid) if identity and host is None else {}),
            "host": socket.gethostname() if host is None else host, "ranks": 1,
            "state": state, "exit_code": None, "started_at": time.time(),
            "updated_at": time.time(),
            "heartbeat_at": time.time() if heartbeat is None else heartbeat,
            "heartbeat_interval": 5.0}


def launched_run(tmp_path: Path, instances=2, pid=None, host=None, heartbeat=None,
                 state="serving", **config) -> Path:
    """A run directory as `aegis launch` leaves it (config.yaml, no job.id); the launcher in
    `state` ("starting": the fleet is still coming up; "serving": it was ready once)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(json.dumps(
        {"platform": "local", "model": "m", "instances": instances, **config}))
    launcher = launcher_record(pid, host, heartbeat, state=state)
    write_doc(run_dir, [instance(i) for i in range(instances)],
              routers=[{"model": "m", "url": "http://n1:9000/v1", "host": "n1", "state": "ready",
                        "workers": instances}] if instances >= 2 else [],
              launcher=launcher)
    return run_dir


def submitted_run(tmp_path, monkeypatch, fake_batch, job_id="88") -> Path:
    monkeypatch.chdir(tmp_path)
    fake_batch.answer("sbatch", out=f"{job_id}\n")
    result = invoke("submit", "-c", str(EXAMPLES / "frontier.yaml"))
    assert result.exit_code == 0, result.stderr
    (run_dir,) = (tmp_path / "aegis-runs").iterdir()
    return run_dir


# ------------------------------------------------------------------ Run


def test_layout_is_the_one_definition_of_run_paths():
    layout = RunLayout("/r")
    assert (layout.script, layout.job_id, layout.job_log, layout.config) == (
        "/r/job.sh", "/r/job.id", "/r/job.log", "/r/config.yaml")
    assert layout.endpoints() == "/r/endpoints.json"
    assert layout.endpoints("sub/e.json") == "/r/sub/e.json"
    assert layout.endpoints("/abs/e.json") == "/abs/e.json"
    assert layout.instance_log("instance-0001") == "/r/logs/instance-0001.log"
    assert layout.router_log("org/M 1") == "/r/logs/router-org-M-1.log"


def test_open_submitted_run_reads_job_and_endpoints(tmp_path, monkeypatch, fake_batch):
    run_dir = submitted_run(tmp_path, monkeypatch, fake_batch)
    run = Run.open(run_dir)
    assert (run.job_id, run.backend.name) == ("88", "slurm")
    fake_batch.answer("squeue", out="PENDING\n")
    st = run.state()
    assert (st.job_state, st.phase, st.ready, st.total) == ("queued", "pending", 0, 9)
    fake_batch.answer("squeue", out="RUNNING\n")
    assert run.state().phase == "starting"
    small, big = "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.3-70B-Instruct"
    instances = [instance(i, model=small) for i in range(8)] + [instance(8, model=big)]
    write_doc(run_dir, instances)
    # frontier.yaml: 8 instances of one model (a router, awaited) and 1 of another (none)
    assert run.state().reason == f"router of {small} not up yet"
    write_doc(run_dir, instances, routers=[{"model": small, "url": "http://n1:9/v1",
                                            "host": "n1", "state": "ready"}])
    st = run.state()
    assert (st.phase, st.ready) == ("ready", 9), st.reason
    assert [e.url for e in run.endpoints(big)] == ["http://n1:8008/v1"]
    assert run.router_url(small) == "http://n1:9/v1"
    with pytest.raises(ConfigError, match="serves 2 models; name one"):
        run.router_url()
    with pytest.raises(RunError, match="router is off for it"):
        run.router_url(big)
    fake_batch.answer("squeue", out="")
    fake_batch.answer("sacct", out="CANCELLED by 0\n")
    assert (run.state().phase, run.state().job_state) == ("ended", "cancelled")


def test_open_rejects_what_is_not_a_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="no such run directory"):
        Run.open(tmp_path / "nope")
    with pytest.raises(ConfigError, match="not a run directory"):
        Run.open(tmp_path)


def test_launched_run_is_alive_while_its_launcher_pid_is(tmp_path):
    run = Run.open(launched_run(tmp_path))
    st = run.state()
    assert (run.job_id, st.job_state, st.phase, st.launcher["alive"]) == (None, "running",
                                                                          "ready", True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = launched_run(tmp_path / "b", pid=dead.pid)
    st = Run.open(run_dir).state()
    assert (st.job_state, st.phase) == ("ended", "ended")
    assert st.reason.startswith("the launcher is not running")


def test_launched_run_on_another_host_is_judged_by_its_heartbeat(tmp_path):
    fresh = Run.open(launched_run(tmp_path / "a", pid=1, host="elsewhere")).state()
    assert fresh.phase == "ready"
    stale = Run.open(launched_run(tmp_path / "b", pid=1, host="elsewhere",
                                  heartbeat=time.time() - STALE_AFTER * 5 - 1)).state()
    assert stale.phase == "ended" and "last heartbeat" in stale.reason


def test_phase_counts_failed_instances_against_min_ready(tmp_path):
    run_dir = launched_run(tmp_path, instances=3, router=False, state="starting")
    doc = json.loads((run_dir / "endpoints.json").read_text())
    doc["instances"][2] = instance(2, "failed")
    doc["instances"][1] = instance(1, "starting")
    (run_dir / "endpoints.json").write_text(json.dumps(doc))
    run = Run.open(run_dir)
    assert run.state().phase == "failed"  # all 3 needed, 1 failed
    assert run.state(min_ready=2).phase == "starting"
    assert run.state(min_ready=1).phase == "ready"
    with pytest.raises(RunError, match="1 of 3 instance\\(s\\) failed"):
        run.wait_ready(timeout=5)
    assert run.wait_ready(timeout=5, min_ready=1).ready == 1


def test_wait_ready_times_out_and_reports_progress(tmp_path):
    run_dir = launched_run(tmp_path, instances=2, state="starting")
    doc = json.loads((run_dir / "endpoints.json").read_text())
    doc["instances"][1]["state"] = "starting"
    (run_dir / "endpoints.json").write_text(json.dumps(doc))
    seen = []
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match="not ready after 0.3s: 1 of 2 instance"):
        Run.open(run_dir).wait_ready(timeout=0.3, interval=0.05, on_change=seen.append)
    assert time.monotonic() - t0 < 3
    assert [s.phase for s in seen] == ["starting"]


def test_router_is_awaited_before_ready_and_named_in_errors(tmp_path):
    run_dir = launched_run(tmp_path, instances=2)
    doc = json.loads((run_dir / "endpoints.json").read_text())
    doc["routers"][0]["state"] = "starting"
    (run_dir / "endpoints.json").write_text(json.dumps(doc))
    run = Run.open(run_dir)
    assert run.state().reason == "router of m not up yet"
    with pytest.raises(RunError, match="its router is not up yet"):
        run.router_url("m")
    with pytest.raises(ConfigError, match="this run serves m"):
        run.router_url("other")
    doc["routers"][0].update(state="failed", error="vllm-router not found")
    (run_dir / "endpoints.json").write_text(json.dumps(doc))
    assert run.state().phase == "ready"  # a failed router is reported, not awaited forever


def test_cancel_a_launched_run_sends_sigterm_to_its_launcher(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = Run.open(launched_run(tmp_path, pid=launcher.pid))
        assert run.cancel() == f"sent SIGTERM to the launcher (pid {launcher.pid} on " \
                               f"{socket.gethostname()})"
        assert launcher.wait(timeout=10) == -signal.SIGTERM
    finally:
        launcher.kill()
    elsewhere = Run.open(launched_run(tmp_path / "b", pid=1, host="elsewhere"))
    with pytest.raises(RunError, match="the launcher runs on elsewhere"):
        elsewhere.cancel()


def test_aegis_submit_returns_a_run(tmp_path, monkeypatch, fake_batch):
    monkeypatch.chdir(tmp_path)
    fake_batch.answer("sbatch", out="99\n")
    run = aegis.submit(str(EXAMPLES / "frontier.yaml"), run_dir=str(tmp_path / "runs"))
    assert isinstance(run, aegis.Run) and run.job_id == "99"
    assert Path(run.run_dir).parent == tmp_path / "runs"
    assert load_config(run.layout.config).endpoints_file == run.endpoints_path


# ------------------------------------------------------------------ commands


def test_status_json_schema(tmp_path):
    result = invoke("status", str(launched_run(tmp_path)), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {"run_dir", "job_id", "scheduler", "job_state", "phase", "reason",
                        "ready", "total", "instances", "routers", "launcher", "endpoints_file"}
    assert set(doc["instances"][0]) == {"url", "model", "host", "node", "state", "id", "restarts",
                                        "error"}
    assert doc["routers"][0]["url"] == "http://n1:9000/v1"


def test_status_table(tmp_path):
    result = invoke("status", str(launched_run(tmp_path)))
    lines = result.stdout.splitlines()
    assert lines[0] == "launched run: running; 2/2 instance(s) ready; ready"
    assert lines[1].split() == ["MODEL", "NODE", "HOST", "URL", "STATE", "RESTARTS"]
    assert lines[2].split() == ["m", "0", "n1", "http://n1:8000/v1", "ready", "0"]
    assert lines[4].split() == ["m", "0", "n1", "http://n1:9000/v1", "router", "ready", "0"]


def test_wait_exit_codes(tmp_path):
    ready = invoke("wait", str(launched_run(tmp_path / "a")), "--timeout", "5")
    assert (ready.exit_code, ready.stdout) == (0, "http://n1:9000/v1\n")
    no_router = invoke("wait", str(launched_run(tmp_path / "b", instances=1)))
    assert (no_router.exit_code, no_router.stdout) == (0, "http://n1:8000/v1\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ended = invoke("wait", str(launched_run(tmp_path / "c", pid=dead.pid)))
    assert ended.exit_code == 1
    assert ended.stderr.splitlines()[-1].startswith("aegis: error: run ended: the launcher is")
    run_dir = launched_run(tmp_path / "d")
    write_doc(run_dir, [instance(0), instance(1, "starting")],
              routers=[{"model": "m", "url": "http://n1:9000/v1", "state": "ready"}],
              launcher=launcher_record(state="starting"))
    slow = invoke("wait", str(run_dir), "--timeout", "0.2")
    assert slow.exit_code == EXIT_TIMEOUT == 3
    assert "not ready after 0.2s" in slow.stderr
    assert invoke("wait", str(run_dir), "--min-ready", "1").exit_code == 0


def test_endpoints_command(tmp_path):
    run_dir = str(launched_run(tmp_path))
    plain = invoke("endpoints", run_dir)
    assert plain.stdout == "http://n1:8000/v1\nhttp://n1:8001/v1\n"
    routed = invoke("endpoints", run_dir, "--router")
    assert routed.stdout == "http://n1:9000/v1\n"
    records = json.loads(invoke("endpoints", run_dir, "--json", "--model", "m").stdout)
    assert [r["url"] for r in records] == ["http://n1:8000/v1", "http://n1:8001/v1"]
    for routed_flag in ((), ("--router",)):  # the same line with or without --router
        wrong = invoke("endpoints", run_dir, "--model", "nope", *routed_flag)
        assert (wrong.exit_code, wrong.stderr) == (
            2, "aegis: error: --model 'nope': this run serves m\n")


def test_cancel_submitted_run_and_bare_job_id(tmp_path, monkeypatch, fake_batch):
    run_dir = submitted_run(tmp_path, monkeypatch, fake_batch, job_id="123")
    result = invoke("cancel", str(run_dir))
    assert result.exit_code == 0 and fake_batch.argv("scancel") == ["123"]
    # a job id whose run directory the batch system names: the run's own view
    fake_batch.answer("scontrol", out=f"JobId=123 JobState=RUNNING WorkDir={run_dir}\n")
    fake_batch.answer("squeue", out="RUNNING\n")
    status = invoke("status", "123", "--scheduler", "slurm")
    assert status.stdout.startswith("job 123 (slurm): running; 0/9")


def test_submit_wait_times_out_or_fails_with_the_job(tmp_path, monkeypatch, fake_batch):
    monkeypatch.chdir(tmp_path)
    fake_batch.answer("sbatch", out="5\n")
    fake_batch.answer("squeue", out="RUNNING\n")
    slow = invoke("submit", "-c", str(EXAMPLES / "frontier.yaml"), "--wait", "--timeout", "0.2")
    assert slow.exit_code == 3 and slow.stdout == ""
    fake_batch.answer("squeue", out="")
    fake_batch.answer("sacct", out="FAILED\n")
    failed = invoke("submit", "-c", str(EXAMPLES / "frontier.yaml"), "--wait")
    assert failed.exit_code == 1
    assert failed.stderr.splitlines()[-1] == "aegis: error: run failed: job 5 failed"


def test_run_commands_on_a_missing_directory_are_bad_input(tmp_path):
    for command in ("status", "endpoints", "cancel"):  # wait waits for it: below
        result = invoke(command, str(tmp_path / "gone"))
        assert result.exit_code == 2, command
        assert result.stderr == f"aegis: error: {tmp_path / 'gone'}: no such run directory\n"


def test_wait_waits_for_a_run_directory_launch_has_not_made_yet(tmp_path):
    run_dir = tmp_path / "later" / "run"
    late = invoke("wait", str(run_dir), "--timeout", "0.3")
    assert late.exit_code == EXIT_TIMEOUT
    assert late.stderr == (f"aegis: waiting for {run_dir} to appear\n"
                           f"aegis: error: {run_dir}: no such run directory yet (not made "
                           "within --timeout)\n")
    run_dir.mkdir(parents=True)  # made, its config not yet written: still waited for
    assert invoke("wait", str(run_dir), "--timeout", "0.2").exit_code == EXIT_TIMEOUT
    run_dir.rmdir()
    maker = subprocess.Popen([sys.executable, "-c", f"""
import json, os, socket, sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
import test_run
time.sleep(0.5)
test_run.launched_run(Path({str(tmp_path / "later")!r}), pid={os.getpid()})
"""])
    try:
        result = invoke("wait", str(run_dir), "--timeout", "20")
    finally:
        maker.wait(timeout=20)
    assert (result.exit_code, result.stdout) == (0, "http://n1:9000/v1\n"), result.stderr
    assert result.stderr.splitlines()[0] == f"aegis: waiting for {run_dir} to appear"


def test_wait_prints_each_models_router_else_its_instances(tmp_path):
    run_dir = launched_run(tmp_path)
    (run_dir / "config.yaml").write_text(json.dumps(
        {"platform": "local", "models": [{"model": "a", "instances": 2},
                                         {"model": "b", "instances": 2}]}))
    write_doc(run_dir, [instance(0, model="a"), instance(1, model="a"),
                        instance(2, model="b"), instance(3, model="b")],
              routers=[{"model": "a", "url": "http://n1:9000/v1", "state": "ready"},
                       {"model": "b", "url": "", "state": "failed", "error": "no router"}])
    result = invoke("wait", str(run_dir), "--timeout", "5")
    assert (result.exit_code, result.stdout) == (
        0, "http://n1:9000/v1\nhttp://n1:8002/v1\nhttp://n1:8003/v1\n"), result.stderr


def test_a_dead_launcher_serves_nothing(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = str(launched_run(tmp_path / "killed", pid=dead.pid))
    stale = str(launched_run(tmp_path / "stale", pid=1, host="elsewhere",
                             heartbeat=time.time() - STALE_AFTER * 5 - 1))
    stopped = launched_run(tmp_path / "stopped")
    write_doc(stopped, [instance(0, "stopped"), instance(1, "stopped")],
              launcher=dict(launcher_record(), state="stopped", exit_code=0))
    for run in (run_dir, stale, str(stopped)):
        for flags in ((), ("--router",), ("--json",)):
            listed = invoke("endpoints", run, *flags)
            assert (listed.exit_code, listed.stdout) == (1, ""), (run, flags)
            assert listed.stderr.startswith("aegis: error: run ended: the launcher ")
        assert Run.open(run).endpoints() == []
    status = invoke("status", run_dir).stdout.splitlines()[0]
    assert status.startswith("launched run: ended; 0/2 instance(s) ready; ended (the launcher is "
                             "not running")
    wrong = invoke("endpoints", run_dir, "--model", "nope")
    assert wrong.exit_code == 2


def test_status_of_a_name_neither_a_directory_nor_a_job_is_bad_input(fake_batch):
    fake_batch.answer("squeue", out="")
    fake_batch.answer("sacct", out="")
    fake_batch.answer("scontrol", out="")
    result = invoke("status", "aegis-20261101-101500", "--scheduler", "slurm")
    assert (result.exit_code, result.stdout, result.stderr) == (
        2, "", "aegis: error: aegis-20261101-101500: no run directory or slurm job has that "
        "name\n")


def test_a_mistyped_run_name_is_named_as_such(fake_batch):
    # no "/" in it, so it could be a job id; the error still says no run directory has the name
    result = invoke("status", "aegis-2026O101-101500")
    assert (result.exit_code, result.stderr) == (
        2, "aegis: error: aegis-2026O101-101500: no such run directory; as a job id: both qstat "
        "and squeue are on PATH; say which with --scheduler pbs|slurm\n")


def test_relative_paths_in_a_config_resolve_beside_it(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "c.yaml"
    config.write_text("platform: local\nmodels:\n  - model: a\n    model_source: ../m/a\n"
                      "  - model: b\n    model_source: /abs/b\n")
    monkeypatch.chdir("/")
    models = load_config(str(config)).models
    assert [m.model_source for m in models] == [str(tmp_path / "m" / "a"), "/abs/b"]
    # a flag is relative to where you are, as any command-line path
    single = load_config(None, {"model": "a", "model_source": "rel", "platform": "local"})
    assert single.models[0].model_source == "rel"


def test_launch_local_example_runs_from_any_directory(tmp_path, monkeypatch):
    """examples/launch-local.yaml, with the stand-in for vllm, launched from an unrelated
    directory: its model_source resolves beside the repository, its ports are free ones."""
    from test_launch_run import ENV, STANDIN

    example = EXAMPLES / "launch-local.yaml"
    assert load_config(str(example)).models[0].model_source == str(
        EXAMPLES.parent / "build" / "tiny-llama")
    model = tmp_path / "tiny"  # a plain model directory is enough for the stand-in
    model.mkdir()
    (model / "config.json").write_text("{}")
    with socket.socket() as squatter:  # 8000 taken: the launch must look further
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            squatter.bind(("127.0.0.1", 8000))
            squatter.listen()
        except OSError:
            pass  # taken already, by someone else: as good
        result = subprocess.run(
            [sys.executable, "-m", "aegis", "launch", "-c", str(example), "--once",
             "--run-dir", "run", "--model-source", str(model), "--hf-home", str(tmp_path / "hf"),
             "--vllm-command", f"{sys.executable} {STANDIN} serve"],
            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "run" / "endpoints.json").read_text())
    ports = [i["port"] for i in doc["instances"]]
    assert 8000 not in ports and ports[1] == ports[0] + 1
    assert doc["routers"][0]["port"] == ports[0] + 2
    assert "2/2 instances ready" in result.stderr


def test_progress_names_the_loading_instances_and_failures_show_their_log_tail(tmp_path, capsys):
    from aegis.config import from_mapping
    from aegis.launch.board import Board
    from aegis.launch.endpoints import EndpointsFile, InstanceState
    from aegis.plan import make_plan
    from aegis.platforms import get_platform

    config = from_mapping({"platform": "local", "model": "m", "instances": 2, "router": False})
    endpoints = EndpointsFile(tmp_path / "endpoints.json", run_dir=str(tmp_path), job="j", ranks=1)
    lines: list[str] = []
    board = Board(config, make_plan(config, get_platform("local")), endpoints,
                  layout=RunLayout(str(tmp_path)), router_host="127.0.0.1",
                  router_node="127.0.0.1", api_key="k" * 43, log=lines.append)

    def state(i, s, **kw):
        return InstanceState(id=i, model="m", served_name="m", node=0, host="h", port=8000 + i,
                             state=s, log=f"/logs/instance-{i:04d}.log", **kw)

    board.starting()
    board.update({0: [state(0, "ready"), state(1, "starting")]})
    board.next_progress = 0  # due now
    board.progress()
    assert len(lines) == 1 and lines[0].startswith("1/2 ready after ")
    assert lines[0].endswith(f"loading: instance-0001 (logs: {tmp_path}/logs)")
    board.progress()
    assert len(lines) == 1  # not again before the interval
    board.update({0: [state(0, "ready"), state(1, "failed", exit_code=3, error="exited with "
                                                 "code 3 during startup",
                                                 log_tail=("Traceback ...", "OOM"))]})
    err = capsys.readouterr().err
    assert "instance 1 (m) on h:8001 failed (exit code 3): exited with code 3" in err
    assert "  | OOM" in err
    board.update({0: [state(0, "ready"), state(1, "failed", exit_code=3, error="x",
                                                 log_tail=("OOM",))]})
    assert "failed" not in capsys.readouterr().err  # each failure is shown once
    doc = json.loads((tmp_path / "endpoints.json").read_text())
    assert [i["state"] for i in doc["instances"]] == ["ready", "failed"]


# ------------------------------------------------------------------ hostile run directories
# A run directory is input: its files may be anything (FIFOs, devices, links to other users'
# files, garbage), and the process its endpoints file names may be long gone. Every command
# answers in one line with a documented exit code (2: a damaged or foreign run directory),
# never hangs, never traces back, and cancel never signals a process that is not the launcher.

RUN_COMMANDS = (("status",), ("status", "--json"), ("wait", "--timeout", "5"), ("endpoints",),
                ("endpoints", "--router"), ("cancel",))


@pytest.fixture
def no_hang():
    """Fails a test that blocks (a read of a FIFO, a wait for ever) instead of hanging it."""
    def expired(signum, frame):
        raise TimeoutError("blocked for 20 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, 20)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def sleeper() -> subprocess.Popen:
    """An unrelated live process of the caller's: what a hostile run directory names."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def assert_refused(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout)
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("aegis: error: "), result.stderr
    assert "Traceback" not in result.output and not isinstance(result.exception, Exception) \
        or isinstance(result.exception, SystemExit), result.exception
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def test_a_reused_launcher_pid_is_neither_alive_nor_signalled(tmp_path):
    """The launcher was SIGKILLed and its pid went to an unrelated process: status calls the
    run ended and cancel signals nothing."""
    launcher = sleeper()
    run_dir = launched_run(tmp_path, pid=launcher.pid)
    recorded = json.loads((run_dir / "endpoints.json").read_text())["launcher"]
    assert recorded["start_ticks"] is not None
    launcher.kill()
    launcher.wait()
    time.sleep(0.05)  # start times count clock ticks (10 ms): the next process starts later
    unrelated = sleeper()
    try:
        assert proc_identity(unrelated.pid)["start_ticks"] != recorded["start_ticks"]
        # the pid reused: the file names the live unrelated process, with the launcher's
        # start time (as after a real reuse)
        write_doc(run_dir, [instance(0), instance(1)],
                  launcher=dict(recorded, pid=unrelated.pid))
        status = invoke("status", str(run_dir))
        assert status.exit_code == 0
        assert status.stdout.startswith("launched run: ended; 0/2 instance(s) ready; ended "
                                        "(the launcher is not running")
        assert invoke("wait", str(run_dir), "--timeout", "5").exit_code == 1
        assert invoke("endpoints", str(run_dir)).exit_code == 1
        assert Run.open(run_dir).endpoints() == []
        cancel = invoke("cancel", str(run_dir))
        assert cancel.exit_code == 0
        assert f"pid {unrelated.pid} now names another process" in cancel.stderr
        assert "not signalled" in cancel.stderr
        time.sleep(0.2)
        assert unrelated.poll() is None  # not signalled
        # a launcher recorded before a reboot (another boot id) is no process here either
        write_doc(run_dir, [instance(0), instance(1)],
                  launcher=dict(recorded, pid=unrelated.pid,
                                start_ticks=proc_identity(unrelated.pid)["start_ticks"],
                                boot_id="00000000-0000-0000-0000-000000000000"))
        assert Run.open(run_dir).state().phase == "ended"
        assert invoke("cancel", str(run_dir)).exit_code == 0
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()


def test_cancel_signals_the_recorded_launcher_through_a_pidfd(tmp_path, monkeypatch):
    import aegis.pids

    sent = []
    real = signal.pidfd_send_signal
    monkeypatch.setattr(signal, "pidfd_send_signal",
                        lambda fd, sig, *a: (sent.append(sig), real(fd, sig, *a)))
    launcher = sleeper()
    try:
        run = Run.open(launched_run(tmp_path, pid=launcher.pid))
        assert run.cancel().startswith(f"sent SIGTERM to the launcher (pid {launcher.pid}")
        assert launcher.wait(timeout=10) == -signal.SIGTERM
        assert sent == [signal.SIGTERM]
    finally:
        launcher.kill()
    # where the kernel has no pidfd: the identity is checked right before kill()
    monkeypatch.setattr(aegis.pids.os, "pidfd_open", lambda pid: (_ for _ in ()).throw(
        OSError(38, "Function not implemented")))
    launcher = sleeper()
    try:
        assert Run.open(launched_run(tmp_path / "b", pid=launcher.pid)).cancel().startswith(
            "sent SIGTERM")
        assert launcher.wait(timeout=10) == -signal.SIGTERM
    finally:
        launcher.kill()


def test_a_heartbeat_from_the_future_vouches_for_nothing(tmp_path):
    """A launcher on another host is judged by its heartbeat alone: one written with a clock
    far ahead (or a forged one) must not keep a dead launcher alive."""
    future = launched_run(tmp_path / "a", pid=1, host="elsewhere",
                          heartbeat=time.time() + 3600)
    assert Run.open(future).state().phase == "ended"
    assert invoke("endpoints", str(future)).exit_code == 1
    skewed = launched_run(tmp_path / "b", pid=1, host="elsewhere", heartbeat=time.time() + 5)
    assert Run.open(skewed).state().phase == "ready"  # a few seconds of skew are fine
    slow = launched_run(tmp_path / "c", pid=1, host="elsewhere")
    doc = json.loads((slow / "endpoints.json").read_text())
    doc["launcher"]["heartbeat_interval"] = 1e9  # "stale after 95 years"
    (slow / "endpoints.json").write_text(json.dumps(doc))
    assert_refused(invoke("status", str(slow)), 2, "launcher.heartbeat_interval: out of range")


def test_a_launcher_record_without_its_start_time_is_never_signalled(tmp_path):
    """An endpoints file of an older aegis names a pid only: alive by its heartbeat (and its
    pid), but cancel cannot tell it from a reused pid, so it signals nothing and says why."""
    other = sleeper()
    try:
        run_dir = launched_run(tmp_path / "old")
        write_doc(run_dir, [instance(0), instance(1)],
                  routers=[{"model": "m", "url": "http://n1:9000/v1", "state": "ready"}],
                  launcher=launcher_record(other.pid, identity=False))
        assert Run.open(run_dir).state().phase == "ready"  # by its heartbeat
        cancel = invoke("cancel", str(run_dir))
        assert_refused(cancel, 1, f"cannot verify that pid {other.pid} is the launcher",
                       "records no start time", f"kill {other.pid}")
        time.sleep(0.2)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("what", ["run-dir", "endpoints-file", "run-dir-link", "group-writable",
                                  "endpoints-dir-world-writable"])
def test_a_run_directory_that_is_not_yours_is_refused(tmp_path, what):
    """Another user's run directory (or endpoints file) naming one of your processes, with its
    true identity: nothing acts on it; cancel signals nothing. Cancel also refuses a run
    directory others can write."""
    victim = sleeper()
    try:
        run_dir = launched_run(tmp_path, pid=victim.pid)
        if what == "run-dir":
            os.chown(run_dir, 65534, 65534)
        elif what == "endpoints-file":
            os.chown(run_dir / "endpoints.json", 65534, 65534)
        elif what == "run-dir-link":
            os.chown(run_dir, 65534, 65534)
            os.symlink(run_dir, tmp_path / "mine")
            run_dir = tmp_path / "mine"
        elif what == "group-writable":
            run_dir.chmod(0o775)
        else:
            (run_dir / "config.yaml").write_text(json.dumps(
                {"platform": "local", "model": "m", "instances": 2,
                 "endpoints_file": str(tmp_path / "shared" / "e.json")}))
            (tmp_path / "shared").mkdir(mode=0o777)
            (tmp_path / "shared").chmod(0o777)
            os.rename(run_dir / "endpoints.json", tmp_path / "shared" / "e.json")
        commands = RUN_COMMANDS if what not in ("group-writable", "endpoints-dir-world-writable") \
            else (("cancel",),)
        for command in commands:
            result = invoke(command[0], str(run_dir), *command[1:])
            assert_refused(result, 2, "not by you" if "writable" not in what else
                           "writable by others")
        time.sleep(0.2)
        assert victim.poll() is None  # nothing signalled
        with pytest.raises(ConfigError):
            Run.open(run_dir).cancel() if "writable" in what else Run.open(run_dir).state()
    finally:
        victim.kill()
        victim.wait()


def test_a_job_whose_run_directory_is_not_yours_is_answered_by_the_batch_system(
        tmp_path, monkeypatch, fake_batch):
    run_dir = submitted_run(tmp_path, monkeypatch, fake_batch, job_id="123")
    write_doc(run_dir, [instance(0)])  # as if ready: it must not be read
    os.chown(run_dir, 65534, 65534)
    fake_batch.answer("scontrol", out=f"JobId=123 JobState=RUNNING WorkDir={run_dir}\n")
    fake_batch.answer("squeue", out="RUNNING\n")
    status = invoke("status", "123", "--scheduler", "slurm")
    assert (status.exit_code, status.stdout) == (0, "running\n")
    assert invoke("endpoints", "123", "--scheduler", "slurm").exit_code == 2  # no run dir of yours


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _link(target: str):
    def make(path: Path) -> None:
        path.unlink(missing_ok=True)
        os.symlink(target, path)
    return make


def _text(text: str | bytes):
    def make(path: Path) -> None:
        path.unlink(missing_ok=True)
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return make


def _foreign(text: str):
    def make(path: Path) -> None:
        other = path.parent.parent / f"foreign-{path.name}"
        other.write_text(text)
        os.chown(other, 65534, 65534)
        path.unlink(missing_ok=True)
        os.symlink(other, path)
    return make


def _endpoints(**changes):
    """An endpoints document with some fields replaced (launcher.X / instances.0.X / X)."""
    def text() -> str:
        doc = {"schema": 1, "job": "j", "run_dir": "/r", "ready": 1, "total": 1,
               "launcher": launcher_record(host="elsewhere"), "instances": [instance(0)],
               "routers": []}
        for key, value in changes.items():
            parts = key.split("__")
            target = doc
            for part in parts[:-1]:
                target = target[int(part)] if part.isdigit() else target[part]
            target[parts[-1]] = value
        return json.dumps(doc)
    return text


# (id, file in the run directory, how to make it, words of the one-line refusal)
HOSTILE_RUN_FILES = [
    ("endpoints-fifo", "endpoints.json", _fifo, "not a regular file (a FIFO)"),
    ("endpoints-dev-zero", "endpoints.json", _link("/dev/zero"),
     "not a regular file (a character device)"),
    ("endpoints-directory", "endpoints.json", lambda p: (p.unlink(), p.mkdir()),
     "not a regular file (a directory)"),
    ("endpoints-foreign-link", "endpoints.json", _foreign("{}"), "owned by uid 65534"),
    ("endpoints-not-utf8", "endpoints.json", _text(b'{"x": "\xff\xfe"}'), "not UTF-8"),
    ("endpoints-not-json", "endpoints.json", _text("\u2603 garbage \x1b[2J"), "not JSON"),
    ("endpoints-deep", "endpoints.json", _text("[" * 100000 + "]" * 100000), "nested too deeply"),
    ("endpoints-nan-heartbeat", "endpoints.json",
     lambda p: p.write_text(_endpoints()().replace('"heartbeat_at": ', '"heartbeat_at": NaN, "x": ')),
     "NaN is not a number JSON allows"),
    ("endpoints-inf-heartbeat", "endpoints.json",
     lambda p: p.write_text(_endpoints()().replace('"heartbeat_at": ', '"heartbeat_at": 1e400, "x": ')),
     "launcher.heartbeat_at: out of range"),
    ("restarts-many", "endpoints.json", lambda p: p.write_text(_endpoints(instances__0__restarts="many")()),
     "instances[0].restarts: expected a number (got 'many')"),
    ("restarts-mapping", "endpoints.json", lambda p: p.write_text(_endpoints(instances__0__restarts={})()),
     "instances[0].restarts: expected a number (got {})"),
    ("state-list", "endpoints.json", lambda p: p.write_text(_endpoints(instances__0__state=["ready"])()),
     "instances[0].state: expected text"),
    ("instances-not-a-list", "endpoints.json", lambda p: p.write_text(_endpoints(instances={"0": 1})()),
     "no launcher record or instances list"),
    ("instance-not-a-record", "endpoints.json", lambda p: p.write_text(_endpoints(instances=[7])()),
     "instances[0]: expected an object"),
    ("routers-not-a-list", "endpoints.json", lambda p: p.write_text(_endpoints(routers="r")()),
     "routers: expected a list"),
    ("pid-huge", "endpoints.json", lambda p: p.write_text(_endpoints(launcher__pid=10 ** 30)()),
     "launcher.pid: out of range"),
    ("pid-true", "endpoints.json", lambda p: p.write_text(_endpoints(launcher__pid=True)()),
     "launcher.pid: expected a number"),
    ("heartbeat-text", "endpoints.json",
     lambda p: p.write_text(_endpoints(launcher__heartbeat_at="now")()),
     "launcher.heartbeat_at: expected a number"),
    ("interval-zero", "endpoints.json",
     lambda p: p.write_text(_endpoints(launcher__heartbeat_interval=0)()),
     "launcher.heartbeat_interval: out of range"),
    ("launcher-missing-state", "endpoints.json",
     lambda p: p.write_text(_endpoints(launcher={"pid": 1, "host": "h"})()),
     "launcher.state: missing"),
    ("host-escape", "endpoints.json",
     lambda p: p.write_text(_endpoints(instances__0__host="n1\x1b]0;pwned\x07")()),
     "instances[0].host: contains a control character"),
    ("url-newline", "endpoints.json",
     lambda p: p.write_text(_endpoints(instances__0__base_url="http://a/v1\nhttp://evil/v1")()),
     "instances[0].base_url: contains a control character"),
    ("host-lone-surrogate", "endpoints.json",
     lambda p: p.write_text(_endpoints()().replace('"host": "n1"', '"host": "\\ud800"')),
     "instances[0].host: not valid Unicode text"),
    ("config-fifo", "config.yaml", _fifo, "not a regular file (a FIFO)"),
    ("config-dev-zero", "config.yaml", _link("/dev/zero"), "not a regular file"),
    ("config-foreign-link", "config.yaml", _foreign("platform: local\nmodel: m\n"),
     "owned by uid 65534"),
    ("config-not-utf8", "config.yaml", _text(b"model: \xff\n"), "not UTF-8"),
    ("config-bad-key", "config.yaml", _text("platform: local\nmodel: m\nmax_restarts: many\n"),
     "config.yaml: max_restarts: expected an integer, got 'many'"),
    ("config-endpoints-file-dot", "config.yaml",
     _text("platform: local\nmodel: m\nendpoints_file: .\n"),
     "config.yaml: endpoints_file: '.' names a directory"),
    ("job-id-huge", "job.id", _text("1" * 100000), "larger than 4 KiB"),
    ("job-id-fifo", "job.id", _fifo, "not a regular file (a FIFO)"),
    ("job-id-garbage", "job.id", _text("12; rm -rf ~\n"), "'12; rm -rf ~' is not a job id"),
    ("job-id-long-line", "job.id", _text("x" * 4000 + ";"), "'" + "x" * 40 + "'... is not a job id"),
    ("job-id-not-utf8", "job.id", _text(b"\xff\xfe"), "not UTF-8"),
]


@pytest.mark.parametrize("case_id,name,make,needle", HOSTILE_RUN_FILES,
                         ids=[c[0] for c in HOSTILE_RUN_FILES])
def test_a_hostile_run_file_is_one_line_exit_2(tmp_path, no_hang, case_id, name, make, needle):
    run_dir = launched_run(tmp_path, pid=1, host="elsewhere")
    make(run_dir / name)
    for command in RUN_COMMANDS:
        result = invoke(command[0], str(run_dir), *command[1:])
        assert_refused(result, 2, needle)
    with pytest.raises(ConfigError):
        Run.open(run_dir).state()


def _chain(tmp_path: Path, record=None, endpoints=None) -> Path:
    """A chain directory whose one generation is a launched run."""
    chain_dir = tmp_path / "chain"
    chain_dir.mkdir()
    gen = launched_run(chain_dir / "g1", pid=1, host="elsewhere")
    text = json.dumps({"generations": [{"generation": 1, "job_id": "11", "run_dir": str(gen)}]}
                      if record is None else record) if not isinstance(record, str) else record
    (chain_dir / "chain.json").write_text(text)
    if endpoints is not None:
        (chain_dir / "endpoints.json").write_text(endpoints)
    return chain_dir


HOSTILE_CHAINS = [
    ("generation-1e400", '{"generations": [{"generation": 1e400, "job_id": "1", "run_dir": "x"}]}',
     None, "generations[0] is not {generation: 1-1000, job_id, run_dir}"),
    ("generation-text", {"generations": [{"generation": "one", "job_id": "1", "run_dir": "x"}]},
     None, "generations[0] is not"),
    ("generations-not-a-list", {"generations": {"1": "x"}}, None, "expected a list of at most"),
    ("record-not-a-mapping", [1, 2], None, "expected a list of at most"),
    ("job-id-garbage", {"generations": [{"generation": 1, "job_id": "$(id)", "run_dir": "x"}]},
     None, "generations[0] is not"),
    ("nan", '{"generations": NaN}', None, "NaN is not a number JSON allows"),
    ("points-at-itself", "SELF", None, "not a run directory"),
    ("endpoints-generation-1e400", None, "GEN:1e400",
     "unreadable endpoints file: generation: expected an integer (got inf)"),
    ("endpoints-generation-text", None, 'GEN:"2"',
     "unreadable endpoints file: generation: expected a number (got '2')"),
]


@pytest.mark.parametrize("case_id,record,endpoints,needle", HOSTILE_CHAINS,
                         ids=[c[0] for c in HOSTILE_CHAINS])
def test_a_hostile_chain_record_is_one_line_exit_2(tmp_path, no_hang, case_id, record,
                                                   endpoints, needle):
    if record == "SELF":
        record = {"generations": [{"generation": 1, "job_id": "1",
                                   "run_dir": str(tmp_path / "chain")}]}
    if endpoints is not None:
        endpoints = _endpoints()().replace('"schema": 1', f'"generation": {endpoints[4:]}, '
                                           '"schema": 1')
    chain_dir = _chain(tmp_path, record, endpoints)
    for command in RUN_COMMANDS:
        result = invoke(command[0], str(chain_dir), *command[1:])
        assert_refused(result, 2, needle)


@pytest.mark.parametrize("make,needle", [
    (_fifo, "not a regular file (a FIFO)"), (_link("/dev/zero"), "not a regular file"),
    (_foreign('{"generations": []}'), "owned by uid 65534")])
def test_a_chain_record_that_is_no_file_of_yours_is_refused(tmp_path, no_hang, make, needle):
    chain_dir = _chain(tmp_path)
    make(chain_dir / "chain.json")
    for command in RUN_COMMANDS:
        assert_refused(invoke(command[0], str(chain_dir), *command[1:]), 2, needle)


def test_cancel_refuses_a_chain_directory_others_can_write(tmp_path):
    victim = sleeper()
    try:
        chain_dir = _chain(tmp_path)
        write_doc(chain_dir, [instance(0), instance(1)],  # the chain's file names it
                  launcher=launcher_record(victim.pid))
        chain_dir.chmod(0o777)
        assert_refused(invoke("cancel", str(chain_dir)), 2, "chain directory is writable by "
                       "others (mode 0777)")
        time.sleep(0.2)
        assert victim.poll() is None
        chain_dir.chmod(0o755)
        assert invoke("cancel", str(chain_dir)).exit_code == 0
        assert victim.wait(timeout=10) == -signal.SIGTERM
    finally:
        victim.kill()
        victim.wait()


def test_the_chain_mirror_never_blocks_on_a_fifo(tmp_path, no_hang):
    from aegis.launch.chain import ChainMirror, successor

    _fifo(tmp_path / "endpoints.json")
    _fifo(tmp_path / "chain.json")
    assert ChainMirror(tmp_path, 1)({"ready": 1, "instances": []}, "") is True
    assert json.loads((tmp_path / "endpoints.json").read_text())["generation"] == 1
    assert successor(tmp_path, 1) is None


def test_an_unreadable_run_directory_is_one_line_exit_2(tmp_path):
    """A run directory of yours that you cannot read (mode 000). Tests run as root, who reads
    anything: the commands run as root without capabilities (setpriv), as a user would."""
    import shutil

    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop root's capabilities"
    run_dir = launched_run(tmp_path, pid=1, host="elsewhere")
    run_dir.chmod(0)
    src = Path(aegis.__file__).parents[1]
    try:
        for command in RUN_COMMANDS:
            proc = subprocess.run(
                [setpriv, "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-m",
                 "aegis", command[0], str(run_dir), *command[1:]],
                env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True,
                timeout=30)
            assert (proc.returncode, proc.stderr) == (2, (
                f"aegis: error: {run_dir}/config.yaml: cannot read the run's config "
                "(Permission denied)\n")), command
    finally:
        run_dir.chmod(0o700)


def test_wait_refuses_a_timeout_that_is_not_a_number(tmp_path, no_hang):
    run_dir = launched_run(tmp_path)
    write_doc(run_dir, [instance(0), instance(1, "starting")])  # never ready
    for value in ("nan", "inf", "NaN", "Infinity"):
        result = invoke("wait", str(run_dir), "--timeout", value)
        assert (result.exit_code, result.stderr) == (
            2, f"aegis: error: Invalid value for '--timeout': {value!r} is not a finite "
            "number\n")


def test_launch_with_a_directory_as_endpoints_file_writes_nothing(tmp_path):
    """`endpoints_file: "."` used to leave the run directory and a stray <run>.txt behind."""
    from test_launch_run import Run as Launch

    for value in (".", "..", "logs/", "config.yaml"):
        launch = Launch(tmp_path, [{"name": "m"}])
        res = launch.launch("--endpoints-file", value, "--once")
        assert res.returncode == 2, res.stderr
        assert res.stderr.splitlines()[0].startswith(
            f"aegis launch: error: endpoints_file (--endpoints-file): {value!r} ")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["aegis.yaml"]


def test_submit_with_a_directory_as_endpoints_file_writes_nothing(tmp_path, monkeypatch,
                                                                   fake_batch):
    monkeypatch.chdir(tmp_path)
    result = invoke("submit", "-c", str(EXAMPLES / "frontier.yaml"), "--endpoints-file", ".")
    assert result.exit_code == 2
    assert result.stderr.startswith("aegis: error: endpoints_file (--endpoints-file): '.' ")
    assert not (tmp_path / "aegis-runs").exists() and fake_batch.argv("sbatch") is None


def test_launch_replaces_a_fifo_where_its_config_goes(tmp_path):
    """`aegis launch --run-dir D` writes D/config.yaml: a FIFO there used to block it for good."""
    from test_launch_run import Run as Launch

    launch = Launch(tmp_path, [{"name": "m"}])
    launch.run_dir.mkdir()
    os.mkfifo(launch.run_dir / "config.yaml")
    res = launch.launch("--once", timeout=60)
    assert res.returncode == 0, res.stderr
    assert (launch.run_dir / "config.yaml").is_file()
    assert Run.open(launch.run_dir).state().phase == "ended"
