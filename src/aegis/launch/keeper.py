"""The keeper: one small process per instance between the launcher and the instance, so that
nothing of an instance outlives the launcher, even a launcher killed with SIGKILL.

    python -I -S keeper.py --parent PID --grace S -- COMMAND...

Run as a file, not as part of the package: standard library only, no site-packages (~10 MB,
~30 ms). It is a child subreaper (PR_SET_CHILD_SUBREAPER), so every descendant of the
instance whose parent dies is re-parented to it, including processes that left the instance's
process group or session (setsid, double fork): walking /proc from the keeper finds them all.
It starts COMMAND in a new session and then waits for one of:
- the instance's leader exits: whatever it left behind is stopped, the keeper exits with the
  leader's status (128+N for signal N), which the launcher reports;
- SIGTERM/SIGINT/SIGHUP from the launcher (stop): TERM to every descendant, up to --grace
  seconds, then KILL, then exit;
- the launcher dies (the parent-death signal SIGTERM, or getppid() no longer --parent,
  checked every half second): the same, with the grace cut to DEATH_GRACE seconds so that
  everything is gone within 10 s.
Should the keeper itself be killed, the instance's leader gets SIGKILL (its own parent-death
signal), and the launcher removes the rest: it is a subreaper too, so they are re-parented to
it, and each carries AEGIS_KEEPER=<keeper pid> in its environment (processes.remove_strays).

Shared memory: vLLM's engines keep 160-250 MB segments in /dev/shm (RAM on Aurora) that a
killed engine never unlinks. Every SHM_SAMPLE seconds, and before a sweep, the keeper notes
the /dev/shm files its descendants map or hold open; once they are all gone it removes the
noted ones that are this user's and that no other live process maps or holds.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
DEATH_GRACE = 5.0  # seconds between TERM and KILL once the launcher is gone
EXIT_DONE = 0.5  # seconds the leftovers of a leader that exited get before KILL
POLL = 0.5  # seconds between checks of the parent
KEEPER_ENV = "AEGIS_KEEPER"  # set to the keeper's pid in the environment of its instance
SHM_DIR = "/dev/shm/"
SHM_SAMPLE = 5.0  # seconds between notes of the instance's shared-memory segments


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def children() -> dict[int, list[int]]:
    """parent pid -> its live (non-zombie) children, from one walk of /proc."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != b"Z":
            found.setdefault(int(fields[1]), []).append(int(entry))
    return found


