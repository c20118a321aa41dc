#!/usr/bin/env python3
"""Launcher overhead: `aegis launch` wall time (start -> all instances ready) against the
slower instance's standalone `vllm serve` start time, same args, in the same run.

Two figures of launcher overhead:
- launch minus standalone: what the issue asks; on a shared 2-core box vLLM's own start time
  varies by tens of seconds with the load, so this difference is noisy;
- in-run: the launch's wall time less the start time of the very vLLM processes it started
  (from their appearance in the process table to this benchmark's own probe finding the slower
  one ready): the time the launcher adds before spawning and after readiness.

    .venv/bin/python benchmarks/bench_launch.py [--repeats N] [--json]

Real vLLM (scripts/setup-vllm) serving the tiny model (scripts/make-tiny-model), 2 instances
with one core each, as in tests/e2e. "Ready" is the same for both: /health 200, the model
listed in /v1/models, a 1-token completion answered. The standalone pair is polled every
0.05 s, so its figure is when vLLM itself became ready; the launch figure is when the
endpoints file says every instance is ready. Target: overhead <= 3 s.
Rounds alternate standalone / launch so a warming page cache favours neither.
Logs on stderr; the table (or JSON) on stdout. Exit 1 if a run failed (not for a missed target).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests" / d) for d in ("e2e", ".")]
import vllm_env  # noqa: E402
from harness import aegis_argv, stop_launcher  # noqa: E402

TARGET_OVERHEAD_S = 3.0
INSTANCES = 2
TIMEOUT_S = 600


def log(msg: str) -> None:
    print(f"bench_launch: {msg}", file=sys.stderr, flush=True)


def is_ready(port: int, name: str, key: str | None = None) -> bool:
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
            if r.status != 200:
                return False
        with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/models", headers=auth),
                                    timeout=5) as r:
            if name not in {m["id"] for m in json.load(r)["data"]}:
                return False
        body = json.dumps({"model": name, "prompt": "Hello", "max_tokens": 1,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"{base}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json", **auth})
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status == 200 and bool(json.load(r)["choices"])
    except (OSError, urllib.error.URLError, ValueError, KeyError):
        return False


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def standalone(model: Path, port: int, work: Path, token: str) -> list[float]:
    """Start INSTANCES `vllm serve` at once, one core each; seconds until each is ready."""
    procs, ready = [], {}
    t0 = time.monotonic()
    try:
        for i in range(INSTANCES):
            env = {**os.environ, **vllm_env.VLLM_CPU_ENV, vllm_env.RUN_MARKER: token,
                   "VLLM_CPU_OMP_THREADS_BIND": str(i), "HF_HOME": str(work / "hf_home"),
                   "VLLM_CACHE_ROOT": str(work / "vllm-cache")}
            with open(work / f"standalone-{i}.log", "wb") as out:
                procs.append(subprocess.Popen(
                    [str(vllm_env.VLLM_VENV / "bin" / "vllm"), "serve", str(model),
                     "--host", "127.0.0.1", "--port", str(port + i),
                     "--tensor-parallel-size", "1", "--served-model-name", "tiny",
                     *vllm_env.VLLM_CPU_ARGS],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True))
        while len(ready) < INSTANCES:
            if time.monotonic() - t0 > TIMEOUT_S:
                raise RuntimeError("standalone vllm serve not ready in time")
            for i, proc in enumerate(procs):
                if i in ready:
                    continue
                if proc.poll() is not None:
                    raise RuntimeError(f"standalone vllm serve {i} exited {proc.returncode}; "
                                       f"see {work}/standalone-{i}.log")
                if is_ready(port + i, "tiny"):
                    ready[i] = time.monotonic() - t0
            time.sleep(0.05)
        return [ready[i] for i in range(INSTANCES)]
    finally:
        for proc in procs:
            stop_group(proc)
        vllm_env.kill_marked(token)


def launch(model: Path, port: int, work: Path, token: str) -> dict[str, float]:
    """`aegis launch` of INSTANCES: seconds from exec to an endpoints file with all ready, and
    its parts as seen from outside: until both `vllm serve` processes exist (spawn_s), from then
    until this benchmark's own probe finds the slower one ready (in_launch_vllm_start_s), and
    from there to the endpoints file (ready_to_endpoints_s)."""
    import yaml

    run_dir = work / "run"
    config = work / "c.yaml"
    config.write_text(yaml.safe_dump({
        "platform": "local", "model": "tiny", "model_source": str(model),
        "instances": INSTANCES, "tensor_parallel_size": 1,
        "vllm_command": f"{vllm_env.VLLM_VENV / 'bin' / 'vllm'} serve",
        "extra_vllm_args": list(vllm_env.VLLM_CPU_ARGS), "hf_home": str(work / "hf_home"),
        "port_start": port, "startup_timeout": TIMEOUT_S, "endpoints_file": "endpoints.json",
        "run_dir": str(work / "runs")}))
    endpoints = run_dir / "endpoints.json"
    env = {**os.environ, **vllm_env.VLLM_CPU_ENV, vllm_env.RUN_MARKER: token,
           "VLLM_CACHE_ROOT": str(work / "vllm-cache")}
    t0 = time.monotonic()
    with open(work / "launcher.log", "wb") as out:
        proc = subprocess.Popen([*aegis_argv(), "launch", "--config", str(config),
                                 "--run-dir", str(run_dir)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    spawned = None  # when both `vllm serve` processes exist
    ready: dict[int, float] = {}  # port -> when this benchmark's own probe saw it ready
    try:
        while True:
            now = time.monotonic() - t0
            if endpoints.is_file() and json.loads(endpoints.read_text())["ready"] == INSTANCES:
                if spawned is None or len(ready) < INSTANCES:
                    raise RuntimeError("endpoints file says ready before the benchmark saw it")
                vllm_ready = max(ready.values())
                return {"launch_s": now, "spawn_s": spawned,
                        "in_launch_vllm_start_s": vllm_ready - spawned,
                        "ready_to_endpoints_s": now - vllm_ready}
            if proc.poll() is not None:
                raise RuntimeError(f"aegis launch exited {proc.returncode}; see {work}/launcher.log")
            if now > TIMEOUT_S + 60:
                raise RuntimeError("aegis launch not ready in time")
            if spawned is None:
                serving = [c for c in vllm_env.marked_processes(token).values() if " serve " in c]
                if len(serving) == INSTANCES:
                    spawned = now
            else:
                key_file = run_dir / "api-key"  # the run's key, made by the launcher
                key = key_file.read_text().strip() if key_file.is_file() else None
                for p in range(port, port + INSTANCES):
                    if key and p not in ready and is_ready(p, "tiny", key):
                        ready[p] = time.monotonic() - t0
            time.sleep(0.05)
    finally:
        stop_launcher(proc, timeout=60)
        vllm_env.kill_marked(token)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (standalone, launch)")
    parser.add_argument("--port", type=int, default=18600, help="first port (4 are used)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout instead of a table")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    problem = vllm_env.venv_problem(vllm_env.VLLM_VENV)
    if problem:
        print(f"bench_launch: error: {problem}; run scripts/setup-vllm", file=sys.stderr)
        return 2

    rounds = []
    tmp = Path(tempfile.mkdtemp(prefix="aegis-bench-launch-"))
    # Kept when a run fails: its logs say why.
    model = tmp / "tiny-llama"
    made = vllm_env.make_tiny_model(model)
    if made.returncode != 0:
        raise SystemExit(f"bench_launch: make-tiny-model failed:\n{made.stderr}")
    try:
        for r in range(args.repeats):
            order = ("standalone", "launch") if r % 2 == 0 else ("launch", "standalone")
            result = {}
            for kind in order:
                work = tmp / f"round{r}-{kind}"
                work.mkdir()
                token = uuid.uuid4().hex
                log(f"round {r + 1}/{args.repeats}: {kind} ...")
                if kind == "standalone":
                    times = standalone(model, args.port, work, token)
                    result["standalone_each_s"] = [round(t, 2) for t in times]
                    result["standalone_slower_s"] = round(max(times), 2)
                else:
                    parts = launch(model, args.port + INSTANCES, work, token)
                    result.update({k: round(v, 2) for k, v in parts.items()})
                    # Same run, same instances: launch time less vLLM's own start time.
                    result["in_run_overhead_s"] = round(
                        parts["launch_s"] - parts["in_launch_vllm_start_s"], 2)
                log(f"round {r + 1}: {kind} done: {result}")
            result["overhead_s"] = round(result["launch_s"] - result["standalone_slower_s"], 2)
            rounds.append(result)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"bench_launch: error: {e}", file=sys.stderr)
        return 1
    shutil.rmtree(tmp, ignore_errors=True)

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in rounds), 2)

    summary = {"instances": INSTANCES, "rounds": rounds,
               "median_launch_s": median("launch_s"),
               "median_standalone_slower_s": median("standalone_slower_s"),
               "median_overhead_vs_standalone_s": median("overhead_s"),
               "median_in_run_overhead_s": median("in_run_overhead_s"),
               "target_overhead_s": TARGET_OVERHEAD_S,
               "load_average_1m": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'round':>5}  {'standalone slower':>17}  {'aegis launch':>12}  {'difference':>10}"
              f"  {'ratio':>5}  |  {'spawn':>6}  {'vLLM start in launch':>20}  "
              f"{'ready->endpoints':>16}  {'in-run overhead':>15}")
        for i, r in enumerate(rounds, 1):
            print(f"{i:>5}  {r['standalone_slower_s']:>15.2f} s  {r['launch_s']:>10.2f} s  "
                  f"{r['overhead_s']:>+8.2f} s  {r['launch_s'] / r['standalone_slower_s']:>5.3f}"
                  f"  |  {r['spawn_s']:>4.2f} s  {r['in_launch_vllm_start_s']:>18.2f} s  "
                  f"{r['ready_to_endpoints_s']:>14.2f} s  {r['in_run_overhead_s']:>13.2f} s")
        print(f"median: aegis launch {summary['median_launch_s']:.2f} s vs standalone (slower "
              f"of {INSTANCES}) {summary['median_standalone_slower_s']:.2f} s: difference "
              f"{summary['median_overhead_vs_standalone_s']:+.2f} s; in-run launcher overhead "
              f"{summary['median_in_run_overhead_s']:.2f} s (target <= {TARGET_OVERHEAD_S:g} s); "
              f"load average {summary['load_average_1m']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
