"""Cancelling a stage by signal: the handler scope stage() sets up (aegis.bcast._Cancel, no
MPI), and `mpiexec -n 2 aegis stage` ended by SIGTERM (scancel) or SIGINT (Ctrl-C) mid-transfer.
The collective behaviour under mpiexec is pinned in tests/mpi/test_stage.py (signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aegis import bcast
from aegis.bcast import _Cancel

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}


@pytest.fixture(autouse=True)
def defaults_around():
    """Every test starts and ends with Python's default SIGINT/SIGTERM and no wakeup fd."""
    assert {s: signal.getsignal(s) for s in DEFAULTS} == DEFAULTS
    yield
    assert {s: signal.getsignal(s) for s in DEFAULTS} == DEFAULTS
    assert signal.set_wakeup_fd(-1) == -1


class Flag:
    def __init__(self):
        self.got = []

    def __call__(self, signum, _frame):
        self.got.append(signum)


def test_a_signal_reaches_the_core_fd_at_once_and_the_callers_handler_after():
    """Python's C-level handler writes the signal number to the pipe the C core polls (before
    any Python code runs); the caller's own handler is set aside, then called with it."""
    flag = Flag()
    previous = {s: signal.signal(s, flag) for s in DEFAULTS}
    try:
        with _Cancel(True) as cancel:
            assert cancel.fd >= 0 and cancel.mask == (1 << signal.SIGINT) | (1 << signal.SIGTERM)
            assert signal.getsignal(signal.SIGTERM) == cancel._record
            os.kill(os.getpid(), signal.SIGTERM)
            assert os.read(cancel.fd, 16) == bytes([signal.SIGTERM])
            assert cancel.signum == signal.SIGTERM and flag.got == []
            assert cancel.cause() == "cancelled by SIGTERM (signal 15)"
        assert flag.got == [signal.SIGTERM]  # the launcher's stop flag learns it
        assert signal.getsignal(signal.SIGTERM) is flag and signal.getsignal(signal.SIGINT) is flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_default_actions_come_back_only_when_the_stage_completed():
    """SIGINT's default is a KeyboardInterrupt: raised after a stage that completed anyway,
    not after one that raised (its StagingError is the answer to the signal)."""
    with pytest.raises(KeyboardInterrupt):
        with _Cancel(True):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # no KeyboardInterrupt here: only recorded
    with pytest.raises(bcast.StagingError):
        with _Cancel(True) as cancel:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # SIG_DFL, not taken: the process lives
            time.sleep(0.01)
            raise bcast.StagingError(bcast.E_CANCELLED, 0, "h", cancel.cause())


def test_ignored_signals_stay_ignored_and_cancel_nothing():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with _Cancel(True) as cancel:
            assert cancel.mask == 1 << signal.SIGINT
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert cancel.signum == 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_off_and_off_the_main_thread_nothing_is_touched():
    with _Cancel(False) as cancel:
        assert cancel.fd == -1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    seen = []

    def in_thread():
        with _Cancel(True) as c:
            seen.append((c.fd, signal.getsignal(signal.SIGTERM)))
    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [(-1, signal.SIG_DFL)]


def test_a_previous_wakeup_fd_is_restored_and_told():
    """An event loop's wakeup fd is set aside for the stage, then gets the signal numbers,
    those of its own signals (SIGUSR1 here) too; the stage's pipe is closed."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    flag, usr = Flag(), Flag()
    signal.signal(signal.SIGTERM, flag)
    signal.signal(signal.SIGUSR1, usr)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        signal.set_wakeup_fd(w)
        with _Cancel(True):
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.set_wakeup_fd(-1) == w and len(os.listdir("/proc/self/fd")) == fds
        os.set_blocking(r, False)
        assert sorted(os.read(r, 16)) == sorted([signal.SIGTERM, signal.SIGUSR1])
        assert flag.got == [signal.SIGTERM] and usr.got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        os.close(r)
        os.close(w)


def test_cancelled_error_carries_the_signal():
    err = bcast.StagingError(bcast.E_CANCELLED, 1, "h", bcast._cancel_cause(signal.SIGINT))
    assert err.signum == signal.SIGINT and err.kind == "cancelled"
    assert bcast.StagingError(bcast.E_WRITE, 1, "h", "(signal 2)").signum is None


# --------------------------------------------------------------------------- aegis stage


def _rank_pids(token: str) -> list[int]:
    """The `aegis stage` ranks (not mpiexec, not hydra's proxy) whose command line has token."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if token.encode() in cmd and b"stage" in cmd and not any(
                Path(os.fsdecode(c)).name in ("mpiexec", "hydra_pmi_proxy") for c in cmd[:1]):
            pids.append(int(pid))
    return sorted(pids)


@pytest.mark.parametrize("sig,to", [(signal.SIGTERM, "mpiexec"), (signal.SIGTERM, "rank 1"),
                                    (signal.SIGINT, "mpiexec")])
def test_aegis_stage_under_mpiexec_ends_on_a_signal(tmp_path, sig, to):
    """`mpiexec -n 2 aegis stage` of a 2 GiB (sparse) file in 64 KiB chunks, signalled once
    the transfer runs: to mpiexec (hydra passes it to every rank, as scancel signals every
    task) or to rank 1 alone. Every rank prints one line and exits 128+signal within
    seconds; no temporary sibling, no dest, no shared ring, no process is left."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    assert mpiexec.exists(), "the venv's mpiexec (PyPI mpich) runs this test"
    src = tmp_path / "weights.bin"
    with open(src, "wb") as fh:
        fh.truncate(2 << 30)
    dest = tmp_path / "dest"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "HYDRA", "MPIR_"))}
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.Popen([str(mpiexec), "-n", "2", sys.executable, "-m", "aegis", "stage",
                             "-q", "--chunk-size", "64K", str(src), str(dest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".dest.aegis-tmp-*/weights.bin")):  # the transfer runs
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)
        ranks = _rank_pids(str(dest))
        assert len(ranks) == 2, ranks
        writer = int(next(tmp_path.glob(".dest.aegis-tmp-*")).name.rsplit("-", 1)[1])
        target = proc.pid if to == "mpiexec" else next(p for p in ranks if p != writer)
        sent = time.monotonic()
        os.kill(target, sig)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    name = signal.Signals(sig).name
    lines = [line for line in err.splitlines() if line.startswith("aegis:")]
    assert proc.returncode == 128 + sig, err
    assert len(lines) == 2 and all("stage cancelled" in line and f"cancelled by {name}" in line
                                   for line in lines), err
    assert "Traceback" not in err  # stdout: nothing but hydra's own note on Ctrl-C
    assert [line for line in out.splitlines() if not line.startswith("[mpiexec@")] == []
    assert took < 5, f"{took:.1f} s from the signal to mpiexec's exit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]
    assert not [p for p in bcast.SHM_DIR.glob("aegis-ring-*")
                if any(p.name.startswith(f"aegis-ring-{pid}-") for pid in ranks)]
    assert _rank_pids(str(dest)) == []
