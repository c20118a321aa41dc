"""The launcher end to end on this machine with the stand-in `vllm serve` (tests/standin_vllm.py).

Multi-node configs go through `aegis.launch.main`, which starts a real MPI job (the venv's
mpiexec, one rank per "node", every node 127.0.0.1)."""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from harness import RUN_MARKER, kill_marked, marked_processes, wait_gone, wait_standin_families
from ports import free_port_block

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests" / "standin_vllm.py"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
for var in ("PBS_NODEFILE", "SLURM_JOB_NODELIST", "PMI_SIZE", "PMI_RANK", "AEGIS_LAUNCH_RANKS"):
    ENV.pop(var, None)


def processes_with(token: str) -> list[str]:
    """Command lines of live processes mentioning token (the process-table check)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:  # bytes: any process of the machine may have a command line (or name) that is
            # not UTF-8 (setproctitle leftovers were seen), and only ours matter here
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if token in cmd and state != b"Z":
            found.append(f"{pid}: {cmd}")
    return found


def test_process_table_helpers_survive_processes_named_in_no_utf8():
    """Any process of a shared machine can carry a command line or a name that is not UTF-8
    (a setproctitle leftover broke the router test once: UnicodeDecodeError in
    processes_with); the helpers that scan /proc must skip past it."""
    from harness import standin_processes

    code = ("import ctypes, sys; ctypes.CDLL(None).prctl(15, b'\\xff\\xfeaegis-odd', 0, 0, 0); "
            "print('named', flush=True); sys.stdin.readline()")
    odd = subprocess.Popen([sys.executable, "-c", code, b"\xff\xfe-odd-argv"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert odd.stdout.readline() == b"named\n"
        assert Path(f"/proc/{odd.pid}/comm").read_bytes() == b"\xff\xfeaegis-odd\n"
        assert [line for line in processes_with("-odd-argv") if line.startswith(f"{odd.pid}:")]
        assert standin_processes("-odd-argv") == {} and marked_processes("-odd-argv") == {}
    finally:
        odd.kill()
        odd.wait()


class Run:
    """A config in tmp_path plus helpers to run the launcher on it."""

    made: list["Run"] = []

    def __init__(self, tmp_path: Path, models: list[dict], **settings):
        Run.made.append(self)
        self.token = f"tok{uuid.uuid4().hex[:10]}"  # in every instance's argv: find them in /proc
        self.tmp = tmp_path
        self.run_dir = tmp_path / "run"
        total = sum(m.get("instances", 1) for m in models)
        self.port = free_port_block(total)
        config = {"platform": "local", "port_start": self.port, "hf_home": str(tmp_path / "hf"),
                  "internal_port_start": 31000,
                  "vllm_command": f"{sys.executable} {STANDIN} serve", "startup_timeout": 20,
                  "models": [{**m, "name": f"{m['name']}-{self.token}"} for m in models],
                  **settings}
        self.config = tmp_path / "aegis.yaml"
        self.config.write_text(json.dumps(config))  # JSON is YAML

    def argv(self, *extra):
        return ["--config", str(self.config), "--run-dir", str(self.run_dir),
                "--poll-interval", "0.2", "--stop-grace", "3", "--restart-backoff", "0.2", *extra]

    def env(self, env=None):
        """The launcher's environment, marked: everything it starts inherits the token."""
        return {**(env or ENV), RUN_MARKER: self.token}

    def launch(self, *extra, timeout=60, env=None):
        """`aegis launch` (main): starts mpiexec itself when the plan needs several nodes."""
        code = "import sys; from aegis.launch.__main__ import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-c", code, *self.argv(*extra)],
                              env=self.env(env), capture_output=True, text=True, timeout=timeout)

    def start(self, *extra, env=None, quiet=False):
        code = "import sys; from aegis.launch.__main__ import main; sys.exit(main(sys.argv[1:]))"
        out = subprocess.DEVNULL if quiet else subprocess.PIPE
        return subprocess.Popen([sys.executable, "-c", code, *self.argv(*extra)],
                                env=self.env(env), stdout=out, stderr=out, text=True,
                                start_new_session=True)

    def endpoints(self):
        return json.loads((self.run_dir / "endpoints.json").read_text())

    def wait_endpoints(self, predicate, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                doc = self.endpoints()
                if predicate(doc):
                    return doc
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"endpoints never matched; last: {self.endpoints()}")

    def leftovers(self, timeout=5):
        """Processes of this run (launcher, keepers, instances, their children) still alive
        after `timeout` s; killed, so a failure leaves none."""
        found = wait_gone(self.token, timeout)
        kill_marked(self.token)
        return sorted(found.values())


