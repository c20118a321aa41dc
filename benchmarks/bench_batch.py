#!/usr/bin/env python3
"""`aegis batch` over a 2-instance run against `vllm run-batch` on one instance: the same
requests, real vLLM (CPU), the tiny model, in one run.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_batch.py [--requests 2000]
        [--max-tokens 16] [--max-in-flight 64] [--json]

Order (each phase alone on the machine):
 1. baseline: `vllm run-batch -i IN -o OUT` with one engine pinned to core 0 (as aegis pins an
    instance); its throughput is the requests over the elapsed time of its own progress bar
    (the engine's start-up excluded), its wall time is reported too;
 2. `aegis launch`: 2 instances of the tiny model (cores 0 and 1) and their router;
 3. capacity: `run.batch()` against each instance alone (the other idle), at the same
    --max-in-flight: their sum is what 2 instances can give;
 4. `run.batch()` over both instances (--target instances), then through the router.
Each phase writes its own output; every output is checked: every custom_id once, all 200.
Requests: /v1/chat/completions (what `vllm run-batch` serves), max_tokens N, ignore_eos.
Logs on stderr; the table (or JSON) on stdout. Exit 1 if a phase failed.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_batch.py --standin [--delay 0.25]

does phases 3-4 on 2 stand-in servers (tests/standin_vllm.py) that answer each request after
--delay seconds without using CPU: instances that do not compete for this machine's cores, as
GPU instances on their own devices do not, so what is left is the client's own share.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests" / d) for d in ("e2e", ".")]
import vllm_env  # noqa: E402
from harness import aegis_argv  # noqa: E402
from ports import free_port_block  # noqa: E402

TIMEOUT_S = 900


def log(msg: str) -> None:
    print(f"bench_batch: {msg}", file=sys.stderr, flush=True)


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine (/proc/stat)."""
    fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cores_busy(before: tuple[float, float]) -> float:
    """Cores kept busy since `before` (all processes: the engines, their API servers, the
    router, the client, and whatever else runs on the machine)."""
    busy, total = cpu_times()
    return (busy - before[0]) / max(1.0, total - before[1]) * (os.cpu_count() or 1)


def write_input(path: Path, n: int, max_tokens: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "tiny", "max_tokens": max_tokens, "ignore_eos": True,
                         "temperature": 0,
                         "messages": [{"role": "user", "content": f"hello number {i}"}]}})
                    + "\n")


def check_output(path: Path, n: int) -> str | None:
    """None when every custom_id is there once with a 200; else what is wrong."""
    ids, bad = [], 0
    for raw in path.read_text().splitlines():
        rec = json.loads(raw)
        ids.append(rec["custom_id"])
        bad += (rec.get("response") or {}).get("status_code") != 200
    if sorted(ids) != sorted(f"req-{i}" for i in range(n)):
        return f"{len(ids)} lines, {len(set(ids))} distinct, of {n}"
    return f"{bad} answers not 200" if bad else None


# `vllm run-batch` with its batch step timed: run_batch() (read the input, build the serving
# objects, run every request, write the output) once its engine is up, as aegis batch is timed
# against a run that is up. Its own bar says mm:ss only.
_TIMED_RUN_BATCH = """
import os, sys, time
import vllm.entrypoints.launchers.run_batch as rb
from vllm.entrypoints.cli.main import main
inner = rb.run_batch
def jiffies():
    f = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(f) - f[3] - f[4], sum(f)
async def timed(*args, **kwargs):
    t0, (b0, s0) = time.perf_counter(), jiffies()
    await inner(*args, **kwargs)
    (b1, s1), n = jiffies(), os.cpu_count()
    print(f"BENCH_RUN_BATCH_SECONDS {time.perf_counter() - t0:.4f}", file=sys.stderr, flush=True)
    print(f"BENCH_RUN_BATCH_BUSY {(b1 - b0) / max(1.0, s1 - s0) * n:.4f}", file=sys.stderr,
          flush=True)
rb.run_batch = timed
sys.argv = ["vllm", "run-batch", *sys.argv[1:]]
sys.exit(main())
"""


