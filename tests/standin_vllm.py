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
GET /metrics answers vLLM 0.32's Prometheus text (tests/data/vllm-0.32.0-metrics.txt, captured
from a real instance, with this server's own numbers; a minimal built-in text where that file is
absent): running = completions in flight on that port, prompt/generation tokens and
request_success{finished_reason="length"} counted per port, http_requests_total by status.
  --metrics-fault KIND        what /metrics does: hang (never answers), drip (headers, then a
                              byte every 0.5 s), huge (200 MB of samples), huge-chunked (200 MB
                              of comments, no Content-Length), html, not-utf8,
                              nan (NaN/Inf values), empty, status-500, old-names (vLLM <= 0.10:
                              gpu_cache_usage_perc, gpu_prefix_cache_*), slow:S (answers after S s)
  --metrics-fault-ports LIST  only these ports (e.g. 8000-8009,8042); default every port
  --metrics-needs-key         /metrics too requires "Authorization: Bearer $VLLM_API_KEY" (vLLM
                              0.32 does not ask for it there; proves that clients send it)
  --metrics-busy              every /metrics answer shows new numbers, as under load: counters
                              grow, running/waiting/KV usage change (no two answers share them)
POST /standin/metrics (tests only; the port it reaches): {"set": {"running": 0, "waiting": 5,
"kv": 1.0, ...}} pins values, {"reset": true} zeroes the counters and takes a new start time
(a restart), {"fault": KIND or null} changes that port's /metrics fault.
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
from pathlib import Path


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
    p.add_argument("--metrics-fault", default="")
    p.add_argument("--metrics-fault-ports", default="")
    p.add_argument("--metrics-busy", action="store_true")
    p.add_argument("--metrics-needs-key", action="store_true")
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
        self.metrics_template = MetricsTemplate(self.name)
        self.fault_ports = _port_set(args.metrics_fault_ports)
        self.ports: dict[int, PortState] = {}

    def port(self, number: int) -> "PortState":
        state = self.ports.get(number)
        if state is None:
            fault = self.args.metrics_fault
            if self.fault_ports is not None and number not in self.fault_ports:
                fault = ""
            state = self.ports[number] = PortState(fault, busy=self.args.metrics_busy,
                                                   seed=number)
        return state

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
                         "usage": _usage(req)}
        return 404, {"error": f"no route {method} {path}"}

    async def metrics(self, here: "PortState", writer) -> bool:
        """Answer GET /metrics as this port's fault says; False: the connection is done."""
        kind, _, arg = here.fault.partition(":")
        if kind == "hang":
            await asyncio.sleep(3600)
            return False
        if kind == "slow":
            await asyncio.sleep(float(arg or 5))
        ctype = "text/plain; version=1.0.0; charset=utf-8"
        if kind == "drip":  # a server that trickles: the headers, then a byte now and then
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype.encode() +
                         b"\r\nContent-Length: 100000\r\n\r\n")
            for _ in range(100000):
                writer.write(b"#")
                await writer.drain()
                await asyncio.sleep(0.5)
            return False
        if kind == "huge-chunked":  # 200 MB of comment lines, chunked (no Content-Length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype.encode() +
                         b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            block = (b"# " + b"x" * 100 + b"\n") * 600
            for _ in range((200 << 20) // len(block)):
                writer.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return False
        if kind == "huge":  # 200 MB of samples, streamed
            line = (f'vllm:num_requests_running{{engine="0",model_name="{self.name}"}} 1.0\n'
                    ).encode() * 1000
            total = 200 << 20
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype.encode() +
                         f"\r\nContent-Length: {total}\r\n\r\n".encode())
            sent = 0
            while sent < total:
                chunk = line[:total - sent]
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
            return False
        status = 200
        if kind == "status-500":
            status, data, ctype = 500, b"Internal Server Error", "text/plain"
        elif kind == "html":
            data, ctype = b"<html><body><h1>Welcome to nginx!</h1></body></html>\n", "text/html"
        elif kind == "empty":
            data = b""
        else:
            if here.busy:
                here.advance()
            data = self.metrics_template.render(here, old_names=kind == "old-names").encode()
            if kind == "not-utf8":
                data = data.replace(b'vllm:num_requests_waiting{engine="0",model_name="',
                                    b'vllm:num_requests_waiting{engine="0",model_name="\xff\xfe', 1)
            elif kind == "nan":
                data = (data.replace(b"vllm:kv_cache_usage_perc{", b"vllm:kv_cache_usage_perc_x{")
                        + f'vllm:kv_cache_usage_perc{{engine="0",model_name="{self.name}"}} NaN\n'
                        f'vllm:num_requests_waiting{{engine="1",model_name="{self.name}"}} +Inf\n'
                        f'vllm:generation_tokens_total{{engine="1",model_name="{self.name}"}} -Inf\n'
                        .encode())
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: keep-alive\r\n\r\n".encode()
                     + data)
        await writer.drain()
        return True

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
                        busy = self.port(writer.get_extra_info("sockname")[1])
                        busy.running += 1
                        try:
                            await asyncio.sleep(self.args.delay + extra)
                        finally:
                            busy.running -= 1
                here = self.port(writer.get_extra_info("sockname")[1])
                refused = (self.args.metrics_needs_key and self.key and
                           headers.get("authorization") != f"Bearer {self.key}")
                if path.split("?")[0] == "/metrics" and method == "GET" and not refused:
                    if not await self.metrics(here, writer):
                        return
                    self.served += 1
                    continue
                if path.split("?")[0] == "/metrics" and refused:
                    status, payload = 401, {"error": "Unauthorized"}
                elif method == "POST" and path == "/standin/metrics":
                    here.control(json.loads(body or b"{}"))
                    status, payload = 200, {"ok": True}
                else:
                    here.running += 1
                    try:
                        status, payload = self.route(method, path.split("?")[0], headers, body)
                    finally:
                        here.running -= 1
                    here.count(method, path, status, payload)
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


