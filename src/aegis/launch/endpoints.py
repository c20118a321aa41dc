"""The endpoints file, written: what clients read to find the servers, and how they tell that
the launcher behind it is alive. docs/launch.md ("The endpoints file") is the contract;
aegis.runfiles reads it (states, schema check, launcher liveness).

Rendering is pure; writing is atomic (aegis.files.write_atomic: a temporary file in the same
directory + os.replace, mode 0600 from the first byte). Rank 0
owns the file (EndpointsFile): it rewrites it on every state change and a heartbeat thread
refreshes `heartbeat_at` every HEARTBEAT_INTERVAL seconds, also while a long collective
(staging) blocks the main thread.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import pids
from ..files import write_atomic
from ..runfiles import HEARTBEAT_INTERVAL, SCHEMA



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


# --- the writer (rank 0) ---

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
