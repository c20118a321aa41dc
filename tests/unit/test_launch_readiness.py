"""The readiness check against the stand-in: each condition it requires, and wait_ready."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aegis.launch.readiness import Target, probe_round, wait_ready

STANDIN = Path(__file__).resolve().parents[1] / "standin_vllm.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def standin():
    procs = []

    def start(*args, env=None):
        port = _free_port()
        proc = subprocess.Popen([sys.executable, str(STANDIN), "serve", "org/m", "--port", str(port),
                                 "--served-model-name", "m", *args],
                                env={**os.environ, **(env or {})}, stderr=subprocess.DEVNULL)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return port
            if proc.poll() is not None:
                return port
            time.sleep(0.05)
        raise RuntimeError("stand-in did not start")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _probe(port, name="m", key=None):
    return probe_round([Target("k", "127.0.0.1", port, name, key)], timeout=2)["k"]


def test_ready_needs_health_name_and_completion(standin):
    good = standin()
    assert _probe(good).ready
    assert _probe(good, "other").detail == "/v1/models does not list 'other' (has ['m'])"
    assert _probe(standin("--fault", "never-ready")).detail == "/health answered 503"
    broken = _probe(standin("--fault", "bad-completions"))
    assert not broken.ready and broken.detail.startswith("1-token completion answered 500")
    assert "EngineDeadError" in broken.detail


def test_api_key_is_sent_as_bearer(standin):
    port = standin(env={"VLLM_API_KEY": "k1"})
    assert _probe(port).detail == "/v1/models answered 401"
    assert _probe(port, key="wrong").detail == "/v1/models answered 401"
    assert _probe(port, key="k1").ready


def test_refused_and_silent_ports_are_reported():
    assert _probe(_free_port()).detail.startswith("connection refused on 127.0.0.1:")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        result = probe_round([Target("k", "127.0.0.1", port, "m")], timeout=0.5)["k"]
        assert result.detail == f"no answer from 127.0.0.1:{port} within 0.5s"
        assert time.monotonic() - t0 < 3


def test_wait_ready_sees_late_starters_dead_processes_and_deadline(standin):
    late_port = _free_port()
    late = subprocess.Popen([sys.executable, str(STANDIN), "serve", "x", "--port", str(late_port),
                             "--served-model-name", "late", "--start-delay", "0.5"],
                            stderr=subprocess.DEVNULL)
    try:
        stuck = standin("--fault", "never-ready")
        targets = [Target("late", "127.0.0.1", late_port, "late"),
                   Target("stuck", "127.0.0.1", stuck, "m"),
                   Target("dead", "127.0.0.1", _free_port(), "m")]
        t0 = time.monotonic()
        res = wait_ready(targets, deadline=t0 + 2.5, interval=0.2, timeout=1,
                         dead=lambda key: "exited with code 3" if key == "dead" else None)
        elapsed = time.monotonic() - t0
    finally:
        late.kill()
        late.wait()
    assert res["late"].ready
    assert res["dead"].detail == "exited with code 3"
    assert res["stuck"].detail == "not ready in time; last check: /health answered 503"
    assert 2.5 <= elapsed < 4.5