def _usage(req: dict) -> dict:
    """What a completion "used": a token per word of the prompt, max_tokens generated."""
    prompt = req.get("prompt", req.get("messages", ""))
    prompt_tokens = max(1, len(str(prompt).split()))
    max_tokens = req.get("max_tokens")
    completion = max_tokens if isinstance(max_tokens, int) and 0 < max_tokens < 1 << 20 else 1
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _port_set(text: str):
    """"8000-8009,8042" -> a set of ports; "" -> None (every port)."""
    if not text:
        return None
    ports = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        ports.update(range(int(lo), int(hi or lo) + 1))
    return ports


class PortState:
    """One port's numbers, as one vLLM instance counts them."""

    def __init__(self, fault: str = "", busy: bool = False, seed: int = 0):
        self.fault = fault
        self.running = 0
        self.pinned: dict[str, float] = {}
        self.busy = busy
        self.tick = seed % 97  # --metrics-busy: a per-port phase
        self.reset()

    def advance(self) -> None:
        """--metrics-busy: what a loaded engine's numbers do between two scrapes."""
        self.tick += 1
        t = self.tick
        self.prompt_tokens += 500 + 37 * (t % 11)
        self.generation_tokens += 900 + 53 * (t % 7)
        self.success["length"] += 3 + t % 4
        self.success["stop"] += 1 + t % 2
        self.http["2xx"] = self.http.get("2xx", 0) + 4 + t % 5
        self.pinned.update(running=10 + t % 17, waiting=t % 5, kv=(t % 90) / 100 + 0.0123)

    def reset(self) -> None:
        self.start = time.time()
        self.prompt_tokens = self.generation_tokens = 0
        self.success = {"stop": 0, "length": 0, "abort": 0, "error": 0, "repetition": 0}
        self.http = {}

    def count(self, method: str, path: str, status: int, payload) -> None:
        if method != "POST" or not path.startswith("/v1/"):
            return
        key = f"{status // 100}xx"
        self.http[key] = self.http.get(key, 0) + 1
        if status == 200 and isinstance(payload, dict) and "usage" in payload:
            self.prompt_tokens += payload["usage"]["prompt_tokens"]
            self.generation_tokens += payload["usage"]["completion_tokens"]
            self.success["length"] += 1
        elif status >= 500:
            self.success["error"] += 1

    def control(self, order: dict) -> None:
        if order.get("reset"):
            self.reset()
        if "fault" in order:
            self.fault = order["fault"] or ""
        self.pinned.update(order.get("set") or {})

    def values(self) -> dict[str, float]:
        queries = self.prompt_tokens
        out = {"running": self.running, "waiting": 0, "kv": min(1.0, self.running / 256),
               "prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
               "prefix_queries": queries, "prefix_hits": queries // 4, "start": self.start,
               "rejected": 0, **{f"success_{k}": v for k, v in self.success.items()}}
        out.update(self.pinned)
        return out


