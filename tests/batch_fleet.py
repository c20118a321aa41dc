"""A run directory whose endpoints file lists stand-in servers this test started itself (no
launcher): a real `aegis.Run` over real HTTP servers, for the batch client's tests. The
launcher end to end is tests/unit/test_batch_launch.py."""

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


def line(i, model="m", url="/v1/completions", **body) -> str:
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url,
                       "body": {"model": model, "prompt": f"p{i}", "max_tokens": 2, **body}})


def write_input(path: Path, n: int, **body) -> Path:
    path.write_text("".join(line(i, **body) + "\n" for i in range(n)))
    return path


def output_ids(path: Path) -> list[str]:
    return [json.loads(x)["custom_id"] for x in path.read_text().splitlines() if x.strip()]


class Fleet:
    """`instances` stand-ins of model "m" (extra args each), listed ready in run/endpoints.json."""

    def __init__(self, tmp: Path, instances: int = 2, args=(), models=("m",),
                 key: str = KEY):
        self.tmp = tmp
        self.run_dir = tmp / "run"
        self.run_dir.mkdir()
        self.models = list(models)
        self.port = free_port_block(instances)
        self.key = key
        self.procs: list[subprocess.Popen | None] = []
        self.args = list(args)
        (self.run_dir / "config.yaml").write_text(json.dumps(
            {"platform": "local", "router": False,
             "models": [{"name": m, "instances": instances if k == 0 else 1}
                        for k, m in enumerate(self.models)]}))
        fd = os.open(self.run_dir / "api-key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, key.encode())
        os.close(fd)
        self.states = ["ready"] * instances
        for i in range(instances):
            self.procs.append(None)
            self.start(i)
        self.write()

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.port + i}/v1"

    def start(self, i: int, extra=()) -> None:
        env = {**os.environ, "VLLM_API_KEY": self.key}
        log = open(self.tmp / f"standin-{i}.log", "ab")
        self.procs[i] = subprocess.Popen(
            [sys.executable, str(STANDIN), "serve", self.models[0], "--port",
             str(self.port + i), *self.args, *extra], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port + i), timeout=1):
                    return
            except OSError:
                assert time.monotonic() < deadline, "stand-in did not listen"
                time.sleep(0.05)

    def kill(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()

    def write(self, launcher_state: str = "serving") -> None:
        now = time.time()
        doc = {"schema": 1, "job": "j", "run_dir": str(self.run_dir),
               "ready": self.states.count("ready"), "total": len(self.states), "routers": [],
               "instances": [{"id": i, "model": self.models[0], "served_name": self.models[0],
                              "node": 0, "host": "127.0.0.1", "port": self.port + i,
                              "state": s, "restarts": 0, "exit_code": None, "error": "",
                              "base_url": self.url(i)} for i, s in enumerate(self.states)],
               "launcher": {"pid": os.getpid(), "host": socket.gethostname(), "ranks": 1,
                            "state": launcher_state, "exit_code": None, "started_at": now,
                            "updated_at": now, "heartbeat_at": now,
                            "heartbeat_interval": 600.0}}
        tmp = self.run_dir / ".endpoints.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.run_dir / "endpoints.json")

    def close(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