@pytest.fixture(autouse=True)
def _no_strays():
    """Even a failing test leaves no process of its run behind."""
    yield
    while Run.made:
        Run.made.pop().leftovers()


def test_all_ready_once_writes_endpoints_and_leaves_nothing_running(tmp_path):
    run = Run(tmp_path, [{"name": "org/tiny", "instances": 2, "served_model_name": "tiny"}])
    res = run.launch("--once")
    assert res.returncode == 0, res.stderr
    doc = run.endpoints()
    # --once stops the servers after verifying them: the file must not list them as ready.
    assert doc["ready"] == 0 and doc["total"] == 2
    assert doc["launcher"]["state"] == "stopped" and doc["launcher"]["exit_code"] == 0
    assert [(i["port"], i["state"], i["url"], i["base_url"]) for i in doc["instances"]] == [
        (run.port + k, "stopped", f"http://127.0.0.1:{run.port + k}",
         f"http://127.0.0.1:{run.port + k}/v1") for k in range(2)]
    assert stat.S_IMODE((run.run_dir / "endpoints.json").stat().st_mode) == 0o600
    assert (run.run_dir / "endpoints.txt").read_text() == ""
    for k in range(2):
        assert (run.run_dir / "instances" / f"instance-000{k}.sh").is_file()
        assert "standin: serving 'tiny'" in (run.run_dir / "logs" / f"instance-000{k}.log").read_text()
    assert "2/2 instances ready" in res.stderr and res.stdout == ""
    assert run.leftovers() == []


def test_endpoints_follow_the_launch_from_staging_to_serving(tmp_path):
    run = Run(tmp_path, [{"name": "m", "instances": 2, "served_model_name": "m",
                          "extra_vllm_args": ["--start-delay", "1.5"]}])
    proc = run.start()
    seen = set()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                doc = run.endpoints()
            except (OSError, ValueError):
                time.sleep(0.02)
                continue
            seen.add((doc["launcher"]["state"], tuple(i["state"] for i in doc["instances"])))
            if doc["launcher"]["state"] == "serving":
                break
            time.sleep(0.02)
        assert doc["ready"] == 2 and doc["launcher"]["pid"] == proc.pid
        assert (run.run_dir / "endpoints.txt").read_text().count("\n") == 2
        # (each instance is listed ready as soon as it serves, before the others are decided)
        assert ("starting", ("starting", "starting")) in seen, seen
        beat = doc["launcher"]["heartbeat_at"]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    final = run.endpoints()
    assert final["launcher"]["state"] == "stopped" and final["launcher"]["exit_code"] == 143
    assert final["launcher"]["heartbeat_at"] >= beat and final["ready"] == 0
    assert [i["state"] for i in final["instances"]] == ["stopped", "stopped"]
    assert (run.run_dir / "endpoints.txt").read_text() == ""


def test_each_fault_is_reported_with_its_log_tail_across_two_ranks(tmp_path):
    run = Run(tmp_path, [
        {"name": "good", "served_model_name": "good"},
        {"name": "dies", "served_model_name": "dies", "extra_vllm_args": ["--fault", "exit-at-start"]},
        {"name": "stuck", "served_model_name": "stuck", "extra_vllm_args": ["--fault", "never-ready"]},
        {"name": "broken", "served_model_name": "broken",
         "extra_vllm_args": ["--fault", "bad-completions"]},
    ], startup_timeout=4)
    t0 = time.monotonic()
    res = run.launch("--once")
    assert res.returncode == 1, res.stderr
    assert "starting 2 ranks" in res.stderr  # 4 one-core instances on 2-core "nodes"
    states = {i["served_name"]: i for i in run.endpoints()["instances"]}
    # a failed start stops the good one too: it must not be listed as ready
    assert {k: v["state"] for k, v in states.items()} == {
        "good": "stopped", "dies": "failed", "stuck": "failed", "broken": "failed"}
    assert run.endpoints()["launcher"]["state"] == "failed"
    assert (run.run_dir / "endpoints.txt").read_text() == ""
    assert states["dies"]["exit_code"] == 3
    assert states["dies"]["error"] == "exited with code 3 during startup"
    assert states["stuck"]["error"].startswith("not ready within 4s; last check: /health answered 503")
    assert "1-token completion answered 500" in states["broken"]["error"]
    err = res.stderr
    assert "instance 1 (dies) on 127.0.0.1:" in err and "| standin: RuntimeError: simulated failure at start" in err
    assert "1/4 instances ready" in err
    assert time.monotonic() - t0 < 30
    assert run.leftovers() == []


