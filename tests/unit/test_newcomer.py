"""The newcomer flow without traps (issue 21 §2, 3, 5, 6), each a regression test that failed
on e12ed61:

- `aegis launch --run-dir NAME &` then `aegis wait NAME` (a bare name) waits for NAME;
- `aegis wait ./c.yaml` (a file) is refused at once; a run directory that never appears ends
  the wait after a default limit instead of hanging;
- a serving run with an instance down is `ready` (degraded), and --min-ready decides;
- launcher log lines carry the time; `aegis cancel --wait` returns once the run stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from aegis import cli
from aegis.run import Run
from harness import aegis_argv
from test_launch_run import ENV
from test_launch_run import Run as LaunchRun
from test_launch_run import _no_strays  # noqa: F401 (autouse: no strays)
from test_run import instance, launched_run, write_doc


def test_wait_on_a_bare_name_waits_for_the_launch_to_make_it(tmp_path):
    launch = LaunchRun(tmp_path, [{"name": "m", "served_model_name": "m"}])
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{ENV['PATH']}"}
    waiter = subprocess.Popen([*aegis_argv(), "wait", "myrun", "--timeout", "60"], cwd=work,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # the wait starts first, as in `aegis launch ... & aegis wait NAME`
    launch.run_dir = work / "myrun"
    proc = launch.start()
    try:
        out, err = waiter.communicate(timeout=90)
        assert waiter.returncode == 0, err
        assert "waiting for myrun to appear" in err
        assert out.strip() == f"http://127.0.0.1:{launch.port}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_wait_on_a_file_is_refused_at_once(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: m\n")
    t0 = time.monotonic()
    result = CliRunner().invoke(cli.main, ["wait", str(config)])
    assert result.exit_code == 2 and time.monotonic() - t0 < 5
    assert f"{config}: not a run directory (a file;" in result.output


def test_wait_for_a_run_directory_that_never_appears_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "APPEAR_TIMEOUT", 1.0)
    t0 = time.monotonic()
    result = CliRunner().invoke(cli.main, ["wait", str(tmp_path / "typo")])
    assert result.exit_code == cli.EXIT_TIMEOUT and time.monotonic() - t0 < 10
    assert "not made within 1s; --timeout S waits longer" in result.output


def test_a_serving_run_with_an_instance_down_is_ready_degraded(tmp_path):
    run_dir = launched_run(tmp_path, instances=3, router=False)
    write_doc(run_dir, [instance(0), instance(1, "restarting"), instance(2, "unhealthy")])
    st = Run.open(run_dir).state()
    assert st.phase == "ready" and st.reason == "degraded: 1 of 3 instance(s) ready"
    assert Run.open(run_dir).state(min_ready=2).phase == "starting"
    result = CliRunner().invoke(cli.main, ["wait", str(run_dir), "--timeout", "5"])
    assert result.exit_code == 0 and result.output.strip().endswith("http://n1:8000/v1")
    # while the fleet is still starting, every instance is awaited (unless --min-ready)
    launcher = json.loads((run_dir / "endpoints.json").read_text())["launcher"]
    write_doc(run_dir, [instance(0), instance(1, "starting"), instance(2, "starting")],
              launcher={**launcher, "state": "starting"})
    assert Run.open(run_dir).state().phase == "starting"
    assert Run.open(run_dir).state(min_ready=1).phase == "ready"


def test_launcher_lines_carry_the_time_and_cancel_wait_returns_once_stopped(tmp_path):
    launch = LaunchRun(tmp_path, [{"name": "m", "served_model_name": "m"}])
    proc = launch.start()
    try:
        Run.open(launch.wait_endpoints(lambda d: d["launcher"]["state"] == "serving")
                 ["run_dir"])
        result = subprocess.run([*aegis_argv(), "cancel", str(launch.run_dir), "--wait",
                                 "--timeout", "60"], env=ENV, capture_output=True, text=True,
                                timeout=90)
        assert result.returncode == 0, result.stderr
        assert proc.poll() is not None, "cancel --wait returned before the launcher ended"
        assert result.stderr.strip().endswith("aegis: stopped")
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert launch.leftovers() == []
    logged = [line for line in err.splitlines() if "aegis launch [rank 0]" in line]
    assert logged and all(re.match(r"\d\d:\d\d:\d\d aegis launch \[rank 0\]: ", line)
                          for line in logged), logged