def baseline(model: Path, inp: Path, out: Path, tmp: Path) -> dict:
    """vllm run-batch, one engine pinned to core 0."""
    env = {**os.environ, **vllm_env.VLLM_CPU_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0",
           "VLLM_CACHE_ROOT": str(tmp / "vllm-cache-baseline")}
    argv = [str(vllm_env.VLLM_VENV / "bin" / "python"), "-c", _TIMED_RUN_BATCH, "-i", str(inp),
            "-o", str(out), "--model", str(model), "--served-model-name", "tiny",
            *vllm_env.VLLM_CPU_ARGS]
    t0 = time.perf_counter()
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    wall = time.perf_counter() - t0
    (tmp / "run-batch.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"vllm run-batch failed ({res.returncode}): {res.stderr[-2000:]}")
    found = re.findall(r"BENCH_RUN_BATCH_SECONDS ([0-9.]+)", res.stderr)
    if not found:
        raise RuntimeError(f"vllm run-batch printed no timing (see {tmp}/run-batch.log)")
    seconds = float(found[-1])
    busy = float(re.findall(r"BENCH_RUN_BATCH_BUSY ([0-9.]+)", res.stderr)[-1])
    n = sum(1 for _ in open(out))
    return {"requests": n, "seconds": seconds, "req_per_s": n / seconds, "wall_s": wall,
            "cores_busy": busy, "cpu_ms_per_request": busy * seconds / n * 1e3,
            "client_cpu_ms_per_request": None}


def aegis_phase(run, inp: Path, out: Path, n: int, max_in_flight: int, target: str) -> dict:
    from aegis.clients.batch import batch

    import resource

    cpu0, own0 = cpu_times(), resource.getrusage(resource.RUSAGE_SELF)
    counts = batch(run, inp, out, target=target, max_in_flight=max_in_flight)
    busy, own1 = cores_busy(cpu0), resource.getrusage(resource.RUSAGE_SELF)
    client = (own1.ru_utime - own0.ru_utime) + (own1.ru_stime - own0.ru_stime)
    problem = check_output(out, n)
    if problem or not counts.complete:
        raise RuntimeError(f"{out.name}: {problem or counts.summary()}")
    return {"requests": counts.done, "seconds": counts.seconds, "req_per_s": counts.rate,
            "retries": counts.retries, "cores_busy": busy,
            "cpu_ms_per_request": busy * counts.seconds / counts.done * 1e3,
            "client_cpu_ms_per_request": client / counts.done * 1e3}


def one_instance(run, url: str):
    """A view of `run` that lists only the instance at `url` (no router): that instance alone."""
    from aegis.run import Run

    class OneInstance(Run):
        def state(self, min_ready=None):
            st = super().state(min_ready)
            return dataclasses.replace(st, routers=(), instances=tuple(
                e for e in st.instances if e.url == url))

    return OneInstance(run.layout, run.config, job_id=run.job_id, backend=run.backend)


def standin_main(args) -> int:
    """Phases 3-4 on 2 stand-ins that sleep instead of computing."""
    from batch_fleet import Fleet

    from aegis.run import Run

    tmp = Path(tempfile.mkdtemp(prefix="aegis-bench-batch-standin-"))
    inp = tmp / "in.jsonl"
    n = args.requests
    with open(inp, "w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST",
                                "url": "/v1/completions",
                                "body": {"model": "m", "prompt": "hi", "max_tokens": 16}}) + "\n")
    fleet = Fleet(tmp, 2, args=["--delay", str(args.delay)])
    results = {}
    try:
        run = Run.open(fleet.run_dir)
        for k in range(2):
            results[f"instance_{k}_alone"] = aegis_phase(
                one_instance(run, fleet.url(k)), inp, tmp / f"alone-{k}.jsonl", n,
                args.max_in_flight, "instances")
        results["aegis_instances"] = aegis_phase(run, inp, tmp / "both.jsonl", n,
                                                 args.max_in_flight, "instances")
    finally:
        fleet.close()
    capacity = results["instance_0_alone"]["req_per_s"] + results["instance_1_alone"]["req_per_s"]
    summary = {"requests": n, "delay": args.delay, "max_in_flight": args.max_in_flight,
               **results, "capacity_sum": capacity,
               "aegis_instances_vs_capacity": results["aegis_instances"]["req_per_s"] / capacity,
               "aegis_instances_vs_one": results["aegis_instances"]["req_per_s"]
               / results["instance_0_alone"]["req_per_s"]}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{n} requests to stand-ins answering after {args.delay:g}s (no CPU); "
          f"--max-in-flight {args.max_in_flight}")
    for key in ("instance_0_alone", "instance_1_alone", "aegis_instances"):
        r = results[key]
        print(f"{key:<20} {r['req_per_s']:>8.1f} req/s  client {r['client_cpu_ms_per_request']:.2f}"
              " ms CPU/request")
    print(f"2 instances: {summary['aegis_instances_vs_one']:.2f}x one instance, "
          f"{100 * summary['aegis_instances_vs_capacity']:.0f}% of the capacity sum")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-in-flight", type=int, default=256,
                   help="per instance (aegis batch's default)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--standin", action="store_true",
                   help="stand-ins that sleep --delay s per request instead of vLLM")
    p.add_argument("--delay", type=float, default=1.0)
    args = p.parse_args()
    if args.standin:
        return standin_main(args)
    problem = vllm_env.venv_problem(vllm_env.VLLM_VENV)
    if problem:
        log(f"{problem}; run scripts/setup-vllm")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="aegis-bench-batch-"))
    model = tmp / "tiny-llama"
    made = vllm_env.make_tiny_model(model)
    if made.returncode != 0:
        log(f"make-tiny-model failed: {made.stderr}")
        return 1
    inp = tmp / "in.jsonl"
    write_input(inp, args.requests, args.max_tokens)
    n = args.requests
    results: dict[str, dict] = {}

    log(f"1/4 vllm run-batch, one engine, {n} requests ...")
    results["run_batch_1"] = baseline(model, inp, tmp / "run-batch.out.jsonl", tmp)
    problem = check_output(tmp / "run-batch.out.jsonl", n)
    if problem:
        log(f"vllm run-batch output: {problem}")
        return 1
    log(f"   {results['run_batch_1']['req_per_s']:.1f} req/s")

    port = free_port_block(3)
    config = tmp / "c.yaml"
    config.write_text(json.dumps({
        "platform": "local", "model": "tiny", "model_source": str(model), "instances": 2,
        "extra_vllm_args": list(vllm_env.VLLM_CPU_ARGS), "port_start": port,
        "vllm_command": f"{vllm_env.VLLM_VENV / 'bin' / 'vllm'} serve",
        "hf_home": str(tmp / "hf"), "startup_timeout": TIMEOUT_S}))
    token = uuid.uuid4().hex
    run_dir = tmp / "run"
    env = {**os.environ, **vllm_env.VLLM_CPU_ENV, vllm_env.RUN_MARKER: token,
           "VLLM_CACHE_ROOT": str(tmp / "vllm-cache")}
    log("2/4 aegis launch: 2 vLLM instances and their router ...")
    with open(tmp / "launcher.log", "wb") as out:
        launcher = subprocess.Popen([*aegis_argv(), "launch", "-c", str(config), "--run-dir",
                                     str(run_dir)], stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
    try:
        from aegis.run import Run

        deadline = time.monotonic() + 60
        while not (run_dir / "config.yaml").exists():
            if time.monotonic() > deadline or launcher.poll() is not None:
                log(f"the launcher did not start: {(tmp / 'launcher.log').read_text()[-2000:]}")
                return 1
            time.sleep(0.2)
        run = Run.open(run_dir)
        status = run.wait_ready(timeout=TIMEOUT_S)
        urls = [e.url for e in status.instances]
        # warm-up: a few requests to every path
        warm = tmp / "warm.jsonl"
        write_input(warm, 16, args.max_tokens)
        run.batch(warm, tmp / "warm.out.jsonl", target="instances")
        for k, url in enumerate(urls):
            log(f"3/4 capacity: instance {k} alone ({url}) ...")
            results[f"instance_{k}_alone"] = aegis_phase(
                one_instance(run, url), inp, tmp / f"alone-{k}.jsonl", n, args.max_in_flight,
                "instances")
            log(f"   {results[f'instance_{k}_alone']['req_per_s']:.1f} req/s")
        for name, target in (("aegis_instances", "instances"), ("aegis_router", "router")):
            log(f"4/4 aegis batch over 2 instances, --target {target} ...")
            results[name] = aegis_phase(run, inp, tmp / f"{name}.jsonl", n,
                                        args.max_in_flight, target)
            log(f"   {results[name]['req_per_s']:.1f} req/s")
    except Exception as err:  # noqa: BLE001
        log(f"failed: {err} (files in {tmp})")
        return 1
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
        vllm_env.kill_marked(token)
    base = results["run_batch_1"]["req_per_s"]
    capacity = results["instance_0_alone"]["req_per_s"] + results["instance_1_alone"]["req_per_s"]
    summary = {"requests": n, "max_tokens": args.max_tokens,
               "max_in_flight": args.max_in_flight, "cpus": os.cpu_count(), **results,
               "capacity_sum": capacity}
    for name in ("aegis_instances", "aegis_router"):
        r = results[name]["req_per_s"]
        summary[f"{name}_vs_run_batch"] = r / base
        summary[f"{name}_vs_capacity"] = r / capacity
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{n} chat completions of {args.max_tokens} tokens (ignore_eos), tiny model, "
          f"vLLM on CPU, {os.cpu_count()} cores; aegis --max-in-flight {args.max_in_flight}")
    print(f"{'phase':<34} {'req/s':>8} {'seconds':>8} {'cores busy':>10} "
          f"{'CPU ms/req':>10} {'client':>7}")
    rows = [("vllm run-batch, 1 engine", "run_batch_1"),
            ("aegis batch, instance 0 alone", "instance_0_alone"),
            ("aegis batch, instance 1 alone", "instance_1_alone"),
            ("aegis batch, 2 instances direct", "aegis_instances"),
            ("aegis batch, 2 instances router", "aegis_router")]
    for label, key in rows:
        r = results[key]
        per = r["cpu_ms_per_request"]
        client = f"{r['client_cpu_ms_per_request']:.2f}" if r["client_cpu_ms_per_request"] \
            else "-"
        print(f"{label:<34} {r['req_per_s']:>8.1f} {r['seconds']:>8.1f} "
              f"{r['cores_busy']:>10.2f} {per:>10.2f} {client:>7}")
    print(f"vllm run-batch wall time incl. engine start: {results['run_batch_1']['wall_s']:.1f}s")
    print(f"sum of the instances' capacities: {capacity:.1f} req/s")
    for name, label in (("aegis_instances", "direct"), ("aegis_router", "router")):
        print(f"aegis batch ({label}): {summary[f'{name}_vs_run_batch']:.2f}x vllm run-batch, "
              f"{100 * summary[f'{name}_vs_capacity']:.0f}% of the capacity sum")
    return 0


if __name__ == "__main__":
    sys.exit(main())
