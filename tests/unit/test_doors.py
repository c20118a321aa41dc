"""Attacks on what a run exposes: its routers' management API, its instances' ports, and the
run's key (issue 16 §1, issue 21 §1). Each of these passed on e12ed61 only for the attacker.

- management calls (/add_worker, /remove_worker, /list_workers, /workers) and completions
  without the run's key, or with a wrong one, are refused (401); a foreign worker never
  receives a request;
- a worker added or removed behind the launcher's back (someone who has the key) is repaired
  within seconds, and the endpoints file states what the router really has;
- a router killed with SIGKILL is restarted with the current workers within seconds; its
  record says `restarting` meanwhile, never `ready`;
- a SIGSTOPped instance is `unhealthy` in the endpoints file within seconds (as the router
  takes it out), and `ready` again after SIGCONT;
- a server that takes an instance's port after the launcher checked it is never called
  ready, and never sees the run's key.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aegis.launch.router import VERIFY_INTERVAL, router_installed
from aegis.run import Run
from harness import until
from test_launch_run import Run as LaunchRun
from test_launch_run import _no_strays, processes_with  # noqa: F401 (autouse: no strays)

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(url: str, method: str = "GET", key: str | None = None, body: dict | None = None):
    """(status, text) of one HTTP request."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with NO_PROXY.open(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Recorder:
    """A foreign OpenAI-ish server that answers like vLLM and records every request's
    Authorization header: what an attacker's worker, or a server squatting a port, would see."""

    def __init__(self, port: int, served_name: str):
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                seen.append((self.command, self.path, self.headers.get("Authorization")))
                if self.path == "/v1/models":
                    body = {"object": "list", "data": [{"id": served_name}]}
                elif self.path.startswith("/v1/"):
                    body = {"choices": [{"text": "stolen", "index": 0}],
                            "system_fingerprint": "foreign"}
                else:
                    body = {}
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _serving(launch: LaunchRun, timeout: float = 60) -> Run:
    deadline = time.monotonic() + timeout
    while not (launch.run_dir / "config.yaml").exists():
        assert time.monotonic() < deadline, "the run never appeared"
        time.sleep(0.1)
    run = Run.open(launch.run_dir)
    run.wait_ready(timeout=timeout)
    return run


def _stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return err


def _router_workers(router_url: str, key: str) -> set[str]:
    status, text = call(f"{router_url}/list_workers", key=key)
    assert status == 200, text
    return {u.rstrip("/") for u in json.loads(text)["urls"]}


