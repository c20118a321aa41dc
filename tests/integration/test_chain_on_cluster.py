"""No gap at walltime, on the real test cluster: `aegis submit --chain 2` with a 4-minute
walltime and stand-in instances. The successor is queued to start 1 minute after its
predecessor (Slurm after:<id>+1), stages and starts while the predecessor serves; the
predecessor drains and stops cleanly before its walltime. A client that only reads the chain's
endpoints file keeps getting completions across the switch: the longest stretch without an
answer is measured (and printed), and no process of the first job is left.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import slurm_jobs as sj
import yaml
from harness import aegis_argv
from ports import free_port_block
from test_submit_on_cluster import STANDIN, job_env, job_log

pytestmark = pytest.mark.slurm

MAX_GAP_S = 5.0


class Client:
    """Polls the chain's endpoints file and sends a 1-token completion to a ready instance
    about 20 times a second (each with a 2 s timeout). Records every answer's time."""

    def __init__(self, endpoints: Path):
        self.endpoints = endpoints
        self.answers: list[tuple[float, int]] = []  # (time, generation)
        self.errors = 0
        self.generations_seen: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self):
        while not self._stop.is_set():
            try:
                doc = json.loads(self.endpoints.read_text())
            except (OSError, ValueError):
                time.sleep(0.1)
                continue
            state = (doc.get("generation"), doc["launcher"]["state"])
            if not self.generations_seen or self.generations_seen[-1][1:] != state:
                self.generations_seen.append((time.time(), *state))
            ready = [i for i in doc["instances"] if i["state"] == "ready"]
            if not ready:
                time.sleep(0.1)
                continue
            inst = ready[0]
            body = json.dumps({"model": inst["served_name"], "prompt": "hi",
                               "max_tokens": 1}).encode()
            key_file = self.endpoints.parent / "api-key"  # one key for the whole chain
            request = urllib.request.Request(
                f"{inst['base_url']}/completions", body,
                {"Content-Type": "application/json",
                 "Authorization": f"Bearer {key_file.read_text().strip()}"})
            try:
                with urllib.request.urlopen(request, timeout=2) as reply:
                    json.load(reply)
                self.answers.append((time.time(), doc["generation"]))
                time.sleep(0.05)  # a steady client, not a load test on a shared machine
            except OSError:
                self.errors += 1
                time.sleep(0.1)

    def longest_gap(self) -> float:
        times = [t for t, _ in self.answers]
        return max((b - a for a, b in zip(times, times[1:])), default=float("inf"))


@pytest.mark.timeout(600)  # one generation runs its whole (4-minute) walltime
def test_chain_keeps_serving_across_walltime(tmp_path, jobs, venv_bin):
    from aegis.platforms import get_platform

    config = {
        "model": "aegis-test/chain",
        "served_model_name": "chain",
        "tensor_parallel_size": get_platform("local").devices_per_node,  # one node each
        "platform": "local",
        "run_dir": str(tmp_path / "runs"),
        "port_start": free_port_block(2),  # generation 2 takes the next port
        "vllm_command": f"{sys.executable} {STANDIN} serve",
        "startup_timeout": 60,
        "walltime": "00:04:00",
        "chain_overlap": 180,  # generation 2: after:<gen 1>+1 (minutes)
        "drain_seconds": 15,
        "job_name": f"aegis-chain-{tmp_path.name[-8:]}",
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = sj.run([*aegis_argv(), "submit", "-c", str(path), "--scheduler", "slurm",
                   "--chain", "2"], check=False, env=job_env(venv_bin), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split()
    jobs.extend([first, second])
    (chain_dir,) = (tmp_path / "runs").iterdir()
    assert f"chain directory {chain_dir}" in proc.stderr
    assert sj.run(["scontrol", "show", "job", second]).stdout.count(f"after:{first}+1") == 1

    client = Client(chain_dir / "endpoints.json")
    try:
        sj.wait_for_file(chain_dir / "endpoints.json", timeout=120, job_id=first)
        client.start()
        # generation 1 runs to its walltime: drains, stops cleanly, the job completes
        assert sj.wait_finished(first, timeout=300) == "COMPLETED", job_log(chain_dir / "gen-1")
        time.sleep(10)  # generation 2 keeps serving after its predecessor is gone
    finally:
        client.stop()
    gen1_log = job_log(chain_dir / "gen-1")
    assert "walltime: draining" in gen1_log and "walltime: stopping cleanly" in gen1_log

    gap = client.longest_gap()
    generations = sorted({g for _, g in client.answers})
    switch = next((t for t, g in client.answers if g == 2), None)
    print(f"\nchain: {len(client.answers)} answers, {client.errors} errors, generations "
          f"{generations}; longest stretch without an answer {gap:.2f} s; "
          f"endpoints file states: {[(round(t - client.generations_seen[0][0], 1), g, s) for t, g, s in client.generations_seen]}")
    assert generations == [1, 2], client.generations_seen
    assert gap < MAX_GAP_S, f"no answer for {gap:.2f} s across the generation switch"
    assert switch is not None
    # the first job left nothing behind
    left = sj.wait_no_processes(str(chain_dir / "gen-1"), timeout=30)
    assert left == [], f"processes of the first generation left: {left}"
    doc = json.loads((chain_dir / "endpoints.json").read_text())
    assert doc["generation"] == 2 and doc["ready"] == 1
    sj.cancel(second)
    assert sj.wait_finished(second, timeout=60) in {"CANCELLED", "COMPLETED"}
    assert sj.wait_no_processes(str(chain_dir / "gen-2"), timeout=30) == []
