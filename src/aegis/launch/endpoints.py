"""The endpoints file: what clients read to find the servers, and how they tell that the
launcher behind it is alive. docs/launch.md ("The endpoints file") is the contract.

Rendering is pure; readers check every field they use (check_doc) and, on the launcher's
host, that its process is the one recorded (aegis.pids: pid, start time, boot id); writing is
atomic (temp file in the same directory + os.replace, mode 0600 from the first byte). Rank 0
owns the file (EndpointsFile): it rewrites it on every state change and a heartbeat thread
refreshes `heartbeat_at` every HEARTBEAT_INTERVAL seconds, also while a long collective
(staging) blocks the main thread.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import pids

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


@dataclass(frozen=True)
class InstanceState:
    """What rank 0 learns about one instance (sent from the rank holding its head)."""

    id: int
    model: str
    served_name: str
    node: int
    host: str
    port: int
    state: str  # one of INSTANCE_STATES
    log: str
    restarts: int = 0
    exit_code: int | None = None
    error: str = ""  # one line: why it is not ready
    log_tail: tuple[str, ...] = ()
    node_rank: int = 0  # which process of a multi-node instance this is (0 = head)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


def merge_parts(states: list[InstanceState]) -> list[InstanceState]:
    """One state per instance: a multi-node instance is failed if any of its processes failed,
    otherwise its head's state counts. Input: every rank's states, any order."""
    by_id: dict[int, list[InstanceState]] = {}
    for s in states:
        by_id.setdefault(s.id, []).append(s)
    merged = []
    for iid in sorted(by_id):
        parts = by_id[iid]
        head = min(parts, key=lambda p: p.node_rank)
        failed = next((p for p in parts if p.state == "failed"), None)
        merged.append(failed if failed is not None and head.state != "failed" else head)
    return merged


def none_serving(states: list[InstanceState]) -> list[InstanceState]:
    """The states once the launcher stops them: every instance not failed is stopped."""
    return [s if s.state == "failed" else replace(s, state="stopped") for s in states]


def draining(states: list[InstanceState]) -> list[InstanceState]:
    """The states to publish once the job's end is near: no instance is offered as ready."""
    return [replace(s, state="draining") if s.state == "ready" else s for s in states]


def endpoints_doc(states: list[InstanceState], *, launcher: dict, run_dir: str, job: str,
                  routers: list[dict] = ()) -> dict:
    records = []
    for s in states:
        rec = {k: v for k, v in asdict(s).items() if k not in ("log_tail", "node_rank")}
        rec["url"] = s.url
        rec["base_url"] = s.base_url
        records.append(rec)
    return {"schema": SCHEMA, "job": job, "run_dir": run_dir, "launcher": launcher,
            "ready": sum(s.state == "ready" for s in states), "total": len(states),
            "instances": records, "routers": list(routers)}


def endpoints_txt(states: list[InstanceState]) -> str:
    """host:port per ready instance, one a line (the earlier Aegis format)."""
    return "".join(f"{s.host}:{s.port}\n" for s in states if s.state == "ready")


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
_ROUTER_FIELDS = {"model": "name", "url": "word", "host": "word", "port": "port?",
                  "state": "word", "workers": "count?", "error": "text", "log": "text"}
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
    from ..config import MAX_ENDPOINTS_BYTES, RefusedFile, read_small_file, why_unreadable

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


# --- the writer (rank 0) ---

