"""No gap at walltime: the job's end, draining then a clean stop before it, `submit --chain`
(Slurm dependency / PBS held successor released by its predecessor), and the chain's
endpoints file that names the newest generation serving."""

import json
import os
import stat
import time
import urllib.request

import pytest
import yaml
from click.testing import CliRunner

from aegis.cli import main
from aegis.launch.chain import ChainMirror, successor, takes_over
from aegis.launch.walltime import EXIT_MARGIN_S, job_end, schedule, walltime_seconds
from aegis.scheduler import PBSBackend, SlurmBackend

from test_launch_run import Run, _no_strays  # noqa: F401

# A batch command that appends its argv as one JSON line and answers job ids 101, 102, ...
# (FAIL_AT=k: the k-th call fails).
RECORDING = r"""#!/usr/bin/env python3
import json, os, sys
log = os.path.join(os.environ["REC_DIR"], os.path.basename(sys.argv[0]) + ".jsonl")
calls = sum(1 for _ in open(log)) if os.path.exists(log) else 0
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
if os.path.basename(sys.argv[0]) in ("sbatch", "qsub"):
    if os.environ.get("FAIL_AT") == str(calls + 1):
        print("queue full", file=sys.stderr); sys.exit(1)
    print(f"{101 + calls}" + (".pbs01" if sys.argv[0].endswith("qsub") else ""))
"""


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    bin_dir, rec = tmp_path / "bin", tmp_path / "rec"
    bin_dir.mkdir()
    rec.mkdir()
    for name in ("sbatch", "qsub", "scancel", "qdel", "qalter", "qrls"):
        (bin_dir / name).write_text(RECORDING)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("REC_DIR", str(rec))

    def calls(name):
        path = rec / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return calls


def test_job_end_and_schedule():
    assert walltime_seconds("01:02:03") == 3723
    assert job_end({"AEGIS_JOB_START": "1000"}, "00:10:00") == 1600
    assert job_end({}, "00:10:00") is None and job_end({"AEGIS_JOB_START": ""}, "1:00:00") is None
    plan = schedule(1600, drain_seconds=60, stop_grace=15)
    assert (plan.stop_at, plan.drain_at) == (1600 - EXIT_MARGIN_S - 15, 1600 - EXIT_MARGIN_S - 75)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300", "1e10000", "-5", "x",
                                   "12 34", "99999999999", "\u0661\u0662"])
def test_a_job_start_that_is_no_unix_time_is_refused(value):
    from aegis.config import ConfigError
    from aegis.launch.walltime import job_start

    with pytest.raises(ConfigError, match=r"^AEGIS_JOB_START: .* is not a Unix time in seconds "
                       r"\(the batch script sets it with `date \+%s`\); unset it for a launch "
                       r"by hand$"):
        job_end({"AEGIS_JOB_START": value}, "01:00:00")
    assert job_start({"AEGIS_JOB_START": " 1764600000 \n"}) == 1764600000.0


@pytest.mark.parametrize("value", ["nan", "inf", "1e300"])
def test_launch_refuses_a_job_start_that_is_no_unix_time(tmp_path, value):
    """It used to start everything, then die with a traceback computing the schedule."""
    run = Run(tmp_path, [{"name": "org/tiny", "served_model_name": "tiny"}])
    res = run.launch("--once", env={**_env(), "AEGIS_JOB_START": value}, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        f"aegis launch: error: AEGIS_JOB_START: {value!r} is not a Unix time in seconds (the "
        "batch script sets it with `date +%s`); unset it for a launch by hand"]
    assert not run.run_dir.exists()


