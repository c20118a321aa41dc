"""A run directory whose endpoints file lists stand-in servers this test started itself (no
launcher), one stand-in process per model serving all of that model's ports (--port-range):
a real `aegis.Run` over real HTTP servers with vLLM's /metrics, for the metrics client's tests
and benchmarks/bench_metrics.py. The launcher end to end (router, targets file) is in
tests/unit/test_metrics.py with tests/unit/test_launch_run.py's Run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ports import free_port_block

STANDIN = Path(__file__).resolve().parent / "standin_vllm.py"
KEY = "k" * 40
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class MetricsFleet:
    """`sizes[model]` stand-in instances per model, listed ready in run/endpoints.json."""

    def __init__(self, tmp: Path, sizes: dict[str, int] | int = 2, args=(),
                 key: str = KEY, routers: list[dict] | None = None, per_model_args=None):
        if isinstance(sizes, int):
            sizes = {"m": sizes}
        self.tmp, self.key, self.sizes = tmp, key, dict(sizes)
        self.run_dir = tmp / "run"
        self.run_dir.mkdir()
        self.routers = routers or []
        (self.run_dir / "config.yaml").write_text(json.dumps(
            {"platform": "local", "router": False,
             "models": [{"name": m, "instances": n} for m, n in sizes.items()]}))
        fd = os.open(self.run_dir / "api-key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, key.encode())
        os.close(fd)
        self.instances: list[dict] = []  # id, model, port, state
        self.procs: list[subprocess.Popen] = []
        total = sum(sizes.values())
        base = free_port_block(total)
        for model, n in sizes.items():
            first = base + len(self.instances)
            for k in range(n):
                self.instances.append({"id": len(self.instances), "model": model,
                                       "port": first + k, "state": "ready"})
            extra = list(args) + list((per_model_args or {}).get(model, ()))
            self._start(model, first, first + n - 1, extra)
        self.write()

    def _start(self, model: str, lo: int, hi: int, extra) -> None:
        env = {**os.environ, "VLLM_API_KEY": self.key}
        log = open(self.tmp / f"standin-{model.replace('/', '-')}.log", "ab")
        proc = subprocess.Popen([sys.executable, str(STANDIN), "serve", model, "--port-range",
                                 f"{lo}-{hi}", *extra], env=env, stdout=log, stderr=log)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        for port in (lo, hi):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    assert proc.poll() is None, "the stand-in exited"
                    assert time.monotonic() < deadline, "stand-in did not listen"
                    time.sleep(0.05)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.instances[i]['port']}"

    def post(self, i: int, path: str, body: dict, key: str | None = KEY) -> dict:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url(i) + path, data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        try:
            with NO_PROXY.open(request, timeout=10) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as err:
            return {"status": err.code}

    def control(self, i: int, **order) -> None:
        """Pin values ({"set": ...}), reset counters (a restart), set a /metrics fault."""
        self.post(i, "/standin/metrics", order, key=None)

    def complete(self, i: int, n: int = 1, *, words: int = 3, max_tokens: int = 2,
                 status: int | None = None) -> list[dict]:
        body = {"model": self.instances[i]["model"], "prompt": " ".join(["w"] * words),
                "max_tokens": max_tokens}
        if status is not None:
            body["standin_status"] = status
        return [self.post(i, "/v1/completions", body) for _ in range(n)]

    def write(self, launcher_state: str = "serving", host: str | None = None) -> None:
        now = time.time()
        doc = {"schema": 1, "job": "j", "run_dir": str(self.run_dir),
               "ready": sum(i["state"] == "ready" for i in self.instances),
               "total": len(self.instances), "routers": self.routers,
               "instances": [{"id": i["id"], "model": i["model"], "served_name": i["model"],
                              "node": i["id"] % 4, "host": "127.0.0.1", "port": i["port"],
                              "state": i["state"], "restarts": 0, "exit_code": None,
                              "error": "", "base_url": f"http://127.0.0.1:{i['port']}/v1"}
                             for i in self.instances],
               "launcher": {"pid": os.getpid(), "host": host or socket.gethostname(),
                            "ranks": 1, "state": launcher_state, "exit_code": None,
                            "started_at": now, "updated_at": now, "heartbeat_at": now,
                            "heartbeat_interval": 600.0}}
        tmp = self.run_dir / ".endpoints.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.run_dir / "endpoints.json")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
