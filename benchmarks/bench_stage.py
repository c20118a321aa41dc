"""Benchmark aegis.bcast.stage() against the node's own copy path and the original tool.

One run, all figures from it, against the INSTALLED aegis (this file does not touch sys.path;
run it from a venv where `pip install .` put aegis):

    mpiexec -n 8 python benchmarks/bench_stage.py --size-gib 4 [--dir /tmp/aegis-bench]

The world is split into groups of 2, 4 and 8 ranks (--ranks; the ranks outside a group wait in
a sleeping barrier). For each group size n and each destination kind (/dev/shm, and a disk
directory whose writes land in the page cache), best of --repeat rounds of:

  stage()   stage(src, dest_i, writers="all"): n destinations, each rank writes its own copy
  cp -r     n parallel `cp -r src dest_i` processes started at once: the node's copy path
  serial    what the original Aegis tool did: one `tar -c` on rank 0, blocking MPI_Bcast of
            large chunks (--serial-chunk-mib, 1 GiB as it shipped), one `tar -x` per rank,
            read -> broadcast -> write in turn (kept here, not in stage())

and prints seconds, GB/s per destination, CPU seconds per GiB per destination (all ranks and
their child processes), and the ratios side by side. Targets (issue 11, >= 16 cores):
stage/cp <= 1.2, serial/stage >= 3, CPU per GiB per destination stage/cp <= 2.
Between timings dirty pages are flushed (sync) so no case pays for the previous one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mpi4py import MPI

import aegis
from aegis import bcast

GiB = 1 << 30


def build_tree(root: Path, total_gib: float) -> int:
    """Four big shards plus config JSON, like a model directory; reused when the size
    matches. Content is a repeated random block (nothing compresses or dedups on the way)."""
    marker = root / ".bench-size"
    want = int(total_gib * GiB)
    if marker.exists() and marker.read_text() == str(want):
        return want
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    block = os.urandom(16 << 20)
    shards = 4
    for i in range(shards):
        with open(root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as fh:
            left = want // shards
            while left > 0:
                left -= fh.write(block[: min(len(block), left)])
    for name in ("config.json", "generation_config.json", "tokenizer_config.json",
                 "model.safetensors.index.json", "special_tokens_map.json"):
        (root / name).write_text(json.dumps({"name": name, "pad": "x" * 2000}))
    marker.write_text(str(want))
    return want


def warm(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def quiet_barrier(comm) -> None:
    """A barrier that sleeps while it waits (MPICH spins in MPI_Barrier, stealing cores)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.002)