def test_launch_drains_then_stops_cleanly_before_the_jobs_end(tmp_path):
    run = Run(tmp_path, [{"name": "org/tiny", "instances": 2, "served_model_name": "tiny"}],
              walltime="00:00:25", drain_seconds=5)
    start = time.time()
    end = start + 25  # the batch script records AEGIS_JOB_START; here the test does
    proc = run.start(env={**_env(), "AEGIS_JOB_START": str(int(start))})
    try:
        doc = run.wait_endpoints(lambda d: d["launcher"]["state"] == "draining", timeout=20)
        seen_draining = time.time()
        assert [i["state"] for i in doc["instances"]] == ["draining", "draining"]
        assert doc["ready"] == 0 and (run.run_dir / "endpoints.txt").read_text() == ""
        # still running: requests in flight (or sent by a slow client) are answered
        body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 1}).encode()
        key = (run.run_dir / "api-key").read_text().strip()  # the run's key (aegis.credential)
        req = urllib.request.Request(f"{doc['instances'][0]['base_url']}/completions", body,
                                     {"Content-Type": "application/json",
                                      "Authorization": f"Bearer {key}"})
        assert json.load(urllib.request.urlopen(req, timeout=5))["choices"]
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = time.time()
    assert proc.returncode == 0, err
    assert int(start) + 25 - 10 - 3 - 5 - 1 <= seen_draining  # not before drain_at
    assert stopped < end - EXIT_MARGIN_S + 2, (stopped, end)  # gone before the scheduler's kill
    assert "walltime: draining" in err and "walltime: stopping cleanly" in err
    final = run.endpoints()
    assert final["launcher"]["state"] == "stopped" and final["launcher"]["exit_code"] == 0
    assert run.leftovers() == []


def _env():
    from test_launch_run import ENV
    return dict(ENV)


def test_takes_over_only_when_newer_and_serving():
    serving, starting = {"ready": 2}, {"ready": 0}
    assert takes_over(None, 1, starting)  # the first writer
    assert takes_over({"generation": 1}, 1, starting)  # its own (draining, stopping too)
    assert not takes_over({"generation": 1}, 2, starting)  # a starting successor hides nothing
    assert takes_over({"generation": 1}, 2, serving)
    assert not takes_over({"generation": 2}, 1, serving)  # a predecessor never comes back


def test_chain_endpoints_name_the_newest_generation_that_serves(tmp_path):
    first, second = ChainMirror(tmp_path, 1), ChainMirror(tmp_path, 2)
    assert first({"ready": 1, "instances": ["a"]}, "a:1\n")
    assert not second({"ready": 0, "instances": ["b"]}, "")
    assert json.loads((tmp_path / "endpoints.json").read_text())["generation"] == 1
    assert second({"ready": 1, "instances": ["b"]}, "b:1\n")
    assert not first({"ready": 0, "instances": ["a"]}, "")  # the predecessor drains: unseen
    doc = json.loads((tmp_path / "endpoints.json").read_text())
    assert (doc["generation"], doc["instances"]) == (2, ["b"])
    assert (tmp_path / "endpoints.txt").read_text() == "b:1\n"
    assert stat.S_IMODE((tmp_path / "endpoints.json").stat().st_mode) == 0o600


