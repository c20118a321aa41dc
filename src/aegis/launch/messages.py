"""What the launcher says: progress lines with the time (a launch runs for hours; its log is
read afterwards) and errors as one plain line each, like every aegis error."""

from __future__ import annotations

import sys
import time

PROG = "aegis launch"


def log_line(rank: int | None, msg: str) -> None:
    who = PROG if rank is None else f"{PROG} [rank {rank}]"
    print(f"{time.strftime('%H:%M:%S')} {who}: {msg}", file=sys.stderr, flush=True)


def print_error(msg: str) -> None:
    for line in msg.splitlines():  # a ConfigError may name several problems, one a line
        print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
