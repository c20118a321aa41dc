#!/usr/bin/env python3
"""Readiness detection for 1,000 endpoints: the launcher's concurrent poller vs a naive
sequential one, same run, same stand-in servers.

One stand-in process (tests/standin_vllm.py --port-range) serves all ports. Each poller is
started first (everything refused), then the servers come up; the figure is the time from the
servers' "serving" line to the poller having seen every endpoint pass the full readiness check
(/health, /v1/models, 1-token completion). Target: <= 2 s for 1,000.

    python benchmarks/bench_readiness.py [--endpoints 1000] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(ROOT / "tests"))

from aegis.launch.readiness import Target, wait_ready  # noqa: E402
from ports import free_port_block  # noqa: E402

STANDIN = ROOT / "tests" / "standin_vllm.py"


class Servers:
    """Stand-in processes sharing the ports; .up is when the last of them said it listens."""

    def __init__(self, base: int, n: int, delay: float, procs: int):
        self.procs = []
        self.up_times: list[float] = []
        step = -(-n // procs)
        for lo in range(base, base + n, step):
            hi = min(lo + step, base + n) - 1
            proc = subprocess.Popen(
                [sys.executable, str(STANDIN), "serve", "bench", "--served-model-name", "bench",
                 "--host", "127.0.0.1", "--port-range", f"{lo}-{hi}", "--start-delay", str(delay)],
                stderr=subprocess.PIPE, text=True)
            self.procs.append(proc)
            threading.Thread(target=self._watch, args=(proc,), daemon=True).start()

    def _watch(self, proc):
        for line in proc.stderr:
            if "standin: serving" in line:
                self.up_times.append(time.monotonic())

    @property
    def up(self) -> float | None:
        return max(self.up_times) if len(self.up_times) == len(self.procs) else None

    def stop(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=10)


def naive_ready(port: int, timeout: float = 5.0) -> bool:
    """The baseline: urllib, one endpoint and one request at a time."""
    base = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as r:
            if r.status != 200:
                return False
        with urllib.request.urlopen(f"{base}/v1/models", timeout=timeout) as r:
            if "bench" not in {m["id"] for m in json.load(r)["data"]}:
                return False
        req = urllib.request.Request(
            f"{base}/v1/completions", method="POST",
            data=json.dumps({"model": "bench", "prompt": "Hello", "max_tokens": 1}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return bool(json.load(r)["choices"])
    except (OSError, urllib.error.URLError, ValueError):
        return False


def naive_wait(ports: list[int], interval: float, deadline: float) -> dict[int, bool]:
    pending = list(ports)
    while pending and time.monotonic() < deadline:
        started = time.monotonic()
        pending = [p for p in pending if not naive_ready(p)]
        if pending:
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return {p: p not in pending for p in ports}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, n: int, delay: float, procs: int, poll) -> tuple[float, float]:
    """(seconds from servers up to all detected ready, CPU seconds the poller used)."""
    base = free_port_block(n)
    ports = list(range(base, base + n))
    servers = Servers(base, n, delay, procs)
    try:
        cpu0 = cpu_seconds()
        results = poll(ports)
        done, cpu = time.monotonic(), cpu_seconds() - cpu0
        ready = sum(results.values())
        if ready != n or servers.up is None:
            raise SystemExit(f"bench_readiness: {name}: only {ready}/{n} endpoints ready")
        return done - servers.up, cpu
    finally:
        servers.stop()


def median(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return sorted(pairs)[len(pairs) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=0.5, help="poll interval (launcher default)")
    ap.add_argument("--delay", type=float, default=1.0, help="seconds until the servers come up")
    ap.add_argument("--deadline", type=float, default=120.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-procs", type=int, default=2, help="stand-in processes sharing the ports")
    args = ap.parse_args()
    n = args.endpoints

    def ours(ports):
        targets = [Target(p, "127.0.0.1", p, "bench") for p in ports]
        res = wait_ready(targets, deadline=time.monotonic() + args.deadline, interval=args.interval)
        return {k: v.ready for k, v in res.items()}

    def naive(ports):
        return naive_wait(ports, args.interval, time.monotonic() + args.deadline)

    runs = {"ours": [], "naive": []}
    for _ in range(args.repeats):  # alternate, so both see the same background load
        runs["ours"].append(measure("concurrent", n, args.delay, args.server_procs, ours))
        runs["naive"].append(measure("sequential", n, args.delay, args.server_procs, naive))
    load = os.getloadavg()[0]
    (t_ours, cpu_ours), (t_naive, cpu_naive) = (median(runs["ours"]), median(runs["naive"]))
    print(f"readiness of {n} endpoints after they come up (poll interval {args.interval:g}s, "
          f"{os.cpu_count()} cores, load average {load:.1f}; stand-ins share the cores; "
          f"median of {args.repeats})")
    print(f"  aegis concurrent poller : {t_ours:7.2f} s  (min {min(r[0] for r in runs['ours']):.2f})"
          f"  poller CPU {cpu_ours:5.2f} s  target <= 2 s: {'met' if t_ours <= 2 else 'MISSED'}")
    print(f"  naive sequential poller : {t_naive:7.2f} s  (min {min(r[0] for r in runs['naive']):.2f})"
          f"  poller CPU {cpu_naive:5.2f} s")
    print(f"  ratio sequential/ours   : {t_naive / t_ours:7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
