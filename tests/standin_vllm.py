#!/usr/bin/env python3
"""Stand-in for `vllm serve`: a tiny OpenAI-ish HTTP server with fault switches. Tests only.

    python tests/standin_vllm.py serve MODEL --host H --port P --served-model-name S [switches]

Speaks GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions.
Unknown vLLM flags (--tensor-parallel-size, --nnodes, ...) are accepted and ignored.
Switches (also via STANDIN_FAULT / STANDIN_START_DELAY env vars):
  --fault exit-at-start       exit 3 before listening
  --fault never-ready         /health answers 503 forever
  --fault bad-completions     /health and /v1/models fine, completions answer 500
  --fault crash-after:N       exit 4 right after answering N requests
  --fault hang-after:N        after N requests, accept connections but never answer (a hung engine)
  --crash-once-marker PATH    with crash-after/hang-after: strike only if PATH is absent (and create it),
                              so a restarted copy stays up
  --start-delay S             sleep S seconds before listening (model "loading")
  --delay S                   take S seconds to answer each completion (requests overlap)
  --fault flaky:K             every K-th completion answers 503 (a transient engine error)
Per request (tests only): a completion body with "standin_status": N is answered with status N,
"standin_delay": S takes S seconds more, and "standin_pretty": true answers indented JSON.
  --spawn-child               start a child process (like vLLM's engine core) that outlives
                              this one unless its process group is stopped
  --spawn-grandchild          start a child that starts a child of its own (two levels down)
  --spawn-daemon              start a process in its own session whose parent has exited
                              (setsid + double fork: outside the instance's group and session)
  --ignore-term               ignore SIGTERM, also in every process it spawns (only KILL stops it)
  --shm-segment NAME          create /dev/shm/NAME (1 MiB) and keep it mapped, as vLLM's
                              engines do; never unlinked by this process (a killed engine's
                              leak); may be given several times
  --port-range A-B            serve every port A..B in one process (benchmarks)
A MODEL that is an absolute path must have config.json at its top (vLLM refuses it otherwise).
If VLLM_API_KEY is set, /v1/* requires "Authorization: Bearer <key>" (as vLLM does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time


def parse(argv):
    p = argparse.ArgumentParser(prog="standin_vllm")
    p.add_argument("serve")
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--fault", default=os.environ.get("STANDIN_FAULT", ""))
    p.add_argument("--crash-once-marker", default=None)
    p.add_argument("--start-delay", type=float, default=float(os.environ.get("STANDIN_START_DELAY", "0")))
    p.add_argument("--port-range", default=None)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--spawn-child", action="store_true")
    p.add_argument("--spawn-grandchild", action="store_true")
    p.add_argument("--spawn-daemon", action="store_true")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--shm-segment", action="append", default=[])
    args, _unknown = p.parse_known_args(argv)
    return args


class Server:
    def __init__(self, args):
        self.args = args
        self.name = args.served_model_name or args.model
        self.key = os.environ.get("VLLM_API_KEY")
        self.served = 0
        self.crash_after = None
        self.hang_after = None
        self.completions = 0
        kind, _, count = args.fault.partition(":")
        self.flaky = int(count) if kind == "flaky" else 0
        # With --crash-once-marker the fault strikes only the first run (the marker records it).
        if kind in ("crash-after", "hang-after") and not self._struck_before(args.crash_once_marker):
            setattr(self, kind.replace("-", "_"), int(count))

    @staticmethod
    def _struck_before(marker) -> bool:
        if not marker:
            return False
        if os.path.exists(marker):
            return True
        open(marker, "w").close()
        return False

    def route(self, method, path, headers, body):
        fault = self.args.fault
        if path == "/health":
            return (503, {"error": "not ready"}) if fault == "never-ready" else (200, None)
        if path.startswith("/v1/") and self.key and headers.get("authorization") != f"Bearer {self.key}":
            return 401, {"error": "Unauthorized"}
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": self.name, "object": "model",
                                                     "root": self.args.model, "owned_by": "standin"}]}
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            if fault == "bad-completions":
                return 500, {"error": "EngineDeadError: engine core died"}
            req = json.loads(body or b"{}")
            self.completions += 1
            if self.flaky and self.completions % self.flaky == 0:
                return 503, {"error": {"message": "flaky: try again", "code": 503}}
            if isinstance(req.get("standin_status"), int):
                return req["standin_status"], {"error": {"message": "standin_status asked",
                                                         "code": req["standin_status"]}}
            if req.get("model") != self.name:
                return 404, {"error": f"model {req.get('model')!r} not found"}
            if path == "/v1/completions":
                choice = {"index": 0, "text": " hi", "finish_reason": "length", "logprobs": None}
                kind = "text_completion"
            else:
                choice = {"index": 0, "finish_reason": "length",
                          "message": {"role": "assistant", "content": "hi"}}
                kind = "chat.completion"
            # system_fingerprint names the answering server, so tests can count who served
            return 200, {"id": "cmpl-standin", "object": kind, "created": int(time.time()),
                         "model": self.name, "choices": [choice],
                         "system_fingerprint": f"standin-{self.args.port}",
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        return 404, {"error": f"no route {method} {path}"}

    async def handle(self, reader, writer):
        """HTTP/1.1 with keep-alive, as uvicorn does."""
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                if self.hang_after is not None and self.served >= self.hang_after:
                    print("standin: hanging", file=sys.stderr, flush=True)
                    await asyncio.sleep(3600)
                if method == "POST" and path.startswith("/v1/"):
                    extra = 0.0
                    if b"standin_delay" in body:
                        extra = float(json.loads(body).get("standin_delay", 0))
                    if self.args.delay or extra:
                        await asyncio.sleep(self.args.delay + extra)
                status, payload = self.route(method, path.split("?")[0], headers, body)
                pretty = method == "POST" and b'"standin_pretty": true' in body
                data = b"" if payload is None else json.dumps(payload, indent=2 if pretty else None).encode()
                close = headers.get("connection", "").lower() == "close"
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(data)}\r\n"
                             f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode() + data)
                await writer.drain()
                self.served += 1
                if self.crash_after is not None and self.served >= self.crash_after:
                    print(f"standin: crashing after {self.served} requests", file=sys.stderr, flush=True)
                    os._exit(4)
                if close:
                    return
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def amain(args):
    server = Server(args)
    if args.port_range:
        lo, hi = (int(x) for x in args.port_range.split("-"))
        ports = range(lo, hi + 1)
    else:
        ports = [args.port]
    servers = [await asyncio.start_server(server.handle, args.host, p, backlog=64) for p in ports]
    print(f"standin: serving {server.name!r} on {args.host}:{ports[0]}"
          f"{'-' + str(ports[-1]) if len(ports) > 1 else ''} (python {sys.executable})",
          file=sys.stderr, flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


# What each spawned process runs; the model name in its argv makes it findable.
_SLEEP = "import time; time.sleep(600)"
_SPAWNED = {
    "child": _SLEEP,
    "grandchild": ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                   f"{_SLEEP!r}, 'standin-grandchild', sys.argv[2]]); time.sleep(600)"),
    "daemon": f"import os; os.setsid(); os.fork() and os._exit(0); {_SLEEP}",
}


def spawn(kind, model):
    import subprocess

    subprocess.Popen([sys.executable, "-c", _SPAWNED[kind], f"standin-{kind}", model],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    print(f"standin: argv={sys.argv[1:]} devices={os.environ.get('VLLM_CPU_OMP_THREADS_BIND')}",
          file=sys.stderr, flush=True)
    if args.fault == "exit-at-start":
        print("standin: RuntimeError: simulated failure at start", file=sys.stderr, flush=True)
        return 3
    if os.path.isabs(args.model) and not os.path.isfile(os.path.join(args.model, "config.json")):
        # what vLLM does with a path it cannot load (e.g. a hub-cache directory itself)
        print(f"standin: Invalid repository ID or local directory specified: '{args.model}'",
              file=sys.stderr, flush=True)
        return 2
    if args.ignore_term:  # SIG_IGN survives exec: the spawned processes ignore it too
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for kind in ("child", "grandchild", "daemon"):
        if getattr(args, f"spawn_{kind}"):
            spawn(kind, args.model)
    maps = []  # mapped for the life of the process, like an engine's segments
    for name in args.shm_segment:
        import mmap

        fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 1 << 20)
        maps.append(mmap.mmap(fd, 1 << 20))
        print(f"standin: mapped /dev/shm/{name}", file=sys.stderr, flush=True)
    if args.start_delay:
        time.sleep(args.start_delay)
    try:
        asyncio.run(amain(args))
    except OSError as e:
        print(f"standin: cannot listen: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