def test_partial_start_allowed_exits_zero(tmp_path):
    run = Run(tmp_path, [{"name": "good", "served_model_name": "good"},
                         {"name": "dies", "extra_vllm_args": ["--fault", "exit-at-start"]}])
    res = run.launch("--once", "--allow-partial")
    assert res.returncode == 0, res.stderr
    assert "1/2 instances ready, 1 failed" in res.stderr
    assert [i["state"] for i in run.endpoints()["instances"]] == ["stopped", "failed"]


def test_port_already_taken_fails_fast_and_starts_nothing(tmp_path):
    run = Run(tmp_path, [{"name": "m", "instances": 2}])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", run.port + 1))
        squatter.listen()
        res = run.launch("--once")
    assert res.returncode == 1
    assert f"port {run.port + 1} on 127.0.0.1 (" in res.stderr and "nothing started" in res.stderr
    assert not (run.run_dir / "logs").exists() or not any((run.run_dir / "logs").iterdir())


def test_port_already_taken_with_allow_partial_fails_that_instance_only(tmp_path):
    run = Run(tmp_path, [{"name": "m", "instances": 2}])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", run.port + 1))
        squatter.listen()
        res = run.launch("--once", "--allow-partial")
    assert res.returncode == 0, res.stderr
    inst = run.endpoints()["instances"]
    assert inst[0]["state"] == "stopped" and inst[1]["state"] == "failed"  # --once stopped it
    assert inst[1]["error"] == f"port {run.port + 1} on 127.0.0.1 is already in use"
    assert not (run.run_dir / "logs" / "instance-0001.log").exists()


def test_hung_instance_is_stopped_and_restarted(tmp_path):
    marker = tmp_path / "hung-once"
    run = Run(tmp_path, [{"name": "m", "extra_vllm_args": [
        "--fault", "hang-after:3", "--crash-once-marker", str(marker), "--spawn-child"]}])
    proc = run.start("--liveness-interval", "0.2", "--probe-timeout", "0.5")
    try:
        doc = run.wait_endpoints(lambda d: d["instances"][0]["restarts"] == 1
                                 and d["instances"][0]["state"] == "ready")
        assert marker.exists()
        log = (run.run_dir / "logs" / "instance-0000.log").read_text()
        assert "standin: hanging" in log and "--- aegis: restart 1" in log
        # the hung server and its child went before the restart (it waits for the keeper,
        # which waits for both); the new server started its child before it listened
        alive = processes_with(run.token)
        assert len(alive) == 2 and sum("standin-child" in p for p in alive) == 1, alive
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped answering" in err and "restart 1/3" in err
    assert doc["instances"][0]["state"] == "ready"


def test_crash_is_restarted_then_sigterm_stops_everything(tmp_path):
    marker = tmp_path / "crashed-once"
    run = Run(tmp_path, [{"name": "m", "served_model_name": "m", "extra_vllm_args": [
        "--fault", "crash-after:3", "--crash-once-marker", str(marker), "--spawn-child"]}])
    proc = run.start()
    try:
        doc = run.wait_endpoints(lambda d: d["instances"][0]["restarts"] == 1
                                 and d["instances"][0]["state"] == "ready")
        assert marker.exists()
        # the restarted server and its child; the crashed one's child was cleared before the
        # restart (no settling time needed: the restart waits for the keeper's sweep)
        alive = processes_with(run.token)
        assert len(alive) == 2 and sum("standin-child" in p for p in alive) == 1, alive
        log = (run.run_dir / "logs" / "instance-0000.log").read_text()
        assert "crashing after 3 requests" in log and "--- aegis: restart 1" in log
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "restart 1/3" in err and "stopping on signal 15" in err
    assert run.leftovers() == []
    assert [i["state"] for i in run.endpoints()["instances"]] == ["stopped"]
    assert doc["instances"][0]["state"] == "ready"


