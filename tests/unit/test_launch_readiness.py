"""The readiness check against the stand-in: each condition it requires, and wait_ready."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
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


# --- any conforming HTTP server: the standard library's, in each framing it can use ---

class _Handler(http.server.BaseHTTPRequestHandler):
    framing = "length"  # length | chunked | close (no length: the body ends with the connection)

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/health":
            self._send(200, b"")
        elif self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "m"}]}).encode())
        else:
            self._send(404, b"{}")

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ok = req["model"] == "m" and req["max_tokens"] == 1
        self._send(200 if ok else 400, json.dumps({"choices": [{"text": "hi"}]}).encode())

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if self.framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (body[:3], body[3:]):
                if piece:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.framing == "close":
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("protocol, framing", [
    ("HTTP/1.0", "length"),   # a new connection per request
    ("HTTP/1.0", "close"),    # no Content-Length: the body ends when the server closes
    ("HTTP/1.1", "length"),   # keep-alive: the three checks share one connection
    ("HTTP/1.1", "chunked"),
    ("HTTP/1.1", "close"),
])
def test_any_conforming_http_server_is_understood(protocol, framing):
    handler = type("Handler", (_Handler,), {"protocol_version": protocol, "framing": framing})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    connections = []
    real_handle = server.process_request

    def counting(request, address):
        connections.append(address)
        real_handle(request, address)

    server.process_request = counting
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = _probe(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    assert result.ready, result.detail
    reuse = protocol == "HTTP/1.1" and framing != "close"
    assert len(connections) == (1 if reuse else 3), connections


def test_a_server_that_answers_garbage_is_not_ready():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]

        def answer(payload):
            conn, _ = sock.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(payload)

        for payload, expected in [
            (b"SSH-2.0-OpenSSH_9.6\r\n", "127.0.0.1:%d: " % port),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnope!", None),
        ]:
            threading.Thread(target=answer, args=(payload,), daemon=True).start()
            result = probe_round([Target("k", "127.0.0.1", port, "m")], timeout=2)["k"]
            assert not result.ready
            if expected:
                assert result.detail.startswith(expected), result.detail


def test_an_instance_exit_is_said_in_words():
    """Regression (issue 21): a SIGKILLed engine was reported as 'exited with code 0' (vLLM's
    API server exits 0 when its engine process dies) and a signal as a bare code."""
    from aegis.launch.supervise import exit_description

    assert exit_description(137, []) == "killed by signal 9 (SIGKILL)"
    assert exit_description(143, []) == "killed by signal 15 (SIGTERM)"
    assert exit_description(3, []) == "exited with code 3"
    assert exit_description(0, []) == "exited with code 0 on its own"
    tail = ["(APIServer pid=3429) ERROR [async_llm.py:906] vllm.v1.engine.exceptions."
            "EngineDeadError: EngineCore encountered an issue.", "INFO:     Shutting down"]
    assert exit_description(0, tail).startswith(
        "exited with code 0 after its engine process died (EngineDeadError")
