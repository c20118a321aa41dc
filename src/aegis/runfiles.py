"""What a run directory's files say, as their readers see them: the endpoints file (the
contract between the launcher and every client: docs/launch.md "The endpoints file") and a
chain's record. Readers check every field they use and, on the launcher's host, that its
process is the one recorded (aegis.pids: pid, start time, boot id); files are read bounded
and without blocking (aegis.files). The launcher writes them (aegis.launch.endpoints,
aegis.launch.chain, aegis.scheduler.submit); Run and the clients only read them here.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib

from . import pids
from .files import MAX_CHAIN_BYTES, RefusedFile, read_run_file
from .layout import CHAIN_NAME

SCHEMA = 1  # bumped only for changes a reader must know about; fields are only ever added
HEARTBEAT_INTERVAL = 5.0  # seconds between rewrites by a live launcher
STALE_AFTER = 3  # heartbeat intervals without a rewrite: the launcher is taken as dead
# The launcher as a whole; a reader waits while it is staging or starting.
LAUNCHER_STATES = ("staging", "starting", "serving", "draining", "stopping", "stopped", "failed")
# One instance; only "ready" ones are served (and listed in the .txt file).
# unhealthy: was ready and still runs, but its health checks fail (out of its router; back to
#   ready when it answers, restarted after liveness_failures failed full checks)
# draining: still running and finishing its requests, but taking no new ones (walltime is near)
INSTANCE_STATES = ("pending", "starting", "ready", "unhealthy", "draining", "restarting",
                   "failed", "stopped")
SERVING_STATES = ("ready", "unhealthy")  # became ready and still runs
FINAL_LAUNCHER_STATES = ("stopped", "failed")

# Set in a chained generation's job environment (aegis submit --chain).
CHAIN_DIR_VAR = "AEGIS_CHAIN_DIR"
GENERATION_VAR = "AEGIS_GENERATION"
MAX_GENERATIONS = 1000  # aegis submit --chain N: N <= 1000


# --- readers (the caller passes the time) ---

def launcher_alive(doc: dict, now: float) -> bool:
    """The launcher behind `doc` is running: not finished, heartbeat fresh (wall clock, so
    readers on other hosts need roughly synchronised clocks, as HPC nodes have) and, read on
    the launcher's own host, its process is the one recorded (pid, start time and boot id;
    a record without the last two, from an older aegis: its pid is alive). A record that is
    not one (wrong types, missing fields) is never alive."""
    launcher = doc.get("launcher") if isinstance(doc, dict) else None
    if not isinstance(launcher, dict) or check_launcher(launcher):
        return False
    if launcher["state"] in FINAL_LAUNCHER_STATES:
        return False
    # stale, or from the future: a clock this far off (or a forged time) vouches for nothing
    if not abs(now - launcher["heartbeat_at"]) <= STALE_AFTER * launcher["heartbeat_interval"]:
        return False
    return launcher_identity(launcher) in (pids.SAME, "remote", pids.UNKNOWN)


def launcher_identity(launcher: dict) -> str:
    """Whether the record's launcher process is, on this host, the one that runs now:
    pids.SAME, GONE, OTHER, or UNKNOWN (no start time or boot id recorded, or no /proc:
    its pid runs, but nothing says it is the launcher); "remote" for another host, which
    only the heartbeat can speak for."""
    pid, ticks, boot = launcher["pid"], launcher.get("start_ticks"), launcher.get("boot_id")
    if not pids.this_host(launcher["host"]):
        # (not the boot id: containers on one kernel share it, each with its own pids)
        return "remote"
    verdict = pids.check_identity(pid, ticks, boot)
    if verdict == pids.UNKNOWN:
        return pids.UNKNOWN if pids.pid_alive(pid) else pids.GONE
    return verdict


def serving(doc: dict, now: float) -> list[dict]:
    """The instances a client may use: ready, behind a live launcher."""
    if not launcher_alive(doc, now):
        return []
    return [i for i in doc.get("instances", ())
            if isinstance(i, dict) and i.get("state") == "ready"]


# What a reader accepts as heartbeat_interval: one the size of days would keep a dead launcher
# "alive" for days.
MAX_HEARTBEAT_INTERVAL = 600.0
# What a reader checks of each record (fields only ever added; unknown ones are kept).
# kinds: word (no whitespace or control characters: hosts, URLs, states), name (no control
# characters), text (any text), int, count (int >= 0), port, pid, time (a finite number),
# interval (seconds, > 0 and <= MAX_HEARTBEAT_INTERVAL); "?" also allows null.
_LAUNCHER_FIELDS = {"pid": "pid", "host": "word", "state": "word", "heartbeat_at": "time",
                    "heartbeat_interval": "interval", "ranks": "count?", "exit_code": "int?",
                    "started_at": "time?", "updated_at": "time?", "start_ticks": "count?",
                    "boot_id": "word?"}
_LAUNCHER_REQUIRED = ("pid", "host", "state", "heartbeat_at", "heartbeat_interval")
_INSTANCE_FIELDS = {"id": "count?", "model": "name", "served_name": "name", "node": "count?",
                    "host": "word", "port": "port?", "state": "word", "log": "text",
                    "restarts": "count?", "exit_code": "int?", "error": "text", "url": "word",
                    "base_url": "word"}
_ROUTER_FIELDS = {"model": "name", "url": "word", "host": "word", "node": "count?",
                  "port": "port?", "state": "word", "workers": "count?", "restarts": "count?",
                  "error": "text", "log": "text"}
_DOC_FIELDS = {"schema": "count?", "job": "name?", "run_dir": "text?", "ready": "count?",
               "total": "count?", "generation": "count?"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_INT = 1 << 63


def _kind_problem(value, kind: str) -> str | None:
    """Why `value` is not of `kind`, or None."""
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind in ("word", "name", "text"):
        if not isinstance(value, str):
            return "expected text"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid Unicode text"
        if kind != "text" and _CONTROL.search(value):
            return "contains a control character"
        if kind == "word" and any(c.isspace() for c in value):
            return "contains whitespace"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "expected a number"
    if kind == "time":
        return None if math.isfinite(value) and abs(value) <= 1e12 else "out of range"
    if kind == "interval":
        return None if 0 < value <= MAX_HEARTBEAT_INTERVAL else "out of range"
    if not isinstance(value, int):
        return "expected an integer"
    low, high = {"int": (-_MAX_INT, _MAX_INT), "count": (0, _MAX_INT), "port": (0, 65535),
                 "pid": (1, (1 << 31) - 1)}[kind]
    return None if low <= value <= high else "out of range"


def _record_problem(record, fields: dict, required: tuple, where: str) -> str | None:
    if not isinstance(record, dict):
        return f"{where}: expected an object"
    for name in required:
        if name not in record:
            return f"{where}.{name}: missing"
    for name, kind in fields.items():
        if name in record:
            why = _kind_problem(record[name], kind)
            if why:
                return f"{where}{'.' if where else ''}{name}: {why} (got {_short(record[name])})"
    return None


def _short(value) -> str:
    text = reprlib.repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_launcher(launcher) -> str | None:
    """Why `launcher` is not a launcher record (one line), or None."""
    return _record_problem(launcher, _LAUNCHER_FIELDS, _LAUNCHER_REQUIRED, "launcher")


def check_doc(doc) -> str | None:
    """Why `doc` is not an endpoints document (one line), or None: every field a reader uses
    has its type and range, so no reader needs to trust the file."""
    if not isinstance(doc, dict):
        return "not an aegis endpoints file (expected a JSON object)"
    if not isinstance(doc.get("launcher"), dict) or not isinstance(doc.get("instances"), list):
        return "not an aegis endpoints file (no launcher record or instances list)"
    problem = _record_problem(doc, _DOC_FIELDS, (), "") or check_launcher(doc["launcher"])
    if problem:
        return problem
    if not isinstance(doc.get("routers", []), list):
        return "routers: expected a list"
    for where, records, fields, required in (
            ("instances", doc["instances"], _INSTANCE_FIELDS, ("state",)),
            ("routers", doc.get("routers", []), _ROUTER_FIELDS, ())):
        for i, record in enumerate(records):
            problem = _record_problem(record, fields, required, f"{where}[{i}]")
            if problem:
                return problem
    return None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(text: str):
    """Strict JSON of a run file: NaN and Infinity refused, nesting bounded (ValueError)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_endpoints(path: str | os.PathLike, *, owner: int | None = None) -> dict:
    """The parsed file, checked (check_doc). Read as a bounded regular file without blocking
    (a FIFO, a device or a huge file is refused at once); with `owner`, only a file that uid
    owns. Raises OSError (missing, unreadable) or ValueError (not an endpoints file; one
    line, naming the file)."""
    from .files import MAX_ENDPOINTS_BYTES, read_small_file, why_unreadable

    try:
        text = read_small_file(os.fspath(path), MAX_ENDPOINTS_BYTES, regular=True, owner=owner)
    except (RefusedFile, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: {why_unreadable(err)}") from None
    try:
        doc = parse_json(text)
    except ValueError as err:
        raise ValueError(f"{path}: not JSON: {err}") from None
    problem = check_doc(doc)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return doc


def count(value) -> int:
    """A non-negative int field, or 0 for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def read_record(chain_dir: str | os.PathLike) -> dict[int, tuple[str, str | None]]:
    """chain.json: generation -> (job id, run directory or None when not recorded). Read as a
    bounded regular file of yours; every field checked. Raises OSError or ValueError (one
    line, naming the file)."""
    from .scheduler import check_job_id

    path = os.path.join(os.fspath(chain_dir), CHAIN_NAME)
    try:
        record = parse_json(read_run_file(path, MAX_CHAIN_BYTES))
    except (RefusedFile, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: unreadable chain record: {err}") from None
    generations = record.get("generations") if isinstance(record, dict) else None
    if not isinstance(generations, list) or len(generations) > MAX_GENERATIONS:
        raise ValueError(f"{path}: unreadable chain record: expected a list of at most "
                         f"{MAX_GENERATIONS} generations")
    runs = {}
    for i, entry in enumerate(generations):
        number = entry.get("generation") if isinstance(entry, dict) else None
        job_id = entry.get("job_id") if isinstance(entry, dict) else None
        run_dir = entry.get("run_dir") if isinstance(entry, dict) else None
        try:
            if isinstance(job_id, int) and not isinstance(job_id, bool):
                job_id = str(job_id)
            check_job_id(job_id)
        except ValueError:
            job_id = None
        if not (isinstance(number, int) and not isinstance(number, bool)
                and 1 <= number <= MAX_GENERATIONS) or job_id is None or \
                not (run_dir is None or isinstance(run_dir, str) and run_dir
                     and "\0" not in run_dir):
            raise ValueError(f"{path}: unreadable chain record: generations[{i}] is not "
                             "{generation: 1-1000, job_id, run_dir}")
        runs[number] = (job_id, run_dir)
    return runs