def test_restarts_exhausted_fails_the_run(tmp_path):
    run = Run(tmp_path, [{"name": "m", "extra_vllm_args": ["--fault", "crash-after:3"]}],
              max_restarts=1)
    res = run.launch(timeout=60)
    assert res.returncode == 1, res.stderr
    inst = run.endpoints()["instances"][0]
    assert inst["state"] == "failed" and inst["restarts"] == 1
    assert inst["error"] == "exited with code 4 after 1 restart(s)"
    assert "every instance has failed" in res.stderr
    assert run.leftovers() == []


def test_sigterm_to_mpiexec_reaches_every_rank_and_leaves_no_child(tmp_path):
    run = Run(tmp_path, [{"name": "m", "instances": 4}])  # 2 per node -> 2 ranks
    proc = run.start()
    try:
        run.wait_endpoints(lambda d: d["ready"] == 4)
        mpiexec = [line for line in processes_with("mpiexec") if str(run.run_dir) in line]
        assert mpiexec, "aegis launch should have become an mpiexec job"
        assert len(processes_with(f"serve m-{run.token}")) == 4
        os.kill(proc.pid, signal.SIGTERM)  # the exec'd mpiexec; hydra forwards to the ranks
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert run.leftovers() == []
    assert {i["state"] for i in run.endpoints()["instances"]} == {"stopped"}


def test_api_key_reaches_vllm_through_the_environment_only(tmp_path):
    run = Run(tmp_path, [{"name": "m", "served_model_name": "m"}], api_key_env="AEGIS_TEST_KEY")
    key = f"key-{uuid.uuid4().hex}"
    res = run.launch("--once", env={**ENV, "AEGIS_TEST_KEY": key})
    assert res.returncode == 0, res.stderr  # the stand-in answers 401 to a probe without the key
    files = [p for p in run.tmp.rglob("*") if p.is_file()]
    assert files and not any(key in p.read_text(errors="replace") for p in files)
    missing = run.launch("--once")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "aegis launch: error: api_key_env: environment variable AEGIS_TEST_KEY is not set or empty"]


@pytest.mark.parametrize("extra, env_extra, message", [
    (["--nodes", "only-one"], {}, "the plan needs 2 node(s) but the allocation (--nodes) has 1: only-one"),
    ([], {"SLURM_JOB_NODELIST": "n1"}, "the plan needs 2 node(s) but the allocation (SLURM_JOB_NODELIST) has 1: n1"),
    (["--poll-interval", "5"], {}, "poll_interval (--poll-interval): 5.0 is out of range; must be > 0 and <= 1 seconds"),
    # bounded input: huge node ranges are counted, never built
    (["--nodes", "n[1-100000000]"], {},
     "--nodes: 'n[1-100000000]' names more than 100000 nodes; at most 100000 are supported"),
    (["--nodes", "a[1-1000]b[1-1000]"], {},
     "--nodes: 'a[1-1000]b[1-1000]' names more than 100000 nodes; at most 100000 are supported"),
    ([], {"SLURM_JOB_NODELIST": "n[0-99999999999999999]"},
     "SLURM_JOB_NODELIST: 'n[0-99999999999999999]' names more than 100000 nodes; at most 100000 are supported"),
    (["--nodes", "n[1-3],x$(id)"], {}, "--nodes: 'x$(id)' is not a host name"),
    (["--nodefile", "/dev/zero"], {}, "--nodefile /dev/zero: larger than 65536 KiB"),
    ([], {"PBS_NODEFILE": "/dev/zero"},
     "PBS_NODEFILE /dev/zero: cannot read it (larger than 65536 KiB)"),
    # timing knobs: NaN, inf and 0 refused
    (["--stop-grace", "nan"], {}, "stop_grace (--stop-grace): nan is out of range; must be > 0 and <= 3600 seconds"),
    (["--stop-grace", "0"], {}, "stop_grace (--stop-grace): 0.0 is out of range; must be > 0 and <= 3600 seconds"),
    (["--restart-backoff", "0"], {}, "restart_backoff (--restart-backoff): 0.0 is out of range; must be > 0 and <= 3600 seconds"),
    (["--restart-backoff", "inf"], {}, "restart_backoff (--restart-backoff): inf is out of range; must be > 0 and <= 3600 seconds"),
    (["--restart-backoff", "nan"], {}, "restart_backoff (--restart-backoff): nan is out of range; must be > 0 and <= 3600 seconds"),
    (["--probe-timeout", "inf"], {}, "probe_timeout (--probe-timeout): inf is out of range; must be > 0 and <= 3600 seconds"),
    (["--liveness-interval", "0"], {}, "liveness_interval (--liveness-interval): 0.0 is out of range; must be > 0 and <= 86400 seconds"),
    (["--poll-interval", "nan"], {}, "poll_interval (--poll-interval): nan is out of range; must be > 0 and <= 1 seconds"),
    (["--startup-timeout", "inf"], {},
     "startup_timeout (--startup-timeout): inf is out of range; must be > 0 and <= 604800 seconds"),
    (["--max-restarts", "99999999999"], {},
     "max_restarts (--max-restarts): 99999999999 is out of range; must be between 0 and 1000000"),
])
def test_bad_input_is_one_line_exit_2_and_starts_nothing(tmp_path, extra, env_extra, message):
    run = Run(tmp_path, [{"name": "m", "instances": 3}])
    res = run.launch(*extra, env={**ENV, **env_extra})
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"aegis launch: error: {message}"]
    assert not run.run_dir.exists()


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if not re.match(r"\d\d:\d\d:\d\d aegis launch: starting", line)]