def cpu_seconds() -> float:
    """User + system CPU of this rank and its reaped children (cp, tar)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def parallel_cp(src: Path, dests: list[Path]) -> None:
    procs = [subprocess.Popen(["cp", "-r", str(src), str(d)]) for d in dests]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("bench_stage: cp -r failed")


def serial_baseline(comm, src: Path, dest: Path, chunk: int) -> None:
    """The original tool: tar -c | blocking Bcast of big chunks | tar -x on every rank."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    reader = writer = None
    if comm.rank == 0:
        reader = subprocess.Popen(["tar", "-c", "-f", "-", "-C", str(src), "."],
                                  stdout=subprocess.PIPE)
    dest.mkdir(parents=True)
    writer = subprocess.Popen(["tar", "-x", "-p", "-f", "-", "-C", str(dest)],
                              stdin=subprocess.PIPE)
    while True:
        n = 0
        if comm.rank == 0:
            while n < chunk:
                got = reader.stdout.readinto(view[n:])
                if not got:
                    break
                n += got
        n = comm.bcast(n, root=0)
        comm.Bcast([view[:n], MPI.BYTE], root=0)
        writer.stdin.write(view[:n])
        if n < chunk:
            break
    writer.stdin.close()
    if writer.wait() != 0 or (reader and reader.wait() != 0):
        raise SystemExit("bench_stage: the serial tar baseline failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/aegis-bench",
                        help="work directory: the source tree, and the disk destinations")
    parser.add_argument("--shm-dir", default="/dev/shm", help="memory-backed destinations")
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--ranks", default="2,4,8", help="group sizes (<= world size)")
    parser.add_argument("--kinds", default="shm,disk")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--chunk-mib", type=int, default=bcast.DEFAULT_CHUNK_SIZE >> 20)
    parser.add_argument("--depth", type=int, default=bcast.DEFAULT_DEPTH)
    parser.add_argument("--serial-chunk-mib", type=int, default=1024)
    parser.add_argument("--io-threads", type=int, default=None,
                        help="stage()'s io_threads (default: its own choice)")
    parser.add_argument("--private-rings", action="store_true",
                        help="stage(share_ring=False): every rank its own ring (MPI copies)")
    parser.add_argument("--cases", default="stage,cp,serial",
                        help="which cases to time (the table needs all three)")
    parser.add_argument("--json", default=None, help="also write the rows here (rank 0)")
    args = parser.parse_args()

    world = MPI.COMM_WORLD
    rank = world.rank
    sizes = [n for n in (int(s) for s in args.ranks.split(",")) if n <= world.size]
    work = Path(args.dir)
    src = work / "src"
    size = build_tree(src, args.size_gib) if rank == 0 else 0
    size = world.bcast(size, root=0)
    if rank == 0:
        warm(src)
        print(f"bench_stage: aegis from {Path(aegis.__file__).parent}, {world.size} ranks, "
              f"{len(os.sched_getaffinity(0))} cores, tree {size / GiB:.2f} GiB, chunk "
              f"{args.chunk_mib} MiB x depth {args.depth}", file=sys.stderr, flush=True)
    tag = world.bcast(os.getpid(), root=0)
    roots = {"shm": Path(args.shm_dir) / f"aegis-bench-{tag}", "disk": work / f"dest-{tag}"}

    def clean(out: Path) -> None:
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            os.sync()  # earlier runs' dirty pages must not be flushed inside the next timing
        quiet_barrier(world)

    rows = []
    for kind in args.kinds.split(","):
        out = roots[kind]
        for n in sizes:
            group = world.Split(0 if rank < n else MPI.UNDEFINED, rank)
            dests = [out / f"copy{i}" for i in range(n)]

            def run_stage():
                if group != MPI.COMM_NULL:
                    bcast.stage(src, dests[group.rank], group, writers="all", progress=False,
                                chunk_size=args.chunk_mib << 20, depth=args.depth,
                                share_ring=not args.private_rings, io_threads=args.io_threads)

            def run_cp():
                if rank == 0:
                    parallel_cp(src, dests)

            def run_serial():
                if group != MPI.COMM_NULL:
                    serial_baseline(group, src, dests[group.rank], args.serial_chunk_mib << 20)

            best: dict[str, tuple[float, float]] = {}
            for round_no in range(args.repeat):
                for name, fn in (("stage()", run_stage), ("cp -r", run_cp),
                                 ("serial", run_serial)):
                    if name.split()[0].strip("()") not in args.cases.split(","):
                        continue
                    clean(out)
                    quiet_barrier(world)
                    cpu0, start = cpu_seconds(), time.perf_counter()
                    fn()
                    quiet_barrier(world)
                    wall = time.perf_counter() - start
                    cpu = world.allreduce(cpu_seconds() - cpu0)
                    if rank == 0:
                        print(f"  {kind} n={n} round {round_no + 1}: {name}: {wall:.2f} s, "
                              f"{cpu:.2f} CPU s", file=sys.stderr, flush=True)
                    if wall < best.get(name, (float("inf"), 0))[0]:
                        best[name] = (wall, cpu)
            if group != MPI.COMM_NULL:
                group.Free()
            rows.append((kind, n, best))
        clean(out)
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)

    if rank == 0 and len(args.cases.split(",")) == 3:
        gib = size / GiB
        cores = len(os.sched_getaffinity(0))
        print(f"\nstage benchmark: {gib:.2f} GiB tree, {cores} cores, best of {args.repeat}, "
              f"chunk {args.chunk_mib} MiB x depth {args.depth}, "
              f"{'private' if args.private_rings else 'shared'} rings, serial chunk "
              f"{args.serial_chunk_mib} MiB, load avg {os.getloadavg()[0]:.1f}")
        print("| dest | n | stage() s | cp -r s | serial s | stage/cp | serial/stage | "
              "GB/s per dest stage | CPU-s/GiB/dest stage | cp -r | serial | CPU stage/cp | "
              "stage CPU floor s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        table = []
        for kind, n, best in rows:
            (ts, cs), (tc, cc), (tb, cb) = best["stage()"], best["cp -r"], best["serial"]
            per = gib * n
            row = {"dest": kind, "ranks": n, "stage_s": ts, "cp_s": tc, "serial_s": tb,
                   "stage_cpu_s": cs, "cp_cpu_s": cc, "serial_cpu_s": cb}
            table.append(row)
            print(f"| {kind} | {n} | {ts:.2f} | {tc:.2f} | {tb:.2f} | {ts / tc:.2f}x | "
                  f"{tb / ts:.2f}x | {size / ts / 1e9:.2f} | {cs / per:.2f} | {cc / per:.2f} | "
                  f"{cb / per:.2f} | {cs / cc:.2f}x | {cs / cores:.2f} |")
        print("targets (>= 16 cores): stage/cp <= 1.2x, serial/stage >= 3x, "
              "CPU stage/cp <= 2x; 'stage CPU floor' = stage()'s CPU seconds / cores, the "
              "shortest wall time that CPU work allows")
        if args.json:
            Path(args.json).write_text(json.dumps({"size_bytes": size, "cores": cores,
                                                   "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
