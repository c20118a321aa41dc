"""aegis.pids.pid_alive: what names a live process on this host."""

from __future__ import annotations

import os
import subprocess
import threading

from aegis.pids import pid_alive


def test_live_dead_zombie_and_thread_ids():
    assert pid_alive(os.getpid())
    done = subprocess.Popen(["true"])
    done.wait()
    assert not pid_alive(done.pid)  # reaped: gone
    zombie = subprocess.Popen(["true"])
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        pass  # exited, not yet reaped
    assert not pid_alive(zombie.pid)
    zombie.wait()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:  # kill(tid, 0) succeeds, but a thread's id names no process
        assert thread.native_id != os.getpid() and not pid_alive(thread.native_id)
    finally:
        stop.set()
        thread.join()
