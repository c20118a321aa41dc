"""The endpoints file: what clients read to find the servers. Rendering is pure; the write is
atomic (temp file in the same directory + os.replace) and mode 0600 from the first byte."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path



@dataclass(frozen=True)
class InstanceState:
    """What rank 0 learns about one instance (sent from the rank holding its head)."""

    id: int
    model: str
    served_name: str
    node: int
    host: str
    port: int
    state: str  # starting | ready | restarting | failed | stopped
    log: str
    restarts: int = 0
    exit_code: int | None = None
    error: str = ""  # one line: why it is not ready
    log_tail: tuple[str, ...] = ()
    node_rank: int = 0  # which process of a multi-node instance this is (0 = head)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


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


def endpoints_json(states: list[InstanceState], *, run_dir: str, job: str) -> str:
    records = []
    for s in states:
        rec = {k: v for k, v in asdict(s).items() if k not in ("log_tail", "node_rank")}
        rec["base_url"] = s.base_url
        records.append(rec)
    doc = {"job": job, "run_dir": run_dir,
           "ready": sum(s.state == "ready" for s in states), "total": len(states),
           "instances": records}
    return json.dumps(doc, indent=2) + "\n"


def endpoints_txt(states: list[InstanceState]) -> str:
    """host:port per ready instance, one a line (the earlier Aegis format)."""
    return "".join(f"{s.host}:{s.port}\n" for s in states if s.state == "ready")


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


def write_endpoints(json_path: str | os.PathLike, states: list[InstanceState], *, run_dir: str,
                    job: str) -> tuple[Path, Path]:
    json_path = Path(json_path)
    txt_path = json_path.with_suffix(".txt")
    write_atomic(json_path, endpoints_json(states, run_dir=run_dir, job=job))
    write_atomic(txt_path, endpoints_txt(states))
    return json_path, txt_path


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