def test_run_dir_on_a_read_only_file_system_is_refused_on_every_rank(tmp_path):
    run = Run(tmp_path, [{"name": "m", "instances": 3}])  # 2 ranks: rank 0 checks, both stop
    res = run.launch("--run-dir", "/sys/aegis-run")  # sysfs: no regular files, even for root
    assert res.returncode == 2
    assert _errors(res.stderr) == [
        "aegis launch: error: --run-dir /sys/aegis-run: cannot write in /sys (Permission denied)"]
    assert run.leftovers() == []


@pytest.mark.parametrize("endpoints", ["endpoints.json", "endpoints.txt"])
def test_endpoints_file_that_cannot_be_written_is_refused_on_every_rank(tmp_path, endpoints):
    """A directory where the endpoints file (or its .txt twin) goes; 2 ranks (mpiexec)."""
    target = tmp_path / "ep" / endpoints
    target.mkdir(parents=True)
    run = Run(tmp_path, [{"name": "m", "instances": 3}],
              endpoints_file=str(tmp_path / "ep" / "endpoints.json"))
    res = run.launch()
    assert res.returncode == 2, res.stderr
    assert _errors(res.stderr) == [
        f"aegis launch: error: endpoints_file {tmp_path}/ep/endpoints.json: {target} is a "
        "directory"]
    assert not run.run_dir.exists() and run.leftovers() == []


@pytest.mark.parametrize("host, why", [("999.1.1.1", "Name or service not known"),
                                       ("192.0.2.1", "Cannot assign requested address")])
def test_a_bind_host_that_is_no_address_here_is_reported_as_such(tmp_path, host, why):
    run = Run(tmp_path, [{"name": "m"}], allow_partial=True)  # a bad address is bad input anyway
    res = run.launch("--bind-host", host)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        f"aegis launch: error: cannot listen on {host} port {run.port}: {why} (127.0.0.1)"]
    assert not run.run_dir.exists() and run.leftovers() == []


def test_too_few_nodes_from_pbs_nodefile_on_every_rank(tmp_path):
    run = Run(tmp_path, [{"name": "m", "instances": 3}])
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("x1\nx1\n")
    # -genv: only the ranks see PBS_NODEFILE (hydra itself would try to ssh to x1).
    res = subprocess.run([str(Path(sys.executable).parent / "mpiexec"), "-n", "2",
                          "-genv", "PBS_NODEFILE", str(nodefile), sys.executable,
                          "-m", "aegis.launch", *run.argv()], env=ENV, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    expected = "aegis launch: error: the plan needs 2 node(s) but the allocation (PBS_NODEFILE) has 1: x1"
    # one line from each rank and nothing else (mpiexec may run the two lines together)
    assert res.stderr.count(expected) == 2 and not res.stderr.replace(expected, "").strip()


def test_missing_config_and_unknown_option(tmp_path):
    code = "import sys; from aegis.launch.__main__ import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, "--config", str(tmp_path / "nope.yaml")],
                         env=ENV, capture_output=True, text=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "nope.yaml" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "aegis.launch", "--config", "x", "--bogus"],
                         env=ENV, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == "aegis: error: No such option '--bogus'."


