"""What earlier runs left on a node is removed by the next launch (issue 16 §5): job caches of
runs that no longer run (owner-dead check, pid reuse included), unpacked environments beyond
the most recently used ones (never one in use), and MPI shared memory nobody maps."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

from aegis.launch.environment import ENV_MARKER, env_root
from aegis.launch.leftovers import (KEEP_ENVIRONMENTS, OWNER_PREFIX, claim, hold_environment,
                                    sweep)
from aegis.pids import identity

DAY = 24 * 3600


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _job(root: Path, name: str, owners: list[dict] | None, age: float = 0.0) -> Path:
    job = root / "aegis-cache" / name
    (job / "instance-0000" / "vllm").mkdir(parents=True)
    (job / "node" / "tiktoken").mkdir(parents=True)
    (job / "node" / "tiktoken").chmod(0o500)  # read-only, as the pre-warm leaves it
    for k, who in enumerate(owners or []):
        (job / f"{OWNER_PREFIX}{k}").write_text(json.dumps(who))
    if age:
        when = time.time() - age
        os.utime(job, (when, when))
    return job


def test_job_caches_of_runs_that_no_longer_run_are_removed(tmp_path):
    me = identity()
    reused = {**me, "start_ticks": me["start_ticks"] - 1}  # our pid, another start: reused
    dead = {"pid": _dead_pid(), "start_ticks": 1, "boot_id": me["boot_id"]}
    other_boot = {**me, "boot_id": "00000000-0000-0000-0000-000000000000"}
    current = tmp_path / "aegis-cache" / "job-now"
    claim(current)
    kept = {_job(tmp_path, "live", [me]),
            _job(tmp_path, "live-and-dead", [dead, me]),
            _job(tmp_path, "unrecorded-young", None)}
    gone = {_job(tmp_path, "dead", [dead]),
            _job(tmp_path, "pid-reused", [reused]),
            _job(tmp_path, "before-a-reboot", [other_boot]),
            _job(tmp_path, "unrecorded-old", None, age=2 * DAY)}
    removed = sweep(str(tmp_path), current, shm_dir=str(tmp_path / "shm"))
    assert {p for p in (tmp_path / "aegis-cache").iterdir()} == kept | {current}
    assert sorted(removed) == sorted(f"{p} (caches of a job that no longer runs)" for p in gone)
    assert json.loads(next(current.glob(f"{OWNER_PREFIX}*")).read_text()) == me


def _env(root: Path, name: str, used: float) -> Path:
    env = env_root(str(root)) / name
    (env / "bin").mkdir(parents=True)
    (env / ENV_MARKER).write_text("{}")
    os.utime(env / ENV_MARKER, (used, used))
    return env


def test_the_most_recently_used_environments_and_those_in_use_are_kept(tmp_path):
    now = time.time()
    envs = [_env(tmp_path, f"env-{k}", now - k * 3600) for k in range(KEEP_ENVIRONMENTS + 3)]
    in_use = envs[-1]  # the oldest, but a running launch holds it
    fd = hold_environment(in_use)
    try:
        removed = sweep(str(tmp_path), tmp_path / "aegis-cache" / "j",
                        shm_dir=str(tmp_path / "shm"))
    finally:
        os.close(fd)
    left = {p for p in env_root(str(tmp_path)).iterdir() if not p.name.startswith(".")}
    assert left == set(envs[:KEEP_ENVIRONMENTS]) | {in_use}
    assert sorted(removed) == sorted(f"{p} (an environment not used recently)"
                                     for p in envs[KEEP_ENVIRONMENTS:-1])


def test_mpi_shared_memory_nobody_maps_is_removed(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    old = time.time() - 600
    orphan, mapped, young, other = (shm / f"mpich_shm_{n}_0" for n in ("a1", "b2", "c3", "d4"))
    for path in (orphan, mapped, young):
        path.write_bytes(b"\0" * 4096)
    other.write_bytes(b"")  # not ours: chowned below
    os.chown(other, 65534, 65534)
    for path in (orphan, mapped, other):
        os.utime(path, (old, old))
    fd = os.open(mapped, os.O_RDWR)
    held = mmap.mmap(fd, 4096)
    try:
        removed = sweep(str(tmp_path), tmp_path / "aegis-cache" / "j", shm_dir=str(shm))
    finally:
        held.close()
        os.close(fd)
    assert removed == [f"{orphan} (MPI shared memory of a job that no longer runs)"]
    assert sorted(p.name for p in shm.iterdir()) == sorted(p.name for p in (mapped, young, other))


def test_the_next_launch_removes_what_a_killed_one_left(tmp_path):
    """Regression (e12ed61): a SIGKILLed run left <node_local_dir>/aegis-cache/<job>/ forever."""
    import signal

    from test_launch_run import Run as LaunchRun

    node_local = tmp_path / "nl"
    (tmp_path / "a").mkdir()
    first = LaunchRun(tmp_path / "a", [{"name": "m", "served_model_name": "m"}],
                      node_local_dir=str(node_local))
    proc = first.start()
    try:
        first.wait_endpoints(lambda d: d["launcher"]["state"] == "serving", timeout=60)
        (left,) = [p for p in (node_local / "aegis-cache").iterdir() if p.is_dir()]
        assert list(left.glob(f"{OWNER_PREFIX}*")), "the launcher did not record itself"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert first.leftovers() == []  # the keepers stopped the instances
    assert left.is_dir()  # ... but nobody removed the caches
    (tmp_path / "b").mkdir()
    second = LaunchRun(tmp_path / "b", [{"name": "m", "served_model_name": "m"}],
                       node_local_dir=str(node_local))
    res = second.launch("--once")
    assert res.returncode == 0, res.stderr
    assert f"removed {left} (caches of a job that no longer runs)" in res.stderr
    assert not left.exists()
    assert list((node_local / "aegis-cache").iterdir()) == []
