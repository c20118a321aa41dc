"""`aegis batch` end to end on a real `aegis launch` (stand-in servers, the real vllm-router):
500 lines straight to the instances with one instance SIGKILLed mid-batch (the launcher
restarts it), then 500 through the router with the batch client itself SIGKILLed mid-batch and
run again. Each time every custom_id is in the output exactly once, every answer a 200."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aegis.launch.router import router_installed
from batch_fleet import output_ids, write_input
from test_batch import ENV, assert_once, records
from test_launch_router import _instance_pid, _open_when_there
from test_launch_run import Run as LaunchRun
from test_launch_run import _no_strays  # noqa: F401 (autouse: no strays)

AEGIS = [sys.executable, "-m", "aegis.cli"]


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _lines(path) < n:
        assert proc.poll() is None, f"the batch ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path}: fewer than {n} lines"
        time.sleep(0.01)


def test_batch_over_a_launched_run_survives_a_killed_instance_and_a_killed_client(tmp_path):
    assert router_installed(), "vllm-router is not installed (pip install -e '.[test]')"
    launch = LaunchRun(tmp_path, [{"name": "m", "served_model_name": "m", "instances": 2,
                                   "extra_vllm_args": ["--delay", "0.1"]}],
                       restart_backoff=0.2)
    proc = launch.start(quiet=True)
    try:
        run = _open_when_there(launch.run_dir, timeout=30)
        run.wait_ready(timeout=60)
        ports = [launch.port, launch.port + 1]
        inp = write_input(tmp_path / "in.jsonl", 500)
        base = [*AEGIS, "batch", str(launch.run_dir), str(inp), "--max-in-flight", "4",
                "--json"]

        # 1. straight to the instances; instance 0 SIGKILLed mid-batch
        direct = tmp_path / "direct.jsonl"
        client = subprocess.Popen([*base, "-o", str(direct), "--target", "instances"],
                                  env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        _wait_lines(direct, 100, client)
        os.kill(_instance_pid(ports[0]), signal.SIGKILL)
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err
        counts = json.loads(out)
        assert counts["done"] == 500 and counts["failed"] == 0, counts
        assert counts["retries"] >= 1, counts  # it had requests in flight when it died
        assert_once(direct, 500)
        fingerprints = {r["response"]["body"]["system_fingerprint"] for r in records(direct)}
        assert fingerprints == {f"standin-{p}" for p in ports}

        # the launcher restarted it; the router has both again
        deadline = time.monotonic() + 60
        while True:
            st = run.state()
            if st.ready == 2 and st.instances[0].restarts == 1 and \
                    [r.state for r in st.routers] == ["ready"]:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.2)

        # 2. through the router; the batch client SIGKILLed mid-batch, then run again
        routed = tmp_path / "routed.jsonl"
        argv = [*base, "-o", str(routed), "--target", "router"]
        client = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        _wait_lines(routed, 150, client)
        client.kill()
        client.communicate(timeout=30)
        kept = output_ids(routed)
        assert 150 <= len(kept) < 500 and len(set(kept)) == len(kept)
        again = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        counts = json.loads(again.stdout)
        assert counts["skipped"] == len(kept) and counts["done"] == 500 - len(kept), counts
        assert f"resuming: {len(kept)} answer(s) already in" in again.stderr
        assert_once(routed, 500)
        # the router spread them over both instances
        fingerprints = {r["response"]["body"]["system_fingerprint"] for r in records(routed)}
        assert fingerprints == {f"standin-{p}" for p in ports}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert launch.leftovers() == []