def _chain_config(tmp_path, **extra):
    cfg = {"model": "m", "platform": "local", "walltime": "01:00:00", "chain_overlap": 900,
           "run_dir": str(tmp_path / "runs"), **extra}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_submit_chain_on_slurm_queues_each_successor_before_its_predecessors_end(
        tmp_path, recorder):
    result = CliRunner().invoke(main, ["submit", "-c", str(_chain_config(tmp_path)),
                                       "--chain", "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == ["101", "102", "103"]
    calls = recorder("sbatch")
    (chain_dir,) = (tmp_path / "runs").iterdir()
    assert [c[:-1] for c in calls] == [
        ["--parsable", "--export=ALL"],
        ["--parsable", "--export=ALL", "--dependency=after:101+45"],  # 60 - 15 minutes
        ["--parsable", "--export=ALL", "--dependency=after:102+45"]]
    assert [c[-1] for c in calls] == [str(chain_dir / f"gen-{k}" / "job.sh") for k in (1, 2, 3)]
    record = json.loads((chain_dir / "chain.json").read_text())
    assert [(g["generation"], g["job_id"]) for g in record["generations"]] == [
        (1, "101"), (2, "102"), (3, "103")]
    script = (chain_dir / "gen-2" / "job.sh").read_text()
    assert f"export AEGIS_CHAIN_DIR={chain_dir}" in script and "export AEGIS_GENERATION=2" in script
    assert successor(chain_dir, 2) == "103" and successor(chain_dir, 3) is None
    # generations alternate port blocks: a successor beside its predecessor can bind
    ports = [yaml.safe_load((chain_dir / f"gen-{k}" / "config.yaml").read_text())["port_start"]
             for k in (1, 2, 3)]
    assert ports == [8000, 8001, 8000]


def test_submit_chain_on_pbs_holds_successors_for_their_predecessor(tmp_path, recorder):
    result = CliRunner().invoke(main, ["submit", "-c", str(_chain_config(tmp_path)),
                                       "--scheduler", "pbs", "--chain", "2"])
    assert result.exit_code == 0, result.output
    second = recorder("qsub")[1]
    assert second[second.index("-W"):second.index("-W") + 3] == ["-W", "depend=after:101.pbs01",
                                                                 "-h"]
    PBSBackend().release_successor("102.pbs01", start_at=time.mktime((2026, 12, 1, 15, 4, 5, 0, 0, -1)))
    assert recorder("qalter") == [["-a", "202612011504.05", "102.pbs01"]]
    assert recorder("qrls") == [["102.pbs01"]]
    assert SlurmBackend().release_successor("5", 0) is None  # the dependency already says when


def test_a_failed_chain_submission_cancels_what_was_queued(tmp_path, recorder, monkeypatch):
    monkeypatch.setenv("FAIL_AT", "3")
    result = CliRunner().invoke(main, ["submit", "-c", str(_chain_config(tmp_path)),
                                       "--chain", "3"])
    assert result.exit_code == 1
    assert "queue full" in result.stderr and "cancelled 101, 102" in result.stderr
    assert recorder("scancel") == [["101"], ["102"]]


def test_chain_overlap_must_be_shorter_than_the_walltime(tmp_path, recorder):
    result = CliRunner().invoke(main, ["submit", "-c", str(_chain_config(tmp_path, walltime="00:10:00",
                                                                         chain_overlap=600)),
                                       "--chain", "2", "--dry-run"])
    assert result.exit_code == 2
    assert "chain_overlap: 600s is not shorter than the walltime 00:10:00" in result.stderr
    assert recorder("sbatch") == []


def test_the_jobs_end_during_startup_stops_cleanly_too(tmp_path):
    # 16 s: 10 s to exit + 3 s stop grace + 1 s draining leave 2 s to serve, not enough to start
    run = Run(tmp_path, [{"name": "org/slow", "served_model_name": "slow",
                          "extra_vllm_args": ["--start-delay", "30"]}], walltime="00:00:16",
              drain_seconds=1)
    res = run.launch(env={**_env(), "AEGIS_JOB_START": str(int(time.time()))}, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "walltime: stopping cleanly" in res.stderr
    assert run.endpoints()["launcher"]["state"] == "stopped"
    assert run.leftovers() == []


def test_a_pbs_generation_releases_its_successor_and_mirrors_its_endpoints(tmp_path, recorder):
    chain_dir = tmp_path / "chain"
    chain_dir.mkdir()
    (chain_dir / "chain.json").write_text(json.dumps({"generations": [
        {"generation": 1, "job_id": "201.pbs01"}, {"generation": 2, "job_id": "202.pbs01"}]}))
    run = Run(tmp_path, [{"name": "org/tiny", "served_model_name": "tiny"}], scheduler="pbs",
              walltime="01:00:00", chain_overlap=600)
    start = int(time.time())
    env = {**_env(), "PATH": os.environ["PATH"], "REC_DIR": os.environ["REC_DIR"],
           "AEGIS_JOB_START": str(start), "AEGIS_CHAIN_DIR": str(chain_dir),
           "AEGIS_GENERATION": "1"}
    res = run.launch("--once", env=env)
    assert res.returncode == 0, res.stderr
    when = time.strftime("%Y%m%d%H%M.%S", time.localtime(start + 3600 - 600))
    assert recorder("qalter") == [["-a", when, "202.pbs01"]]
    assert recorder("qrls") == [["202.pbs01"]]
    assert "next generation: job 202.pbs01 may start at" in res.stderr
    doc = json.loads((chain_dir / "endpoints.json").read_text())
    assert doc["generation"] == 1 and doc["launcher"]["state"] == "stopped"


def test_draining_takes_the_instances_out_of_the_router(tmp_path):
    from aegis.launch.router import router_installed

    assert router_installed(), "vllm-router is not installed (scripts/setup-dev)"
    # serving from ready until 45 - 10 - 3 - 8 = 24 s: time for the router under load
    run = Run(tmp_path, [{"name": "org/tiny", "instances": 2, "served_model_name": "tiny"}],
              walltime="00:00:45", drain_seconds=8)
    proc = run.start(env={**_env(), "AEGIS_JOB_START": str(int(time.time()))})
    try:
        serving = run.wait_endpoints(lambda d: d["launcher"]["state"] == "serving"
                                     and d["routers"] and d["routers"][0]["workers"] == 2,
                                     timeout=30)
        router = serving["routers"][0]
        workers_url = urllib.request.Request(
            f"http://{router['host']}:{router['port']}/list_workers",
            headers={"Authorization": f"Bearer {(run.run_dir / 'api-key').read_text().strip()}"})
        before = urllib.request.urlopen(workers_url, timeout=5).read().decode()
        assert all(f":{i['port']}" in before for i in serving["instances"]), before
        drained = run.wait_endpoints(lambda d: d["launcher"]["state"] == "draining", timeout=25)
        assert drained["ready"] == 0
        deadline = time.monotonic() + 5  # the router is told at once; allow its reply
        while time.monotonic() < deadline:
            after = urllib.request.urlopen(workers_url, timeout=5).read().decode()
            if not any(f":{i['port']}" in after for i in serving["instances"]):
                break
            time.sleep(0.1)
        assert not any(f":{i['port']}" in after for i in serving["instances"]), after
        _, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert run.leftovers() == []


def test_run_open_on_a_chain_names_the_newest_serving_generation(tmp_path, recorder,
                                                                 monkeypatch):
    from aegis.run import Run as HeldRun

    result = CliRunner().invoke(main, ["submit", "-c", str(_chain_config(tmp_path)),
                                       "--chain", "3"])
    assert result.exit_code == 0, result.output
    (chain_dir,) = (tmp_path / "runs").iterdir()
    first = HeldRun.open(chain_dir)  # nothing written yet: the first generation
    assert (first.job_id, first.chain_jobs) == ("101", ["101", "102", "103"])
    doc = {"generation": 2, "job": "102", "run_dir": str(chain_dir / "gen-2"), "ready": 1,
           "total": 1, "routers": [],
           "launcher": {"pid": 1, "host": "elsewhere", "ranks": 1, "state": "serving",
                        "heartbeat_at": time.time(), "heartbeat_interval": 5},
           "instances": [{"id": 0, "model": "m", "served_name": "m", "node": 0, "host": "n2",
                          "port": 8001, "state": "ready", "url": "http://n2:8001/v1",
                          "base_url": "http://n2:8001/v1"}]}
    (chain_dir / "endpoints.json").write_text(json.dumps(doc))
    run = HeldRun.open(chain_dir)
    assert run.job_id == "102" and run.run_dir == str(chain_dir / "gen-2")
    assert run.endpoints_path == str(chain_dir / "endpoints.json")
    # the job is running (no squeue here: a job it does not know has ended, serving nothing)
    monkeypatch.setattr(run.backend, "state", lambda job_id: "running")
    assert [e.url for e in run.endpoints()] == ["http://n2:8001/v1"]
    assert run.cancel() == "cancelled jobs 101, 102, 103"
    assert recorder("scancel") == [["101"], ["102"], ["103"]]
