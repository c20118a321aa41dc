"""One routed endpoint per model: `aegis launch` with stand-in servers and the real vllm-router
(PyPI, installed by the test extra), driven through the OpenAI SDK.

- 200 requests through the router reach every ready instance;
- a SIGSTOPped instance leaves the rotation within a few seconds (the router's tuned health
  checks) and comes back after SIGCONT; a killed one is taken out by the launcher, restarted
  and put back; no request fails beyond those in flight when it stopped or died.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor


from aegis.launch.router import router_installed
from aegis.run import Run
from harness import until
from test_launch_run import Run as LaunchRun
from test_launch_run import _no_strays, processes_with  # noqa: F401 (autouse: no strays)

DETECT = 8.0  # seconds within which a stopped or killed instance must leave the rotation


def _client(url: str, timeout: float, key: str):
    import openai

    return openai.OpenAI(base_url=url, api_key=key, timeout=timeout, max_retries=0)


def _served_by(client, model: str) -> str:
    return client.completions.create(model=model, prompt="hi", max_tokens=1).system_fingerprint


class Load:
    """Client threads sending completions through the router; records (sent, port or None)."""

    def __init__(self, url: str, model: str, key: str, threads: int = 6, timeout: float = 2.0):
        self.client = _client(url, timeout, key)
        self.model = model
        self.results: list[tuple[float, float, str | None]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self):
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                who = _served_by(self.client, self.model)
            except Exception:  # a failed request: recorded as None
                who = None
            self.results.append((sent, time.monotonic(), who))
            time.sleep(0.02)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def between(self, start: float, end: float) -> list[tuple[float, float, str | None]]:
        return [r for r in self.results if start <= r[0] < end]


def _open_when_there(run_dir, timeout: float) -> Run:
    deadline = time.monotonic() + timeout
    while not (run_dir / "config.yaml").exists():
        assert time.monotonic() < deadline, f"{run_dir} never appeared"
        time.sleep(0.1)
    return Run.open(run_dir)


def _router_workers(router: str, key: str) -> dict[str, bool]:
    """The router's own view: worker URL -> healthy (GET /workers, with the run's key)."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{router}/workers",
                                     headers={"Authorization": f"Bearer {key}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as reply:
        return {w["url"].rstrip("/"): w["is_healthy"] for w in json.load(reply)["workers"]}


def _until(predicate, timeout: float, what: str) -> float:
    """Poll until `predicate()` holds; -> the monotonic time it was first seen to hold."""
    until(predicate, timeout, what)
    return time.monotonic()


def _until_with_last_miss(predicate, timeout: float, what: str) -> tuple[float, float]:
    """Poll until `predicate()` holds -> (when it was first seen to hold, when the last poll
    that found it false began: it was still false then)."""
    deadline = time.monotonic() + timeout
    last_miss = time.monotonic()
    while True:
        began = time.monotonic()
        if predicate():
            return time.monotonic(), last_miss
        last_miss = began
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        time.sleep(0.05)


def _instance_pid(port: int) -> int:
    (line,) = [p for p in processes_with(f"--port {port} ") if "standin_vllm" in p]
    return int(line.split(":", 1)[0])


def test_router_spreads_requests_and_follows_stopped_and_killed_instances(tmp_path):
    assert router_installed(), "vllm-router is not installed (pip install -e '.[test]')"
    launch = LaunchRun(tmp_path, [{"name": "m", "served_model_name": "m", "instances": 3}],
                       restart_backoff=0.2)
    proc = launch.start()
    try:
        run = _open_when_there(launch.run_dir, timeout=30)
        status = run.wait_ready(timeout=60)
        ports = [launch.port + k for k in range(3)]
        assert [e.url for e in status.instances] == [f"http://127.0.0.1:{p}/v1" for p in ports]
        url = run.router_url("m")
        assert url == f"http://127.0.0.1:{launch.port + 3}/v1"

        # 200 requests through the router, 8 at a time: every instance serves, none fails
        client = _client(url, timeout=10, key=run.api_key())
        with ThreadPoolExecutor(8) as pool:
            served = Counter(pool.map(lambda _: _served_by(client, "m"), range(200)))
        assert sum(served.values()) == 200
        assert set(served) == {f"standin-{p}" for p in ports}, served

        stopped, killed = ports[0], ports[1]
        key = run.api_key()
        router = url.removesuffix("/v1")

        def in_rotation(port: int) -> bool:
            """What the router itself says (GET /workers): healthy and in its list."""
            return _router_workers(router, key).get(f"http://127.0.0.1:{port}", False)

        with Load(url, "m", key) as load:
            _until(lambda: len(load.results) >= 20, 30, "the load is running")
            pid = _instance_pid(stopped)
            os.kill(pid, signal.SIGSTOP)
            t_stop = time.monotonic()
            # events, not sleeps: the moment the router reports it out (within DETECT)
            t_out = _until(lambda: not in_rotation(stopped), DETECT + 10, "stopped: out")
            _until(lambda: len(load.between(t_out, 1e18)) >= 20, 30, "requests meanwhile")
            os.kill(pid, signal.SIGCONT)
            t_cont = time.monotonic()
            t_in = _until(lambda: in_rotation(stopped), 15, "resumed: back in rotation")
            _until(lambda: f"standin-{stopped}" in
                   {who for _, _, who in load.between(t_in, 1e18)}, 15, "served again")
            os.kill(_instance_pid(killed), signal.SIGKILL)
            t_kill = time.monotonic()
            t_gone = _until(lambda: not in_rotation(killed), DETECT + 10, "killed: out")
            # the launcher restarts it (backoff 0.2 s) and gives it back to the router
            # still out when the last poll that found it out began: nothing sent before that
            # (less the time a request takes to be routed) can have reached it
            t_back, t_still_out = _until_with_last_miss(lambda: in_rotation(killed), 30,
                                                        "restarted: back in rotation")
            _until(lambda: f"standin-{killed}" in
                   {who for _, _, who in load.between(t_back, 1e18)}, 15, "served again")
        # what it proves: out of rotation within DETECT seconds (the router's health checks
        # and the launcher's own), no request sent after that reaches it or fails, and it
        # serves again once back
        assert t_out - t_stop < DETECT and t_gone - t_kill < DETECT, (t_out - t_stop,
                                                                      t_gone - t_kill)
        for start, end, port in ((t_out, t_cont, stopped), (t_gone, t_still_out - 0.1, killed)):
            sent = load.between(start, end)
            assert sent and all(who not in (None, f"standin-{port}") for _, _, who in sent), \
                Counter(who for _, _, who in sent)
        # failures only among requests in flight when an instance stopped or died
        failed = [sent for sent, _, who in load.results if who is None]
        assert all(t_stop - 2.5 <= t < t_out or t_kill - 2.5 <= t < t_gone
                   for t in failed), failed
        restarted = [e for e in run.state().instances if e.url.endswith(f":{killed}/v1")]
        assert restarted[0].restarts == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert launch.leftovers() == []
    assert not processes_with(f"--port {launch.port + 3}"), "the router outlived the run"
    routers = Run.open(launch.run_dir).state().routers
    assert [r.state for r in routers] == ["stopped"]


def test_no_router_for_a_single_instance_unless_asked(tmp_path):
    launch = LaunchRun(tmp_path, [{"name": "m", "served_model_name": "m"}])
    res = launch.launch("--once")
    assert res.returncode == 0, res.stderr
    assert launch.endpoints()["routers"] == []
    (tmp_path / "b").mkdir()
    forced = LaunchRun(tmp_path / "b", [{"name": "m", "served_model_name": "m"}], router=True)
    proc = forced.start()
    try:
        run = _open_when_there(forced.run_dir, timeout=30)
        run.wait_ready(timeout=30)
        assert _served_by(_client(run.router_url(), 10, run.api_key()), "m") == \
            f"standin-{forced.port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert forced.leftovers() == []


def test_two_models_get_two_routers_beside_a_foreign_one(tmp_path):
    """Attack: vllm-router's metrics exporter defaults to port 29000, so a second router on
    the node (another model, another run) died with "Address already in use". Each router
    gets a port of its own; a foreign listener on 29000 changes nothing."""
    import socket

    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            squatter.bind(("127.0.0.1", 29000))
            squatter.listen()
        except OSError:
            pass  # already taken by someone else: the same attack
        launch = LaunchRun(tmp_path, [{"name": "a", "served_model_name": "a", "instances": 2},
                                      {"name": "b", "served_model_name": "b", "instances": 2}])
        proc = launch.start()
        try:
            run = _open_when_there(launch.run_dir, timeout=30)
            run.wait_ready(timeout=60)
            for model in ("a", "b"):
                answered = {_served_by(_client(run.router_url(model), 10, run.api_key()), model)
                            for _ in range(4)}
                assert len(answered) == 2, (model, answered)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
    assert launch.leftovers() == []