def descendants(root: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    """Live (non-zombie) processes below root, parents before children."""
    children_of = children() if tree is None else tree
    out, todo = [], [root]
    while todo:
        for pid in children_of.get(todo.pop(), ()):
            out.append(pid)
            todo.append(pid)
    return out


def shm_files(pid: int, dirs: tuple[str, ...] = (SHM_DIR,)) -> set[str]:
    """The files in `dirs` (each ending in /) that `pid` maps or holds open."""
    found = set()
    marks = tuple(d.encode() for d in dirs)
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            for line in f:
                starts = [i for i in (line.find(m) for m in marks) if i >= 0]
                if starts:
                    path = line[min(starts):].rstrip(b"\n").decode(errors="replace")
                    found.add(path.removesuffix(" (deleted)"))
    except OSError:
        pass
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(dirs):
                found.add(target.removesuffix(" (deleted)"))
    except OSError:
        pass
    return found


def remove_unused_shm(paths: set[str]) -> list[str]:
    """Unlink each of `paths` that is this user's and used by no live process -> removed."""
    if not paths:
        return []
    mine = set()
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid == os.getuid():
            mine.add(path)
    dirs = tuple({os.path.dirname(p) + "/" for p in mine})
    for entry in os.listdir("/proc") if mine else ():
        if entry.isdigit():
            mine -= shm_files(int(entry), dirs)
    removed = []
    for path in sorted(mine):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Keeper:
    def __init__(self, parent: int, grace: float):
        self.parent, self.grace = parent, grace
        self.me = os.getpid()
        self.leader: int | None = None
        self.status: int | None = None  # the leader's exit status, shell style
        self.stop_signal = 0
        self.shm: set[str] = set()  # /dev/shm files the instance was seen using
        self.next_shm_note = 0.0

    def _on_stop(self, signum, _frame) -> None:
        self.stop_signal = self.stop_signal or signum

    def reap(self) -> None:
        """Collect every exited child (re-parented orphans included)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.leader and self.status is None:
                self.status = (128 + os.WTERMSIG(status) if os.WIFSIGNALED(status)
                               else os.WEXITSTATUS(status))

    def note_shm(self) -> None:
        for pid in descendants(self.me):
            self.shm |= shm_files(pid)

    def sweep(self, grace: float) -> None:
        """TERM (and CONT, so a stopped process can act on it) to every descendant, wait up
        to `grace` (DEATH_GRACE at most once the launcher is gone), then KILL until none is
        left; then remove the shared memory they leave."""
        self.note_shm()
        procs = descendants(self.me)
        _signal(procs, signal.SIGTERM)
        _signal(procs, signal.SIGCONT)
        start = time.monotonic()
        while procs and time.monotonic() - start < grace:
            # The launcher may die during a long grace. Its dying threads can also make the
            # parent-death signal arrive while getppid() still names it (the child is first
            # handed to a sibling thread), so look again here.
            if self.launcher_gone():
                grace = min(grace, DEATH_GRACE)
            time.sleep(0.05)
            self.reap()
            procs = descendants(self.me)
        for _ in range(200):  # a process may fork while we kill: repeat until none is left
            procs = descendants(self.me)
            if not procs:
                break
            _signal(procs, signal.SIGKILL)
            time.sleep(0.01)
            self.reap()
        self.reap()
        for path in remove_unused_shm(self.shm):
            os.write(2, f"aegis keeper: removed {path} (shared memory the instance left)\n"
                        .encode())

    def launcher_gone(self) -> bool:
        return os.getppid() != self.parent

    def start(self, argv: list[str]) -> None:
        pid = os.fork()
        if pid == 0:  # the instance: its own session, dies with the keeper
            try:
                os.setsid()
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                # every descendant inherits the mark: should this keeper be killed, the
                # launcher (a subreaper too) finds what it left by it
                env = {**os.environ, KEEPER_ENV: str(self.me)}
                os.execvpe(argv[0], argv, env)  # handled signals are reset to default by exec
            except OSError as e:
                os.write(2, f"aegis keeper: cannot run {argv[0]}: {e.strerror}\n".encode())
            os._exit(127)
        self.leader = pid

    def run(self, argv: list[str]) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if self.launcher_gone():  # died before the line above: start nothing
            return 128 + signal.SIGTERM
        self.start(argv)
        while True:
            self.reap()
            if self.status is not None:
                self.sweep(EXIT_DONE)
                return self.status
            if self.stop_signal or self.launcher_gone():
                self.sweep(min(self.grace, DEATH_GRACE) if self.launcher_gone() else self.grace)
                return self.status if self.status is not None else 128 + signal.SIGTERM
            if time.monotonic() >= self.next_shm_note:
                self.note_shm()
                self.next_shm_note = time.monotonic() + SHM_SAMPLE
            readable, _, _ = select.select([wake_r], [], [], POLL)
            if readable:  # (a bare read would block until the next signal)
                os.read(wake_r, 512)


def main(argv: list[str]) -> int:
    usage = "usage: keeper.py --parent PID --grace SECONDS -- COMMAND..."
    try:
        split = argv.index("--")
        opts = dict(zip(argv[:split:2], argv[1:split:2]))
        parent, grace, command = int(opts["--parent"]), float(opts["--grace"]), argv[split + 1:]
    except (ValueError, KeyError):
        print(usage, file=sys.stderr)
        return 2
    if not command or grace < 0:
        print(usage, file=sys.stderr)
        return 2
    return Keeper(parent, grace).run(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
