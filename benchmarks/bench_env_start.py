#!/usr/bin/env python3
"""Time to ready with the instances' Python environment on node-local storage (env_source:
broadcast, unpacked once per node, activated) against running it from the shared source
directory (vllm_command pointing into the environment where it lies), in the same run.

    .venv/bin/python benchmarks/bench_env_start.py [--instances N] [--repeats R] [--json]

The environment is a real venv (`python -m venv --copies`) with `openai` and its dependencies
installed (~3,000 .py files, ~70 MB) and the stand-in server as its `vllm`, which imports
openai before serving: so an instance's start costs a real stack's imports. Three figures per
round, rounds alternating so a warming page cache favours neither:
- shared: `vllm_command: <shared env>/bin/vllm serve`;
- node-local, cold: `env_source: <tarball>` into an empty node-local directory (the time
  includes the broadcast and the unpack);
- node-local, cached: the same again (the staged tarball and the unpacked environment are
  reused: nothing moves).
Time to ready: from starting `aegis launch` to the endpoints file saying every instance is
ready. Logs on stderr, the table (or JSON) on stdout.

On this project's machine the "shared" directory and node-local storage are the same local
ext4 disk, so this measures what staging costs (cold) and that a cached start costs nothing
extra; the benefit the design is for (OLCF: a Python start of 3 min 56 s from NFS against 2 s
from node-local NVMe) needs a real parallel file system to show.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]
from packed_env import make_env, pack  # noqa: E402
from harness import stop_launcher  # noqa: E402
from ports import free_port_block  # noqa: E402

TIMEOUT_S = 180


def log(msg: str) -> None:
    print(f"bench_env_start: {msg}", file=sys.stderr, flush=True)


def time_to_ready(workdir: Path, settings: dict, instances: int, tag: str) -> float:
    run_dir = workdir / f"run-{tag}"
    port = free_port_block(instances)
    config = {"model": "bench/env", "served_model_name": "env", "instances": instances,
              "platform": "local", "port_start": port, "internal_port_start": 31000,
              "hf_home": str(workdir / "hf"), "startup_timeout": TIMEOUT_S, **settings}
    path = workdir / f"{tag}.yaml"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for var in ("PBS_NODEFILE", "SLURM_JOB_NODELIST", "PMI_SIZE", "AEGIS_LAUNCH_RANKS"):
        env.pop(var, None)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aegis.launch", "--config", str(path), "--run-dir", str(run_dir),
         "--poll-interval", "0.05"], env=env, stdout=subprocess.DEVNULL,
        stderr=open(workdir / f"{tag}.log", "w"), start_new_session=True)
    endpoints = run_dir / "endpoints.json"
    try:
        while time.monotonic() - started < TIMEOUT_S:
            if proc.poll() is not None:
                raise RuntimeError(f"{tag}: launcher exited {proc.returncode}; see "
                                   f"{workdir / (tag + '.log')}")
            try:
                doc = json.loads(endpoints.read_text())
                if doc["launcher"]["state"] == "serving" and doc["ready"] == instances:
                    return time.monotonic() - started
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        raise RuntimeError(f"{tag}: not ready within {TIMEOUT_S} s")
    finally:
        stop_launcher(proc, timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="aegis-bench-env-"))
    try:
        shared = workdir / "shared"
        shared.mkdir()
        log("building the environment (venv --copies + openai) and packing it (venv-pack)")
        venv = make_env(shared, "bench-env", packages=("openai",))
        tarball = pack(venv)
        log(f"{tarball.stat().st_size / 1e6:.1f} MB tarball; {args.repeats} round(s) of "
            f"{args.instances} instance(s)")
        rows: dict[str, list[float]] = {"shared": [], "node-local, cold": [],
                                        "node-local, cached": []}
        for r in range(args.repeats):
            local = workdir / f"node-local-{r}"
            order = [("shared", {"vllm_command": f"{venv}/bin/vllm serve"}),
                     ("node-local, cold", {"env_source": str(tarball), "node_local_dir": str(local),
                                           "vllm_command": "vllm serve"}),
                     ("node-local, cached", {"env_source": str(tarball),
                                             "node_local_dir": str(local),
                                             "vllm_command": "vllm serve"})]
            if r % 2:  # alternate which goes first; cold must precede cached
                order = [order[1], order[2], order[0]]
            for name, settings in order:
                seconds = time_to_ready(workdir, settings, args.instances,
                                        f"{name.replace(', ', '-')}-{r}")
                rows[name].append(seconds)
                log(f"round {r + 1}: {name}: {seconds:.2f} s")
        base = statistics.median(rows["shared"])
        result = {name: {"median_s": statistics.median(v), "runs_s": v,
                         "ratio_to_shared": statistics.median(v) / base}
                  for name, v in rows.items()}
        if args.json:
            print(json.dumps({"instances": args.instances, "results": result}, indent=1))
        else:
            print(f"time to ready, {args.instances} stand-in instance(s) importing openai "
                  f"(median of {args.repeats})")
            for name, v in result.items():
                print(f"  {name:20s} {v['median_s']:6.2f} s   x{v['ratio_to_shared']:.2f} of shared")
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as e:
        log(f"failed: {e}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
