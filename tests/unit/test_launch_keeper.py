"""The keeper on its own: it relays the instance's exit status, and leaves no descendant
behind (children, grandchildren, a setsid'd daemon, a TERM-ignoring one) when the instance
exits, when it is told to stop, and when its launcher dies."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from aegis.launch.processes import KEEPER_ARGV
from harness import RUN_MARKER, kill_marked, marked_processes, wait_gone, wait_standin_families

STANDIN = Path(__file__).resolve().parents[1] / "standin_vllm.py"
FAMILY = ["--spawn-child", "--spawn-grandchild", "--spawn-daemon"]


@pytest.fixture
def token():
    token = uuid.uuid4().hex
    yield token
    kill_marked(token)


def _keeper(token, command, *, parent=None, grace=5.0, **kw):
    return subprocess.Popen([*KEEPER_ARGV, "--parent", str(parent or os.getpid()), "--grace",
                             str(grace), "--", *command],
                            env={**os.environ, RUN_MARKER: token}, **kw)


def _family(token, *extra):
    return [sys.executable, str(STANDIN), "serve", f"m-{token}", "--port", "0", *FAMILY, *extra]


def test_exit_status_of_the_instance_is_relayed(token):
    for code in (0, 3):
        keeper = _keeper(token, [sys.executable, "-c", f"import sys; sys.exit({code})"])
        assert keeper.wait(timeout=10) == code
    keeper = _keeper(token, [sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
    assert keeper.wait(timeout=10) == 128 + 9
    keeper = _keeper(token, ["/nonexistent/vllm"], stderr=subprocess.PIPE)
    assert keeper.wait(timeout=10) == 127
    assert "cannot run /nonexistent/vllm" in keeper.stderr.read().decode()


def test_leftovers_of_an_exited_instance_are_removed(token):
    # the instance's leader exits once its server's whole family runs (a line on its stdin,
    # not a fixed sleep: under load the family can take longer than any sleep to start);
    # the server, its child, grandchild and daemon must not outlive it
    script = (f"import subprocess, sys; subprocess.Popen({_family(token)!r}); "
              "sys.stdin.readline(); sys.exit(4)")
    keeper = _keeper(token, [sys.executable, "-c", script], stdin=subprocess.PIPE, text=True)
    wait_standin_families(token, 1)
    keeper.stdin.write("exit\n")
    keeper.stdin.flush()
    assert keeper.wait(timeout=15) == 4
    assert wait_gone(token, 0.5) == {}


@pytest.mark.parametrize("deaf", [False, True])
def test_stop_reaches_every_descendant_and_kills_after_the_grace(token, deaf):
    # the deaf one needs the KILL after a 1 s grace; the others go on TERM, long before a
    # 10 s grace would end (a margin that no load on the machine eats)
    grace = 1 if deaf else 10
    keeper = _keeper(token, _family(token, *(["--ignore-term"] if deaf else [])), grace=grace)
    # the whole family, settled: a process forked after the keeper's TERM would wait for the
    # KILL at the end of the grace (a stop while the family still forms proves less)
    wait_standin_families(token, 1)
    t0 = time.monotonic()
    keeper.send_signal(signal.SIGTERM)
    code = keeper.wait(timeout=30)
    took = time.monotonic() - t0
    assert wait_gone(token, 0) == {}
    assert code == (137 if deaf else 143), (code, took)
    assert took >= grace if deaf else took < grace, (code, took)


@pytest.mark.parametrize("how", ["SIGKILL", "exit"])
def test_launcher_death_stops_everything_within_the_death_grace(token, how):
    # a stand-in "launcher" that starts the keeper and then dies
    launcher = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time; "
         f"subprocess.Popen([*{list(KEEPER_ARGV)!r}, '--parent', str(os.getpid()), '--grace', "
         f"'60', '--', *{_family(token, '--ignore-term')!r}]); "
         "sys.stdin.readline()"],  # until told: die (SIGKILL) or exit
        env={**os.environ, RUN_MARKER: token}, stdin=subprocess.PIPE, text=True)
    wait_standin_families(token, 1)
    if how == "SIGKILL":
        launcher.kill()
    else:
        launcher.stdin.write("exit\n")
        launcher.stdin.flush()
    launcher.wait(timeout=15)
    t0 = time.monotonic()
    left = wait_gone(token, 10)
    assert left == {}, left
    # TERM is ignored here: the grace is cut from 60 s to keeper.DEATH_GRACE (5 s)
    assert 4 < time.monotonic() - t0 < 9


def test_a_keeper_whose_launcher_is_already_gone_starts_nothing(token, tmp_path):
    marker = tmp_path / "ran"
    keeper = _keeper(token, ["touch", str(marker)], parent=1)
    assert keeper.wait(timeout=10) == 143 and not marker.exists()


def test_launcher_dying_during_a_long_grace_cuts_it(token):
    """Regression: a SIGKILLed multi-threaded launcher can deliver the parent-death signal
    while getppid() still names it; the keeper then began a 30 s stop and kept to it."""
    launcher = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time; "
         f"k = subprocess.Popen([*{list(KEEPER_ARGV)!r}, '--parent', str(os.getpid()), "
         f"'--grace', '60', '--', *{_family(token, '--ignore-term')!r}]); "
         "time.sleep(float(sys.stdin.readline())); k.terminate(); time.sleep(1); "
         "os.kill(os.getpid(), 9)"],
        env={**os.environ, RUN_MARKER: token}, stdin=subprocess.PIPE, text=True)
    wait_standin_families(token, 1)
    launcher.stdin.write("0\n")  # stop (grace 60 s), then die 1 s later
    launcher.stdin.flush()
    launcher.wait(timeout=15)
    t0 = time.monotonic()
    assert wait_gone(token, 10) == {}
    assert time.monotonic() - t0 < 9


def test_shared_memory_a_killed_instance_leaves_is_removed(token, tmp_path):
    """Regression (e12ed61): killed engines left their /dev/shm segments (160-250 MB of RAM
    each on a real node). The keeper notes the segments its instance maps and removes them
    once the instance is gone; one that another process still maps is kept."""
    import mmap

    from aegis.launch.keeper import SHM_SAMPLE

    mine, shared = f"aegis-test-{token}", f"aegis-test-shared-{token}"
    log = tmp_path / "log"
    with open(log, "wb") as out:
        keeper = _keeper(token, [sys.executable, str(STANDIN), "serve", f"m-{token}", "--port",
                                 "0", "--shm-segment", mine, "--shm-segment", shared],
                         stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 15
            while f"mapped /dev/shm/{shared}" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            fd = os.open(f"/dev/shm/{shared}", os.O_RDWR)  # ... mapped by this process too
            held = mmap.mmap(fd, 4096)
            (pid,) = [p for p, cmd in marked_processes(token).items()
                      if "standin" in cmd and "keeper" not in cmd]
            time.sleep(SHM_SAMPLE + 1)  # the keeper's periodic note
            os.kill(pid, signal.SIGKILL)
            assert keeper.wait(timeout=15) == 128 + signal.SIGKILL
        finally:
            if keeper.poll() is None:
                keeper.kill()
    try:
        assert not os.path.exists(f"/dev/shm/{mine}"), "the instance's segment was left"
        assert f"removed /dev/shm/{mine}" in log.read_text()
        assert os.path.exists(f"/dev/shm/{shared}")  # still mapped here: kept
    finally:
        held.close()
        os.close(fd)
        for name in (mine, shared):
            if os.path.exists(f"/dev/shm/{name}"):
                os.unlink(f"/dev/shm/{name}")
