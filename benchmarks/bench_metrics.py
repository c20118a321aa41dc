#!/usr/bin/env python3
"""`aegis metrics` over 1,000 instances: seconds per scrape, against baselines from the same
run and the same stand-in servers.

One stand-in process (tests/standin_vllm.py --port-range) serves every port, each port with
its own counters and vLLM 0.32's whole /metrics text (~50 KB, captured from a real instance:
tests/data/vllm-0.32.0-metrics.txt), busy (--metrics-busy): every answer shows new counters,
gauges and KV usage, as a loaded fleet's do, so no scrape finds the lines of the one before.
Then, in one run:

  aegis, one shot     run.metrics() as a new process does it (no line parsed before): a new
                      session, every instance once (the CLI's scrape)
  aegis, --watch      watch(): one session kept between scrapes (rates need two)
  baseline sequential one instance after the other, the same client (concurrency 1)
  baseline naive      one after the other with urllib, each whole text through the parser
each with every /metrics answered at once, and again answered after --latency (20 ms: a busy
API server, a network hop), then
  with N hung         one shot with --hung instances that never answer /metrics
  parse only          CPU per text: the whole text through prometheus_client's parser, vs
                      the selected lines (what aegis parses)
"client CPU" is this process's (the stand-ins run in another).

    python benchmarks/bench_metrics.py [--instances 1000] [--repeats 5] [--hung 10]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from aegis.clients import Run  # noqa: E402
from aegis.clients import metrics as M  # noqa: E402
from metrics_fleet import MetricsFleet  # noqa: E402


def timed(fn):
    wall, cpu = time.monotonic(), time.process_time()
    out = fn()
    return out, time.monotonic() - wall, time.process_time() - cpu


def naive_sequential(urls: list[str], key: str, timeout: float) -> tuple[int, int]:
    """What a first attempt does: GET each /metrics in turn, parse all of it."""
    from prometheus_client.parser import text_string_to_metric_families

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    ok = failed = 0
    for url in urls:
        try:
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
            with opener.open(request, timeout=timeout) as reply:
                text = reply.read().decode()
            running = sum(s.value for f in text_string_to_metric_families(text)
                          for s in f.samples if s.name == "vllm:num_requests_running")
            ok += running >= 0
        except Exception:  # noqa: BLE001
            failed += 1
    return ok, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hung", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=M.DEFAULT_TIMEOUT)
    ap.add_argument("--no-baseline", action="store_true", help="skip the sequential baselines")
    ap.add_argument("--latency", type=lambda t: [float(x) for x in t.split(",")],
                    default=[0.0, 0.02],
                    help="seconds each /metrics answer waits (a busy API server, the network), "
                    "comma-separated runs  [default: 0,0.02]")
    ap.add_argument("--idle", action="store_true",
                    help="servers whose numbers do not change between scrapes (no load)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.instances + 256)),
                                                hard))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        load_before = os.getloadavg()[0]
        fleet = MetricsFleet(Path(tmp), {"bench": args.instances},
                             args=() if args.idle else ("--metrics-busy",))
        try:
            print(f"{args.instances} stand-in instances up in {time.monotonic() - started:.1f}s "
                  "(one process)", flush=True)
            for i in range(args.instances):  # counters that differ, some prefix hits
                fleet.complete(i, 1 + i % 3, words=4 + i % 5, max_tokens=8)
            run = Run.open(fleet.run_dir)
            key = run.api_key()
            first = run.metrics()  # warm-up: imports, the parser
            assert first.answered == args.instances, first.flags[:3]
            body = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                urllib.request.Request(fleet.url(0) + "/metrics")).read()
            lines = body.count(b"\n")
            print(f"/metrics text: {len(body)} bytes, {lines} lines", flush=True)

            rows = []
            status = run.state()

            def one_shot():
                M._PARSED.clear()  # a new process: nothing parsed before
                got = run.metrics()
                assert got.answered == args.instances and not got.flags, got.flags[:3]
                return got

            async def sequential():
                async with M.Scraper(key, concurrency=1) as scraper:
                    return await scraper.scrape(status)

            for latency in args.latency:
                where = f"latency {1000 * latency:g} ms"
                for i in range(args.instances):
                    fleet.control(i, fault=f"slow:{latency}" if latency else None)
                shots = [timed(one_shot) for _ in range(args.repeats)]
                rows.append((f"aegis, one shot (run.metrics), {where}",
                             [w for _, w, _ in shots], [c for _, _, c in shots]))

                scrapes, stamps = [], []
                for got in M.watch(run, 0.01, count=args.repeats + 1):
                    scrapes.append(got)
                    stamps.append(time.process_time())
                assert all(g.answered == args.instances for g in scrapes), \
                    [f for g in scrapes for f in g.flags][:3]
                rows.append((f"aegis, --watch (session kept), {where}",
                             [g.seconds for g in scrapes[1:]],
                             [stamps[k] - stamps[k - 1] for k in range(1, len(stamps))]))
                total = scrapes[-1].models[0]
                print(f"  check ({where}): fleet totals {total.generation_tokens} generation "
                      f"tokens over {total.answered} instances, "
                      f"{total.generation_tokens_per_s:.0f} tok/s between the last two scrapes",
                      flush=True)
                if not args.no_baseline:
                    loop = M._Loop()
                    try:
                        M._PARSED.clear()
                        got, wall, cpu = timed(lambda: loop.run(sequential()))
                    finally:
                        loop.close()
                    assert got.answered == args.instances
                    rows.append((f"baseline: sequential, same client, {where}", [wall], [cpu]))
                    if not latency:
                        urls = [i.url for i in first.instances]
                        (ok, failed), wall, cpu = timed(lambda: naive_sequential(urls, key, 5.0))
                        assert ok == args.instances, (ok, failed)
                        rows.append((f"baseline: sequential urllib + whole-text parse, {where}",
                                     [wall], [cpu]))
            for i in range(args.instances):
                fleet.control(i, fault=None)

            if args.hung:
                for i in range(args.hung):
                    fleet.control(i * (args.instances // args.hung), fault="hang")
                for concurrency in (M.DEFAULT_CONCURRENCY, args.instances):
                    hung = [timed(lambda: (M._PARSED.clear(), run.metrics(
                        timeout=args.timeout, concurrency=concurrency))[1])
                        for _ in range(max(1, args.repeats // 2))]
                    flagged = [sorted(f.kind for f in g.flags) for g, _, _ in hung]
                    assert all(f == ["not_answering"] * args.hung for f in flagged), flagged
                    rows.append((f"aegis, {args.hung} hung (timeout {args.timeout:g}s), "
                                 f"concurrency {concurrency}", [w for _, w, _ in hung],
                                 [c for _, _, c in hung]))
                for i in range(args.hung):
                    fleet.control(i * (args.instances // args.hung), fault=None)

            from prometheus_client.parser import text_string_to_metric_families

            n = 50
            _, whole, _ = timed(lambda: [list(text_string_to_metric_families(body.decode()))
                                         for _ in range(n)])
            _, selected, _ = timed(lambda: [M.read_instance(body) for _ in range(n)])

            width = max(len(name) for name, _, _ in rows)
            print(f"\n{'what':{width}} {'s/scrape (median, min-max)':>28} {'client CPU s':>13}")
            for name, walls, cpus in rows:
                spread = f"{statistics.median(walls):.3f} ({min(walls):.3f}-{max(walls):.3f})"
                print(f"{name:{width}} {spread:>28} {statistics.median(cpus):>13.3f}")
            print(f"\nload average (1 min, the whole machine): {load_before:.2f} at the start, "
                  f"{os.getloadavg()[0]:.2f} at the end; {os.cpu_count()} cores")
            print(f"parse one text: whole {1000 * whole / n:.2f} ms, selected lines "
                  f"{1000 * selected / n:.2f} ms (x {args.instances}: {whole / n * args.instances:.1f}"
                  f" s vs {selected / n * args.instances:.2f} s)")
            for name, walls, _ in rows:
                if name.startswith("aegis, one shot"):
                    goal = statistics.median(walls)
                    print(f"goal: {args.instances} instances in <= 2 s: "
                          f"{'met' if goal <= 2.0 else 'NOT met'} ({goal:.2f} s, {name})")
        finally:
            fleet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
