"""Whether a process id on this host names a live process (the staging core's leftovers and a
launched run's launcher are both recognized by pid)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while `pid` runs here; False once it is gone or a zombie (exited, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        # kill(0) also answers for a thread's id, which names no process
        return fields["Tgid"].strip() == str(pid) and not fields["State"].strip().startswith("Z")
    except (OSError, KeyError, ValueError):
        return True
