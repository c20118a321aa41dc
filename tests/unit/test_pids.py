"""aegis.pids: whether a pid names a live process on this host, and which process it names."""

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


def _ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def test_a_process_is_named_by_pid_start_time_and_boot():
    from aegis.pids import GONE, OTHER, SAME, UNKNOWN, boot_id, check_identity, identity

    me = identity()
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert me == {"pid": os.getpid(), "start_ticks": _ticks(os.getpid()),
                      "boot_id": f.read().strip()} and boot_id() == me["boot_id"]
    assert check_identity(os.getpid(), me["start_ticks"], me["boot_id"]) == SAME
    assert check_identity(os.getpid(), me["start_ticks"] + 1, me["boot_id"]) == OTHER  # reused
    assert check_identity(os.getpid(), me["start_ticks"], "another-boot") == OTHER
    assert check_identity(os.getpid(), None, me["boot_id"]) == UNKNOWN  # an older record
    done = subprocess.Popen(["true"])
    done.wait()
    assert check_identity(done.pid, me["start_ticks"], me["boot_id"]) == GONE
    zombie = subprocess.Popen(["true"])
    ticks = _ticks(zombie.pid)
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        pass
    assert check_identity(zombie.pid, ticks, me["boot_id"]) == GONE
    zombie.wait()
    assert check_identity(1 << 40, 0, me["boot_id"]) == GONE
    for pid in (0, -1, True, "1"):  # no process: 0 and -1 name process groups
        assert check_identity(pid, 0, me["boot_id"]) == UNKNOWN
        assert not pid_alive(pid)


def test_signal_process_hits_only_the_recorded_process():
    import signal

    from aegis.pids import GONE, OTHER, SAME, boot_id, signal_process

    target = subprocess.Popen(["sleep", "60"])
    try:
        ticks = _ticks(target.pid)
        # a pid that names another process now: nothing is sent
        assert signal_process(target.pid, ticks - 1, boot_id(), signal.SIGTERM) == OTHER
        assert target.poll() is None
        assert signal_process(target.pid, ticks, boot_id(), signal.SIGTERM) == SAME
        assert target.wait(timeout=10) == -signal.SIGTERM
        assert signal_process(target.pid, ticks, boot_id(), signal.SIGTERM) == GONE
    finally:
        target.kill()
        target.wait()