# --- nothing survives the launcher, even killed outright (attacks; each a regression test) ---

# Every instance spawns what vLLM's engine does and worse: a child, a grandchild, and a
# process in its own session whose parent has exited (re-parented away from the group).
FAMILY = ["--spawn-child", "--spawn-grandchild", "--spawn-daemon"]


def _wait_family(run, instances: int, timeout=30) -> dict[int, tuple[int, str]]:
    """Until every instance's server and its 4 spawned processes run, each where it stays
    (harness.unsettled_families: counting them is not enough); pid -> (parent, role)."""
    return wait_standin_families(run.token, instances, timeout)


def _pids(lines: list[str]) -> list[int]:
    """The pids of processes_with()'s "pid: command" lines."""
    return [int(line.split(":")[0]) for line in lines]


def _sigkill_leaves_nothing(run, pid, within=10.0):
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    left = run.leftovers(timeout=within)
    assert left == [], f"left {time.monotonic() - t0:.1f}s after SIGKILL: {left}"


@pytest.mark.parametrize("when", ["ready", "startup"])
def test_sigkilled_launcher_leaves_no_process_of_any_instance(tmp_path, when):
    # one instance ignores SIGTERM (and so do its children): only KILL ends it; at startup
    # they listen only after 30 s, so the launcher is killed while it probes them
    late = ["--start-delay", "30"] if when == "startup" else []
    run = Run(tmp_path, [{"name": "m", "instances": 2, "extra_vllm_args": [*FAMILY, *late]},
                         {"name": "deaf", "extra_vllm_args": [*FAMILY, *late, "--ignore-term"]}],
              startup_timeout=60)
    proc = run.start("--stop-grace", "30", quiet=True)  # death must not wait for the grace
    try:
        if when == "ready":
            run.wait_endpoints(lambda d: d["ready"] == 3)
        _wait_family(run, 3)
        _sigkill_leaves_nothing(run, proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    doc = run.endpoints()  # the file cannot say "stopped", but its heartbeat stops
    from aegis.runfiles import launcher_alive

    assert not launcher_alive(doc, doc["launcher"]["heartbeat_at"] + 16)


def test_sigkilled_launcher_during_staging_leaves_nothing(tmp_path):
    source = tmp_path / "src-model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    with open(source / "model.safetensors", "wb") as f:  # sparse: big to stage, cheap to make
        f.truncate(4 << 30)
    run = Run(tmp_path, [{"name": "m", "model_source": str(source)}])
    proc = run.start(quiet=True)
    try:
        run.wait_endpoints(lambda d: d["launcher"]["state"] == "staging")
        time.sleep(0.5)
        assert (run.endpoints()["launcher"]["state"] == "staging"
                and proc.poll() is None), "staging ended too soon to be attacked"
        _sigkill_leaves_nothing(run, proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    assert processes_with(run.token) == []


def test_stopped_instance_and_deaf_instance_are_killed_after_the_grace(tmp_path):
    """SIGSTOP one instance, another ignores SIGTERM: a SIGTERM to the launcher still ends
    everything, KILL after --stop-grace."""
    run = Run(tmp_path, [{"name": "m", "extra_vllm_args": FAMILY},
                         {"name": "deaf", "extra_vllm_args": [*FAMILY, "--ignore-term"]}])
    proc = run.start("--stop-grace", "2", "--liveness-interval", "60")
    try:
        run.wait_endpoints(lambda d: d["ready"] == 2)
        _wait_family(run, 2)
        frozen = [int(p.split(":")[0]) for p in processes_with(f"serve m-{run.token}")]
        assert len(frozen) == 1
        os.kill(frozen[0], signal.SIGSTOP)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert run.leftovers(timeout=0) == [] and took < 2 + 5, took


def test_sigstopped_instance_counts_as_hung_and_is_replaced(tmp_path):
    run = Run(tmp_path, [{"name": "m", "extra_vllm_args": FAMILY}])
    proc = run.start("--liveness-interval", "0.3", "--probe-timeout", "0.5", "--stop-grace", "1")
    try:
        run.wait_endpoints(lambda d: d["ready"] == 1)
        first = _wait_family(run, 1)
        (server,) = [pid for pid, (_, role) in first.items() if role == "server"]
        os.kill(server, signal.SIGSTOP)
        run.wait_endpoints(lambda d: d["instances"][0]["restarts"] == 1
                           and d["instances"][0]["state"] == "ready")
        # the whole old family went before the replacement started (the restart waits for
        # its keeper, which waits for every descendant): nothing of it is left now
        left = processes_with(run.token)
        assert not set(first) & set(_pids(left)), (first, left)
        second = _wait_family(run, 1)  # the new family complete and settled: it stays so
        alive = processes_with(run.token)
        assert set(_pids(alive)) == set(second) and len(alive) == 5, (second, alive)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert run.leftovers() == []


def test_unwritable_run_directory_is_refused_before_anything_starts(tmp_path):
    run = Run(tmp_path, [{"name": "m"}])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = run.launch("--once", "--run-dir", str(blocker / "run"))
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"aegis launch: error: --run-dir {blocker / 'run'}: {blocker} is not a directory"]
    assert processes_with(run.token) == []


def _rank_pids(run) -> dict[int, int]:
    """MPI rank -> pid of the launcher ranks of this run."""
    ranks = {}
    for pid, cmd in marked_processes(run.token).items():
        if "-m aegis.launch" in cmd or "from aegis.launch.__main__ import main" in cmd:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for var in env:
                if var.startswith(b"PMI_RANK="):
                    ranks[int(var.split(b"=")[1])] = pid
    return ranks


@pytest.mark.parametrize("victim", ["mpiexec", "rank 0", "rank 1"])
def test_sigkill_of_mpiexec_or_one_rank_leaves_nothing_on_any_node(tmp_path, victim):
    run = Run(tmp_path, [{"name": "m", "instances": 4, "extra_vllm_args": FAMILY}])  # 2 ranks
    proc = run.start(quiet=True)
    try:
        run.wait_endpoints(lambda d: d["ready"] == 4)
        _wait_family(run, 4)
        ranks = _rank_pids(run)
        assert sorted(ranks) == [0, 1], ranks
        pid = proc.pid if victim == "mpiexec" else ranks[int(victim[-1])]
        _sigkill_leaves_nothing(run, pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_sigkilled_launcher_during_the_node_prewarm_leaves_nothing(tmp_path):
    """The pre-warm command (and what it starts) dies with the launcher too."""
    run = Run(tmp_path, [{"name": "m"}], node_local_dir=str(tmp_path / "node-local"),
              prewarm_command="bash -c 'sleep 300 & sleep 300; wait'")
    proc = run.start(quiet=True)
    try:
        deadline = time.monotonic() + 30
        while sum("sleep 300" in c for c in marked_processes(run.token).values()) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, marked_processes(run.token)
            time.sleep(0.1)
        _sigkill_leaves_nothing(run, proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_a_killed_keeper_leaves_nothing_either(tmp_path):
    """SIGKILL of a keeper (not the launcher): its instance's leader dies with it and the
    launcher, a subreaper, removes the rest, then restarts the instance."""
    run = Run(tmp_path, [{"name": "m", "extra_vllm_args": FAMILY}])
    proc = run.start("--stop-grace", "2", quiet=True)
    try:
        run.wait_endpoints(lambda d: d["ready"] == 1)
        _wait_family(run, 1)
        first = set(marked_processes(run.token))
        keepers = [p for p, c in marked_processes(run.token).items() if "keeper.py" in c]
        assert len(keepers) == 1
        os.kill(keepers[0], signal.SIGKILL)
        run.wait_endpoints(lambda d: d["instances"][0]["restarts"] == 1
                           and d["instances"][0]["state"] == "ready")
        # removed before the restart (remove_strays), so already gone now: no settling time
        alive = marked_processes(run.token)
        assert not (first - {proc.pid}) & set(alive), alive
        _wait_family(run, 1)
        alive = marked_processes(run.token)
        assert len(processes_with(run.token)) == 5, alive
        zombies = [pid for pid in alive if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"]
        assert zombies == []
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert run.leftovers() == []
