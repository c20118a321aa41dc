"""The pre-warm in a real launch: two launcher ranks (mpiexec) on this one machine run it once,
before any instance starts; every instance runs with its own caches, removed at the end."""

import json
from pathlib import Path

from test_launch_run import Run, _no_strays, processes_with  # noqa: F401  (the fixture reaps strays)


def test_prewarm_runs_once_per_node_before_the_instances(tmp_path):
    count = tmp_path / "prewarm-count"
    node_local = tmp_path / "node-local"
    run = Run(tmp_path, [{"name": "org/tiny", "instances": 4, "served_model_name": "tiny"}],
              node_local_dir=str(node_local),
              prewarm_command=f"bash -c 'echo $$ >> {count}; sleep 1; date +%s.%N >> {count}'")
    res = run.launch("--once")  # 4 one-core instances on a 2-core machine: 2 ranks ("nodes")
    assert res.returncode == 0, res.stderr
    lines = count.read_text().split()
    assert len(lines) == 2, lines  # one run: its pid and when it finished
    finished = float(lines[1])
    for k in range(4):
        log = Path(run.run_dir / "logs" / f"instance-{k:04d}.log")
        assert log.stat().st_mtime > finished  # started after the pre-warm was done
    assert sum(1 for p in (run.run_dir / "logs").glob("prewarm-rank*.log")) == 1
    assert res.stderr.count("pre-warmed node") == 1
    scripts = [(run.run_dir / "instances" / f"instance-{k:04d}.sh").read_text() for k in range(4)]
    roots = {line.split("=", 1)[1] for s in scripts for line in s.splitlines()
             if line.startswith("export VLLM_CACHE_ROOT=")}
    assert len(roots) == 4 and all(r.startswith(str(node_local / "aegis-cache")) for r in roots)
    assert not (node_local / "aegis-cache").exists() or not any(
        (node_local / "aegis-cache").iterdir())  # removed when the run stopped
    assert "4/4 instances ready" in res.stderr
    assert [i["state"] for i in json.loads((run.run_dir / "endpoints.json").read_text())
            ["instances"]] == ["stopped"] * 4  # --once stopped them after verifying


def test_sigterm_during_the_prewarm_stops_it_and_starts_nothing(tmp_path):
    import signal
    import time

    marker = tmp_path / "prewarm-started"
    run = Run(tmp_path, [{"name": "org/tiny", "served_model_name": "tiny"}],
              node_local_dir=str(tmp_path / "nl"),
              prewarm_command=f"bash -c 'touch {marker}; exec -a {run_token(tmp_path)} sleep 60'")
    proc = run.start()
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert not list((run.run_dir / "logs").glob("instance-*.log"))  # no instance started
    assert run.leftovers() == [] and processes_with(run_token(tmp_path)) == []


def run_token(tmp_path):
    return f"prewarm-{tmp_path.name}"