@pytest.fixture
def fleet(tmp_path):
    """Two stand-in instances of one model behind a router; yields (launch, run, router)."""
    assert router_installed(), "vllm-router is not installed (scripts/setup-dev)"
    launch = LaunchRun(tmp_path, [{"name": "m", "served_model_name": "m", "instances": 2}],
                       restart_backoff=0.2)
    proc = launch.start()
    try:
        run = _serving(launch)
        yield launch, run, run.router_url("m").removesuffix("/v1")
    finally:
        err = _stop(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert launch.leftovers() == []


def test_the_run_key_is_private_and_required_everywhere(fleet):
    launch, run, router = fleet
    key_file = launch.run_dir / "api-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = run.api_key()
    assert len(key) >= 32 and key == key_file.read_text().strip()
    # never in a script, the config copy, a log or a command line
    for path in launch.run_dir.rglob("*"):
        if path.is_file() and path != key_file:
            assert key not in path.read_text(errors="replace"), path
    assert not [p for p in processes_with(key)], "the key is on a command line"
    body = {"model": "m", "prompt": "hi", "max_tokens": 1}
    for url in [router] + [e.url.removesuffix("/v1") for e in run.endpoints()]:
        assert call(f"{url}/v1/completions", "POST", None, body)[0] == 401, url
        assert call(f"{url}/v1/completions", "POST", "wrong" * 10, body)[0] == 401, url
        assert call(f"{url}/v1/completions", "POST", key, body)[0] == 200, url


def test_router_management_needs_the_run_key(fleet, tmp_path):
    launch, run, router = fleet
    key = run.api_key()
    instances = {e.url.removesuffix("/v1") for e in run.endpoints()}
    from ports import free_port_block

    foreign = Recorder(free_port_block(1), "m")
    try:
        target = urllib.parse.quote(f"http://127.0.0.1:{foreign.server.server_address[1]}",
                                    safe="")
        victim = urllib.parse.quote(sorted(instances)[0], safe="")
        for bad in (None, "x" * 43, key[:-1] + ("A" if key[-1] != "A" else "B")):
            assert call(f"{router}/add_worker?url={target}", "POST", bad)[0] == 401
            assert call(f"{router}/remove_worker?url={victim}", "POST", bad)[0] == 401
            assert call(f"{router}/workers/{victim}", "DELETE", bad)[0] == 401
            assert call(f"{router}/list_workers", "GET", bad)[0] == 401
            assert call(f"{router}/workers", "GET", bad)[0] == 401
        for _ in range(20):  # requests with the key reach only our instances
            status, text = call(f"{router}/v1/completions", "POST", key,
                                {"model": "m", "prompt": "hi", "max_tokens": 1})
            assert status == 200 and json.loads(text)["system_fingerprint"] != "foreign"
        assert _router_workers(router, key) == instances
        assert foreign.seen == [], "a foreign worker got requests"
    finally:
        foreign.close()


def test_workers_changed_behind_the_launchers_back_are_repaired(fleet):
    """Whoever has the key (a leaked key, a slip in a script) still cannot keep a foreign
    worker in rotation, nor take one of ours out: the launcher reads the list back and
    repairs it every VERIFY_INTERVAL seconds."""
    launch, run, router = fleet
    key = run.api_key()
    instances = {e.url.removesuffix("/v1") for e in run.endpoints()}
    from ports import free_port_block

    foreign = Recorder(free_port_block(1), "m")
    try:
        url = f"http://127.0.0.1:{foreign.server.server_address[1]}"
        assert call(f"{router}/add_worker?url={urllib.parse.quote(url, safe='')}", "POST",
                    key)[0] == 200
        victim = sorted(instances)[0]
        assert call(f"{router}/remove_worker?url={urllib.parse.quote(victim, safe='')}",
                    "POST", key)[0] == 200
        until(lambda: _router_workers(router, key) == instances, 3 * VERIFY_INTERVAL + 5,
               "the router's workers repaired")
        doc = launch.endpoints()
        assert doc["routers"][0]["workers"] == 2 and doc["routers"][0]["state"] == "ready"
    finally:
        foreign.close()


def test_a_killed_router_comes_back_and_is_reported_down_meanwhile(fleet):
    launch, run, router = fleet
    key = run.api_key()
    port = int(router.rsplit(":", 1)[1])
    (pid,) = [int(p.split(":")[0]) for p in processes_with(f"--port {port} ")
              if "router_start" in p]
    os.kill(pid, signal.SIGKILL)
    down = until(lambda: launch.endpoints()["routers"][0]["state"] != "ready" and
                  launch.endpoints()["routers"][0], 5, "the router reported down")
    assert down["state"] in ("restarting", "starting") and down["workers"] == 0
    assert run.state().phase != "ready" or run.state().routers[0].state != "ready"
    back = until(lambda: (lambda r: r["state"] == "ready" and r["workers"] == 2 and r)(
        launch.endpoints()["routers"][0]), 20, "the router back with both workers")
    assert back["restarts"] == 1
    status, _ = call(f"{router}/v1/completions", "POST", key,
                     {"model": "m", "prompt": "hi", "max_tokens": 1})
    assert status == 200
    assert call(f"{router}/list_workers")[0] == 401  # the restarted one checks keys too


def test_a_hung_instance_is_unhealthy_in_the_file_within_seconds(fleet):
    launch, run, router = fleet
    stopped = run.endpoints()[0]
    port = int(stopped.url.rsplit(":", 1)[1].removesuffix("/v1"))
    (pid,) = [int(p.split(":")[0]) for p in processes_with(f"--port {port} ")
              if "standin_vllm" in p]
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        doc = until(lambda: (lambda d: d["instances"][stopped.id]["state"] != "ready" and d)(
            launch.endpoints()), 8, "the stopped instance leaves `ready`")
        assert doc["instances"][stopped.id]["state"] == "unhealthy"
        assert time.monotonic() - t0 < 8
        assert f":{port}" not in (launch.run_dir / "endpoints.txt").read_text()
        assert [e.id for e in run.endpoints()] == [1 - stopped.id]
    finally:
        os.kill(pid, signal.SIGCONT)
    until(lambda: launch.endpoints()["instances"][stopped.id]["state"] == "ready", 10,
           "ready again after SIGCONT")
    assert launch.endpoints()["instances"][stopped.id]["restarts"] == 0


def test_a_server_that_takes_the_port_is_never_called_ready(tmp_path):
    """vLLM binds its port 20-60 s after the launcher found it free. Another server that
    takes it meanwhile answers /health, /v1/models and completions like vLLM would; the
    launcher must see that the listening socket is not its instance's, fail the instance
    with a message naming the process, and never send it the run's key."""
    launch = LaunchRun(tmp_path, [{"name": "m", "served_model_name": "m",
                                   "extra_vllm_args": ["--start-delay", "4"]}],
                       startup_timeout=30)
    proc = launch.start()
    squatter = None
    try:
        launch.wait_endpoints(lambda d: d["launcher"]["state"] == "starting", timeout=30)
        squatter = Recorder(launch.port, "m")
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if squatter is not None:
            squatter.close()
    assert proc.returncode == 1, err
    (inst,) = launch.endpoints()["instances"]
    assert inst["state"] == "failed"
    assert f"port {launch.port} is held by another process" in inst["error"], inst["error"]
    assert f"pid {os.getpid()}" in inst["error"]
    assert all(auth is None for _, _, auth in squatter.seen), squatter.seen
    assert not any(path.startswith("/v1/") for _, path, _ in squatter.seen), squatter.seen
    assert "ready on" not in err
    assert launch.leftovers() == []


def test_an_instance_whose_chosen_port_is_taken_moves_to_a_free_one(tmp_path):
    """Where the plan allows (platform local, port_start unset: aegis chose the ports), an
    instance whose port another server takes moves to a free port and serves there; the
    squatter never sees the run's key. With a port_start of the user's it fails instead
    (test_a_server_that_takes_the_port_is_never_called_ready)."""
    launch = LaunchRun(tmp_path, [{"name": "m", "served_model_name": "m", "instances": 2,
                                   "extra_vllm_args": ["--start-delay", "3"]}],
                       port_start=None, router=False, startup_timeout=30)
    proc = launch.start()
    squatter = None
    try:
        doc = launch.wait_endpoints(lambda d: d["launcher"]["state"] == "starting", timeout=30)
        taken = doc["instances"][0]["port"]
        squatter = Recorder(taken, "m")
        run = _serving(launch, timeout=60)
        (moved, other) = sorted(run.endpoints(), key=lambda e: e.id)
        port = int(moved.url.rsplit(":", 1)[1].removesuffix("/v1"))
        assert port not in (taken, doc["instances"][1]["port"])
        key = run.api_key()
        status, text = call(f"{moved.url}/completions", "POST", key,
                            {"model": "m", "prompt": "hi", "max_tokens": 1})
        assert status == 200 and json.loads(text)["system_fingerprint"] == f"standin-{port}"
        assert all(auth is None for _, _, auth in squatter.seen), squatter.seen
        err = _stop(proc)
        assert f"moves to port {port}" in err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if squatter is not None:
            squatter.close()
    assert launch.leftovers() == []