def write_atomic(path: str | os.PathLike, text: str, mode: int = 0o600) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class EndpointsFile:
    """Rank 0's endpoints file (JSON, plus host:port lines beside it as .txt)."""

    def __init__(self, json_path: str | os.PathLike, *, run_dir: str, job: str, ranks: int,
                 interval: float = HEARTBEAT_INTERVAL, clock=time.time):
        self.json_path = Path(json_path)
        self.txt_path = self.json_path.with_suffix(".txt")
        self.run_dir, self.job, self.clock, self.interval = run_dir, job, clock, interval
        now = clock()
        # pid, start_ticks and boot_id name this process (aegis.pids): a reader on this host
        # does not take a later process that got the same pid for the launcher.
        self.launcher = {**pids.identity(), "host": socket.gethostname(), "ranks": ranks,
                         "state": "staging", "exit_code": None, "started_at": now,
                         "updated_at": now, "heartbeat_at": now, "heartbeat_interval": interval}
        self.states: list[InstanceState] = []
        self.routers: list[dict] = []  # one record per model's router (launch.router)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed_writes = 0
        self._txt_behind = False  # a change's .txt is not written yet (a failed write)
        # Called after each write with (doc, txt or None): aegis.launch.chain.ChainMirror.
        self.mirror = None

    def update(self, states: list[InstanceState] | None = None, *, state: str | None = None,
               exit_code: int | None = None, routers: list[dict] | None = None,
               must_write: bool = False) -> None:
        """A change: new instance states, routers and/or launcher state, written at once. A
        failed write (full or stalled file system) is reported once and does not stop the
        launch (OSError only with must_write): readers then see the heartbeat go stale, which
        says "do not trust this file", until a later write succeeds."""
        with self._lock:
            if states is not None:
                self.states = list(states)
            if routers is not None:
                self.routers = list(routers)
            if state is not None:
                self.launcher["state"] = state
            if exit_code is not None:
                self.launcher["exit_code"] = exit_code
            self.launcher["updated_at"] = self.clock()
            self._try_write(txt=True, must_write=must_write)

    def finish(self, state: str, exit_code: int, routers: list[dict] | None = None) -> None:
        """The launcher ends: nothing is served any more. Stops the heartbeat."""
        self._stop.set()
        self.update(none_serving(self.states), state=state, exit_code=exit_code,
                    routers=routers)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="aegis-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self._stop.is_set():
                    return
                self._try_write(txt=self._txt_behind)  # .txt only after a failed change

    def _try_write(self, *, txt: bool, must_write: bool = False) -> None:
        try:
            self._write(txt=txt)
        except OSError as e:
            self._txt_behind = self._txt_behind or txt
            if must_write:
                raise
            self._failed_writes += 1
            if self._failed_writes == 1:
                print(f"{time.strftime('%H:%M:%S')} aegis launch: cannot write "
                      f"{self.json_path}: {e.strerror or e} (retrying; readers see a stale "
                      "heartbeat meanwhile)", file=sys.stderr, flush=True)
            return
        if self._failed_writes:
            print(f"{time.strftime('%H:%M:%S')} aegis launch: {self.json_path} written again",
                  file=sys.stderr, flush=True)
        self._failed_writes = 0
        self._txt_behind = self._txt_behind and not txt

    def _write(self, *, txt: bool) -> None:
        self.launcher["heartbeat_at"] = self.clock()
        doc = endpoints_doc(self.states, launcher=self.launcher, run_dir=self.run_dir,
                            job=self.job, routers=self.routers)
        text = endpoints_txt(self.states) if txt else None
        if text is not None:  # first: once a reader sees the JSON of a change, the .txt has it too
            write_atomic(self.txt_path, text)
        write_atomic(self.json_path, json.dumps(doc, indent=2) + "\n")
        if self.mirror is not None:
            self.mirror(doc, text)


def summary_table(states: list[InstanceState]) -> str:
    rows = [("ID", "MODEL", "NODE", "HOST:PORT", "STATE", "RESTARTS", "NOTE")]
    for s in states:
        rows.append((str(s.id), s.served_name, str(s.node), f"{s.host}:{s.port}", s.state,
                     str(s.restarts), s.error[:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    ready = counts.pop("ready", 0)
    others = "".join(f", {n} {state}" for state, n in sorted(counts.items()))
    lines.append(f"{ready}/{len(states)} instances ready{others}")
    return "\n".join(lines)


def failure_report(states: list[InstanceState]) -> str:
    out = []
    for s in states:
        if s.state != "failed":
            continue
        code = "" if s.exit_code is None else f" (exit code {s.exit_code})"
        out.append(f"instance {s.id} ({s.served_name}) on {s.host}:{s.port} failed{code}: {s.error}")
        out.append(f"  log: {s.log}")
        out.extend(f"  | {line}" for line in s.log_tail)
    return "\n".join(out)
