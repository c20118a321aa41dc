"""Small helpers for driving the test Slurm cluster from tests: submit, poll, cancel, and look
for leftover processes. Tests only; the product's own scheduler code lives in aegis.scheduler.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PREFIX = Path(os.environ.get("AEGIS_SLURM_PREFIX", "/tmp/aegis-slurm"))
SLURM_CONF = PREFIX / "etc" / "slurm.conf"

# Slurm job states after which nothing of the job runs any more
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


class JobError(AssertionError):
    pass


def run(argv, *, check=True, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 60)
    proc = subprocess.run([str(a) for a in argv], **kwargs)
    if check and proc.returncode != 0:
        raise JobError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def sbatch(script: Path, *args: str, cwd: Path | None = None) -> str:
    out = run(["sbatch", "--parsable", *args, script], cwd=cwd).stdout.strip()
    return out.split(";")[0]  # "id;cluster" on federated setups


def qsub(script: Path, *args: str, cwd: Path | None = None) -> str:
    out = run(["qsub", *args, script], cwd=cwd).stdout.strip()
    if not re.fullmatch(r"\d+(\.\S+)?", out):
        raise JobError(f"qsub printed {out!r}, expected a job id")
    return out


def job_state(job_id: str) -> str:
    """RUNNING, PENDING, COMPLETED, CANCELLED, ... ('' when the controller forgot the job).

    scontrol keeps finished jobs for MinJobAge (300 s in the test cluster); there is no
    accounting (sacct) in the test cluster.
    """
    proc = run(["scontrol", "show", "job", "-o", job_id], check=False)
    m = re.search(r"\bJobState=(\S+)", proc.stdout)
    return m.group(1) if m else ""


def wait_state(job_id: str, wanted: set[str], timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in wanted:
            return state
        if state in FINISHED and not wanted & FINISHED:
            break
        time.sleep(0.25)
    raise JobError(f"job {job_id}: state {state or 'unknown'}, waited {timeout:.0f} s for {sorted(wanted)}")


def wait_finished(job_id: str, timeout: float = 60.0) -> str:
    return wait_state(job_id, FINISHED, timeout)


def job_nodes(job_id: str) -> list[str]:
    proc = run(["scontrol", "show", "job", "-o", job_id])
    m = re.search(r"\bNodeList=(\S+)", proc.stdout)
    if not m or m.group(1) == "(null)":
        return []
    return run(["scontrol", "show", "hostnames", m.group(1)]).stdout.split()


def qstat_full(job_id: str) -> dict[str, str]:
    """`qstat -f ID` as a dict of its 'key = value' lines."""
    out = run(["qstat", "-f", job_id]).stdout
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.strip().partition(" = ")
        if sep:
            fields[key] = value
    return fields


def cancel(job_id: str) -> None:
    run(["scancel", job_id], check=False)


def processes_with(token: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line or environment mentions
    `token` (a per-test unique path), from /proc. Zombies are not counted: they hold nothing."""
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    environ = f.read().decode(errors="replace")
            except OSError:
                environ = ""
        except (OSError, IndexError):
            continue  # exited while we looked
        if token in cmdline or token in environ:
            found.append((int(entry.name), cmdline))
    return found


def processes_named(argv0: str) -> list[int]:
    """Pids of live processes whose argv[0] is exactly `argv0` (set with `exec -a`)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if f.read().split(b"\0", 1)[0].decode(errors="replace") == argv0:
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def wait_no_processes(token: str, timeout: float = 30.0) -> list[tuple[int, str]]:
    """Wait until no process mentions `token`; return what is still there at the deadline."""
    deadline = time.monotonic() + timeout
    left = processes_with(token)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = processes_with(token)
    return left


def wait_for_file(path: Path, timeout: float, job_id: str | None = None) -> str:
    """Wait until `path` exists and is non-empty; fail early if the job ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return path.read_text()
        if job_id and job_state(job_id) in FINISHED:
            time.sleep(0.5)  # the job may have written it just before ending
            if path.exists() and path.stat().st_size > 0:
                return path.read_text()
            raise JobError(f"job {job_id} ended ({job_state(job_id)}) before writing {path}")
        time.sleep(0.25)
    raise JobError(f"{path} did not appear within {timeout:.0f} s")