_DATA = Path(__file__).resolve().parent / "data" / "vllm-0.32.0-metrics.txt"
# A sample line -> the value it shows (its labels decide between finished reasons).
_VALUE_OF = [
    ("vllm:num_requests_running{", "running"), ("vllm:num_requests_waiting{", "waiting"),
    ("vllm:kv_cache_usage_perc{", "kv"), ("vllm:prefix_cache_queries_total{", "prefix_queries"),
    ("vllm:prefix_cache_hits_total{", "prefix_hits"), ("vllm:prompt_tokens_total{", "prompt_tokens"),
    ("vllm:generation_tokens_total{", "generation_tokens"),
    ("process_start_time_seconds ", "start"),
] + [(f'vllm:request_success_total{{engine="0",finished_reason="{r}"', f"success_{r}")
     for r in ("stop", "length", "abort", "error", "repetition")]
def _minimal_text() -> str:
    """The key lines only, in vLLM 0.32's shape (when the captured text is not beside us)."""
    labels = 'engine="0",model_name="tiny"'
    lines = []
    for prefix, _key in _VALUE_OF:
        name = prefix.split("{")[0].strip()
        kind = "counter" if name.endswith("_total") else "gauge"
        lines.append(f"# TYPE {name} {kind}")
        if prefix.endswith("{"):
            lines.append(f"{prefix}{labels}}} 0.0")
        elif prefix.endswith(" "):
            lines.append(f"{prefix}0.0")
        else:  # request_success: the finished_reason is in the prefix
            lines.append(f'{prefix},model_name="tiny"}} 0.0')
    return "\n".join(lines) + "\n"


class MetricsTemplate:
    """vLLM's /metrics text with this server's numbers put in; rendered by a join, cheap
    enough for a thousand ports in one process."""

    def __init__(self, served_name: str):
        try:
            text = _DATA.read_text()
        except OSError:  # copied alone (packed environments): the key lines only
            text = _minimal_text()
        text = text.replace('model_name="tiny"', f'model_name="{_escape(served_name)}"')
        self.parts: list[str] = []  # literal, key, literal, key, ..., literal
        literal = []
        for line in text.splitlines(keepends=True):
            key = next((k for prefix, k in _VALUE_OF if line.startswith(prefix)), None)
            if line.startswith("http_requests_total{"):
                key = "http"
            if key is None:
                literal.append(line)
                continue
            if key == "http":
                if self.parts and self.parts[-1] == "http" and not literal:
                    continue  # one placeholder for the whole block
                self.parts += ["".join(literal), "http"]
                literal = []
                continue
            head = line.rsplit(" ", 1)[0] + " "
            self.parts += ["".join(literal) + head, key]
            literal = ["\n"]
        self.parts.append("".join(literal))
        if "http" not in self.parts:  # a text with no http block: add one at the end
            self.parts[-1:] = [self.parts[-1], "http", ""]
        self.http_head = ("http_requests_total{handler=\"/v1/completions\",method=\"POST\","
                          "status=\"")
        self.old: list[str] | None = None

    def render(self, port: "PortState", old_names: bool = False) -> str:
        values = port.values()
        parts = self.parts
        if old_names:
            if self.old is None:
                self.old = [p.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
                            .replace("vllm:prefix_cache_", "vllm:gpu_prefix_cache_")
                            for p in self.parts]
            parts = self.old
        out = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                out.append(part)
            elif part == "http":
                out.append("".join(f"{self.http_head}{k}\"}} {float(v)!r}\n"
                                   for k, v in sorted(port.http.items())))
            else:
                out.append(_number(values[part]))
        return "".join(out)


def _number(value) -> str:
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


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
