"""OpenAI batch files over a run's fleet, exactly once: `aegis batch RUN IN.jsonl -o OUT.jsonl`,
`run.batch(IN, OUT)`.

Input lines are `{"custom_id", "method": "POST", "url", "body"}` (the OpenAI batch format, as
`vllm run-batch` reads it); each goes to its model's router, or straight to the model's ready
instances, with at most `max_in_flight` requests per instance. Output lines are
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}`, in the
order answers arrive.

Exactly once: OUTPUT is only ever appended to, one whole line per answer (a group of lines per
write, fsync'd at least every second); a re-run with the same OUTPUT first reads it, drops a torn
last line (the write a SIGKILL cut short) and skips every custom_id already there. So whatever
stops a batch (an instance killed mid-request, this client killed, Ctrl-C, the run ending), run
it again and each custom_id ends up in OUTPUT once. A request may be *sent* twice (its answer
was lost with the process); it is never *written* twice.

Failures: connection errors, timeouts, 5xx, 408 and 429 are retried with backoff on another
target (`max_retries`); other 4xx are final. Lines that fail for good, and malformed input lines
(with their line number), go to the errors file (OUTPUT with .errors.jsonl); it holds this
invocation's failures only (rewritten at each start: every custom_id in it is absent from
OUTPUT, and a re-run tries it again). A 401/403 stops the batch: the run refused its own key.

Memory is bounded whatever the input's size: a reader thread hands lines over through a bounded
queue; what is kept per line is a 16-byte digest of its custom_id (duplicates and resumes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import hashlib
import json
import os
import random
import signal
import stat
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..run import ConfigError, Run, RunError

# The request URLs a line may name (POST): what vllm run-batch accepts, plus /v1/completions.
URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/score", "/v1/rerank")
TARGETS = ("auto", "router", "instances")
MAX_LINE_BYTES = 32 << 20  # a longer input line is reported and skipped unread
MAX_CUSTOM_ID = 4096  # characters
DEFAULT_MAX_IN_FLIGHT = 256  # per instance: vLLM's max_num_seqs (256 on most GPUs, 1024 on
#   H100/H200-class, 128 on CPU): enough to keep its batch full, the rest waits in its queue
DEFAULT_MAX_RETRIES = 5
DEFAULT_TIMEOUT = 600.0  # seconds per request
DEFAULT_WAIT_TIMEOUT = 300.0  # seconds a model may have nothing ready before the batch stops
REFRESH_INTERVAL = 2.0  # seconds between reads of the run's endpoints (Run.state())
JOB_REFRESH_INTERVAL = 5.0  # the same for a submitted run: each read also asks squeue/qstat
FSYNC_INTERVAL = 1.0  # seconds: OUTPUT is fsync'd at least this often while lines arrive
QUEUE_BYTES = 64 << 20  # input handed over but not yet sent, at most (plus one line)
SHOWN_INVALID = 5  # malformed lines named on stderr; the rest only in the errors file
RETRY_STATUS = (408, 429)  # 4xx that are retried like 5xx
_READ_BLOCK = 1 << 20


class BatchStopped(RunError):
    """The batch stopped before every line was sent (the run ended, nothing ready, the key
    refused, OUTPUT unwritable); OUTPUT holds what was answered: run again to resume."""

    def __init__(self, message: str, counts: BatchCounts | None = None):
        super().__init__(message)
        self.counts = counts


@dataclass
class BatchCounts:
    """What one `batch()` did. Every non-blank input line is exactly one of done, skipped,
    failed, invalid or not_sent."""

    lines: int = 0  # non-blank input lines read
    done: int = 0  # answered now (2xx), written to OUTPUT
    skipped: int = 0  # already in OUTPUT from an earlier run
    failed: int = 0  # requests that failed for good (errors file)
    invalid: int = 0  # malformed or duplicate lines (errors file, with line numbers)
    duplicates: int = 0  # of invalid: a custom_id seen on an earlier line
    not_sent: int = 0  # read but never sent or answered (stopped early)
    retries: int = 0  # attempts repeated after a retryable failure
    seconds: float = 0.0
    output: str = ""
    errors: str = ""
    stopped: str = ""  # why the batch stopped early ("" when it ran to the end)
    signal: int | None = None  # the signal that stopped it (SIGINT, SIGTERM)
    strict: bool = False  # stopped at a malformed line (--strict)

    @property
    def rate(self) -> float:
        """Lines answered per second."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        """Every input line is in OUTPUT."""
        return not (self.failed or self.invalid or self.not_sent or self.stopped)

    def summary(self) -> str:
        text = (f"{self.done} done, {self.skipped} skipped (already in the output), "
                f"{self.failed} failed, {self.invalid} invalid")
        if self.not_sent:
            text += f", {self.not_sent} not sent"
        text += f" in {self.seconds:.1f}s ({self.rate:.1f} req/s)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": round(self.rate, 3), "complete": self.complete}


# ------------------------------------------------------------------ files


def _digest(custom_id: str) -> bytes:
    return hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _describe(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _open_input(path: str) -> tuple[int, int | None]:
    """(fd, size or None for a stream). A FIFO or /dev/stdin streams; a directory is refused."""
    if path == "-":
        try:
            fd = os.dup(sys.stdin.fileno())
        except (AttributeError, ValueError, OSError):  # closed, or not a file (None, StringIO)
            raise ConfigError("input -: there is no standard input to read") from None
    else:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise ConfigError(f"input {path}: cannot open it ({err.strerror})") from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise ConfigError(f"input {path}: is a directory; give a JSONL file")
    return fd, (st.st_size if stat.S_ISREG(st.st_mode) else None)


def _open_append(path: str, what: str) -> int:
    """A regular file for appending (made if absent; a symlink to one is followed). FIFOs,
    devices (a link to /dev/null), directories are refused: answers must land somewhere that
    can be read back on a re-run."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o644)
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot write it ({err.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"{what} {path}: is {_describe(st.st_mode)}; give a regular file "
                          "(it is read back to resume)")
    os.set_blocking(fd, True)
    return fd


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _lock(fd: int, path: str, what: str = "output") -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"{what} {path}: another aegis batch is writing it") from None
    except OSError as err:  # a file system without flock: go on, unguarded
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise


def read_answered(fd: int, path: str) -> tuple[set[bytes], int]:
    """The digests of the custom_ids already in OUTPUT, and the bytes dropped: a last line
    without its newline (a write cut short) is truncated away, so it is answered again."""
    answered: set[bytes] = set()
    size = os.fstat(fd).st_size
    offset, lineno, buf = 0, 0, b""
    while offset < size:
        block = os.pread(fd, _READ_BLOCK, offset)
        if not block:
            break
        offset += len(block)
        lines = (buf + block).split(b"\n")
        buf = lines.pop()
        for raw in lines:
            lineno += 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                custom_id = record["custom_id"]
                if not isinstance(custom_id, str):
                    raise TypeError("custom_id is not a string")
            except (ValueError, KeyError, TypeError, RecursionError) as err:
                raise ConfigError(
                    f"output {path}: line {lineno} is not an answer this batch wrote "
                    f"({err.__class__.__name__}: {str(err)[:80]}); not appending to it "
                    "(give another -o)") from None
            answered.add(_digest(custom_id))
    dropped = len(buf)
    if dropped:  # torn tail
        os.ftruncate(fd, size - dropped)
        os.fsync(fd)
    return answered, dropped


# ------------------------------------------------------------------ reading the input


@dataclass
class _Line:
    lineno: int
    custom_id: str
    model: str
    url: str
    body: bytes
    nbytes: int


@dataclass
class _Invalid:
    lineno: int
    custom_id: str | None
    code: str
    message: str
    nbytes: int


def _lines(fd: int, max_line: int, stop: threading.Event):
    """(lineno, bytes or None if longer than max_line, size on disk) of every line; a long
    line is skipped without being held."""
    lineno, buf, skipping, size = 0, bytearray(), False, 0
    first = True
    while not stop.is_set():
        block = os.read(fd, _READ_BLOCK)
        if not block:
            break
        start = 0
        if first and block.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
            start, size = 3, 3
        first = False
        while True:
            nl = block.find(b"\n", start)
            piece = block[start:] if nl < 0 else block[start:nl]
            size += len(piece)
            if not skipping and len(buf) + len(piece) > max_line:
                skipping = True
                buf.clear()
            elif not skipping:
                buf += piece
            if nl < 0:
                break
            lineno += 1
            yield lineno, (None if skipping else bytes(buf)), size + 1
            buf.clear()
            skipping, size = False, 0
            start = nl + 1
        yield None  # a block was read: hand over what was found
    if (buf or skipping) and not stop.is_set():
        yield lineno + 1, (None if skipping else bytes(buf)), size


class _Checker:
    """Turns one input line into a _Line or an _Invalid. Pure but for the duplicate table."""

    def __init__(self, models: list[str], routerless: set[str], answered: set[bytes]):
        self.models = models
        self.routerless = routerless  # models with no router while --target router
        self.answered = answered
        self.seen: dict[bytes, int] = {}  # custom_id digest -> first line

    def check(self, lineno: int, raw: bytes | None, nbytes: int) -> _Line | _Invalid | int | None:
        """A _Line to send, an _Invalid, the size of a line already answered (int), or None
        for a blank line."""
        def bad(code: str, message: str, custom_id: str | None = None) -> _Invalid:
            return _Invalid(lineno, custom_id, code, message, nbytes)

        if raw is None:
            return bad("line_too_long", f"longer than {MAX_LINE_BYTES >> 20} MiB; not read")
        if not raw.strip():
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return bad("invalid_json", f"not UTF-8 text (byte {err.start})")
        try:
            record = json.loads(text)
        except RecursionError:
            return bad("invalid_json", "not JSON (nested too deeply)")
        except ValueError as err:
            return bad("invalid_json", f"not JSON ({err})")
        if not isinstance(record, dict):
            return bad("invalid_line", f"a JSON {type(record).__name__}, not an object with "
                                       "custom_id, method, url, body")
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str):
            return bad("invalid_line", "custom_id is missing" if custom_id is None else
                       f"custom_id must be a string, not {type(custom_id).__name__}")
        if not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            return bad("invalid_line", f"custom_id is {len(custom_id)} characters long; "
                       f"1 to {MAX_CUSTOM_ID} allowed", custom_id[:MAX_CUSTOM_ID] or None)
        digest = _digest(custom_id)
        first = self.seen.get(digest)
        if first is not None:
            return bad("duplicate_custom_id", f"custom_id already on line {first}; only the "
                       "first is processed", custom_id)
        self.seen[digest] = lineno
        if digest in self.answered:  # answered before: whatever the line says now
            return nbytes
        missing = [k for k in ("method", "url", "body") if k not in record]
        if missing:
            return bad("invalid_line", f"missing {', '.join(missing)}", custom_id)
        method, url, body = record["method"], record["url"], record["body"]
        if method != "POST":
            return bad("invalid_method", f"method {str(method)[:20]!r}: only POST", custom_id)
        if url not in URLS:
            return bad("invalid_url", f"url {str(url)[:80]!r}: one of {', '.join(URLS)}",
                       custom_id)
        if not isinstance(body, dict):
            return bad("invalid_body", f"body must be a JSON object, not "
                       f"{type(body).__name__ if body is not None else 'null'}", custom_id)
        if body.get("stream"):
            return bad("invalid_body", "body.stream: streaming is not supported in a batch",
                       custom_id)
        model = body.get("model")
        if model is None and len(self.models) == 1:
            model = self.models[0]
        if not isinstance(model, str) or model not in self.models:
            what = "body.model is missing" if model is None else \
                f"body.model {str(model)[:80]!r} is not served by this run"
            return bad("unknown_model", f"{what} (it serves {', '.join(self.models)})",
                       custom_id)
        if model in self.routerless:
            return bad("no_router", f"model {model!r} has no router in this run (--target "
                       "router); use --target instances", custom_id)
        try:
            data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:  # a lone surrogate escape: keep it escaped
            data = json.dumps(body, separators=(",", ":")).encode()
        return _Line(lineno, custom_id, model, url, data, nbytes)


def _reader(fd: int, checker: _Checker, strict: bool, loop: asyncio.AbstractEventLoop,
            queue: asyncio.Queue, budget: _Budget, stop: threading.Event) -> None:
    """Thread: reads and checks lines, hands them over in groups through `queue` (bounded in
    lines by its size and in bytes by `budget`); ends with None, or an exception."""
    def put(item) -> bool:
        try:
            future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        except RuntimeError:  # the loop is gone
            return False
        while True:
            try:
                future.result(timeout=0.5)
                return True
            except concurrent.futures.TimeoutError:
                if stop.is_set():
                    future.cancel()
                    return False
            except concurrent.futures.CancelledError:
                return False

    group: list = []
    try:
        for found in _lines(fd, MAX_LINE_BYTES, stop):
            if found is not None:
                item = checker.check(*found)
                if item is None:
                    continue
                if isinstance(item, _Line):
                    budget.take(len(item.body), stop)
                group.append(item)
                if isinstance(item, _Invalid) and strict:
                    break
            if group and (found is None or len(group) >= 256):
                if not put(group):
                    return
                group = []
        if group:
            put(group)
        put(None)
    except BaseException as err:  # noqa: BLE001 (handed to the loop, which raises it)
        put(err)


class _Budget:
    """Bytes of request bodies read but not yet answered, bounded (blocks the reader)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def take(self, n: int, stop: threading.Event) -> None:
        with self.cond:
            while self.used and self.used + n > self.limit and not stop.is_set():
                self.cond.wait(0.5)
            self.used += n

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


# ------------------------------------------------------------------ where requests go


@dataclass
class _Target:
    url: str  # OpenAI base URL (.../v1)
    capacity: int
    in_flight: int = 0
    active: bool = True  # listed by the run now
    down_until: float = 0.0  # not chosen before this (monotonic), after failures
    strikes: int = 0  # retryable failures since its last answer
    downs: int = 0  # times set aside since its last answer (the pause doubles)


@dataclass
class _Pool:
    """One model's targets: its router, or its ready instances."""

    targets: dict[str, _Target] = field(default_factory=dict)
    retry_waiting: int = 0  # retries waiting for a slot go before new lines
    last_ok: float = field(default_factory=time.monotonic)  # its last answer (or the start)

    def free(self, now: float, avoid: str | None) -> _Target | None:
        usable = [t for t in self.targets.values()
                  if t.active and t.in_flight < t.capacity and t.down_until <= now]
        if len(usable) > 1 and avoid is not None:
            usable = [t for t in usable if t.url != avoid] or usable
        return min(usable, key=lambda t: t.in_flight / t.capacity) if usable else None


def _plan_targets(status, models: list[str], target: str, per_instance: int,
                  ) -> dict[str, dict[str, int]]:
    """model -> {base URL: requests in flight allowed} from a run's Status. Pure."""
    out: dict[str, dict[str, int]] = {}
    for model in models:
        ready = [] if status.gone else [e.url for e in status.instances
                                        if e.model == model and e.state == "ready"]
        router = None if status.gone else next(
            (r.url for r in status.routers if r.model == model and r.state == "ready"), None)
        if target == "router" or (target == "auto" and router):
            out[model] = {router: per_instance * max(1, len(ready))} if router else {}
        else:
            out[model] = {url: per_instance for url in ready}
    return out


def _origin(base_url: str) -> str:
    return base_url[:-3] if base_url.endswith("/v1") else base_url.rstrip("/")


# ------------------------------------------------------------------ progress


class _Progress:
    """A tqdm bar on a terminal, else a plain line every `interval` seconds (stderr)."""

    def __init__(self, enabled: bool, total_bytes: int | None, interval: float,
                 stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.total = total_bytes
        self.interval = interval
        self.bar = None
        self.window: deque[tuple[float, int]] = deque()  # (time, done+failed) samples
        self.last_line = time.monotonic()  # the first plain line after `interval`
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines then
                tqdm = None
            if tqdm is not None:
                class Bar(tqdm):  # our counts, rate and ETA where tqdm puts its own
                    status = ""

                    @property
                    def format_dict(self):
                        return {**super().format_dict, "status": self.status}

                self.bar = Bar(total=total_bytes, file=self.stream, unit="B", unit_scale=True,
                               desc="aegis batch", dynamic_ncols=True, leave=True,
                               bar_format="{desc}: {percentage:3.0f}%|{bar}| {status}"
                               if total_bytes else "{desc}: {status}")

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = int(seconds)
        return (f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
                if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}")

    def text(self, counts: BatchCounts, resolved_bytes: int, now: float) -> str:
        """'done 120, skipped 0, failed 1, invalid 0 | 45.2 req/s | ETA 0:12'. The rate is
        of the last 30 s (answers, not skips); the ETA from the bytes of input left."""
        answered = counts.done + counts.failed
        self.window.append((now, answered))
        while len(self.window) > 2 and now - self.window[0][0] > 30:
            self.window.popleft()
        t0, a0 = self.window[0]
        rate = (answered - a0) / (now - t0) if now > t0 else 0.0
        text = (f"done {counts.done}, skipped {counts.skipped}, failed {counts.failed}, "
                f"invalid {counts.invalid} | {rate:.1f} req/s")
        resolved = counts.done + counts.skipped + counts.failed + counts.invalid
        if self.total and rate > 0 and resolved:
            # the bytes left as lines, at the size of the lines resolved so far
            lines_left = max(0, self.total - resolved_bytes) / max(1.0, resolved_bytes / resolved)
            text += f" | ETA {self._clock(lines_left / rate)}"
        return text

    def update(self, counts: BatchCounts, resolved_bytes: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        text = self.text(counts, resolved_bytes, now)
        if self.bar is not None:
            self.bar.n = min(resolved_bytes, self.total or resolved_bytes)
            self.bar.status = text
            self.bar.refresh()
        elif force or now - self.last_line >= self.interval:
            self.last_line = now
            share = (f"{100 * resolved_bytes / self.total:.0f}% of input, "
                     if self.total else "")
            print(f"aegis: batch: {share}{text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def note(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)


# ------------------------------------------------------------------ the batch


class _Batch:
    def __init__(self, run: Run, options: dict[str, Any]):
        self.run = run
        self.o = options
        self.counts = BatchCounts()
        self.pools: dict[str, _Pool] = {}
        self._wake: asyncio.Future | None = None  # done when a slot frees or targets change
        self.closing = False  # the writer's last round
        self.out_lines: list[bytes] = []
        self.err_lines: list[bytes] = []
        self.resolved_bytes = 0
        self.shown_invalid = 0
        self.tasks: set[asyncio.Task] = set()
        self.fatal: BaseException | None = None
        self.stop_reading = threading.Event()
        self.id_prefix, self.ids = uuid.uuid4().hex[:16], 0  # ids unique across invocations

    # -- bookkeeping
    def _resolve(self, nbytes: int) -> None:
        self.resolved_bytes += nbytes

    def _write(self, to_output: bool, record: dict[str, Any]) -> None:
        try:
            line = json.dumps(record, ensure_ascii=False)
            data = (line + "\n").encode()
        except UnicodeEncodeError:
            data = (json.dumps(record) + "\n").encode()
        (self.out_lines if to_output else self.err_lines).append(data)

    def _new_id(self) -> str:
        self.ids += 1
        return f"aegis-{self.id_prefix}-{self.ids}"

    def _error_record(self, custom_id, lineno, code, message, response=None,
                      attempts: int | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {"code": code, "message": message, "line": lineno}
        if attempts is not None:
            error["attempts"] = attempts
        return {"id": self._new_id(), "custom_id": custom_id,
                "response": response, "error": error}

    def invalid(self, item: _Invalid) -> None:
        self.counts.invalid += 1
        self.counts.duplicates += item.code == "duplicate_custom_id"
        self._resolve(item.nbytes)
        self._write(False, self._error_record(item.custom_id, item.lineno, item.code,
                                              item.message))
        if self.shown_invalid < SHOWN_INVALID or self.o["strict"]:
            self.progress.note(f"aegis: batch: input line {item.lineno}: {item.message}")
        elif self.shown_invalid == SHOWN_INVALID:
            self.progress.note(f"aegis: batch: more malformed lines: see {self.o['errors']}")
        self.shown_invalid += 1

    # -- the run's endpoints
    async def refresh(self) -> None:
        status = await asyncio.to_thread(self.run.state)
        plan = _plan_targets(status, self.models, self.o["target"], self.o["max_in_flight"])
        for model, wanted in plan.items():
            pool = self.pools.setdefault(model, _Pool())
            for url, capacity in wanted.items():
                t = pool.targets.get(url)
                if t is None:
                    pool.targets[url] = _Target(url, capacity)
                else:
                    t.capacity, t.active = capacity, True
            for url, t in list(pool.targets.items()):
                if url not in wanted:
                    t.active = False
                    if not t.in_flight:
                        del pool.targets[url]
        self._notify()
        if status.gone:
            raise BatchStopped(f"the run {status.phase}: {status.reason}")

    async def refresher(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.o["refresh_interval"])
            try:
                await self.refresh()
                failures = 0
            except BatchStopped:
                raise
            except Exception as err:  # noqa: BLE001 (a transient read: keep the last view)
                failures += 1
                if failures == 1:
                    self.progress.note(f"aegis: batch: warning: cannot read the run's "
                                       f"endpoints ({err}); using the last ones")

    # -- slots
    # (not asyncio.Condition + wait_for: on 3.11 a wait_for that times out as its task is
    # cancelled swallows the cancellation, and the batch never ended)
    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        self._wake = None

    async def _changed(self, timeout: float) -> None:
        if self._wake is None:
            self._wake = asyncio.get_running_loop().create_future()
        await asyncio.wait([self._wake], timeout=timeout)

    async def acquire(self, model: str, avoid: str | None = None, retry: bool = False
                      ) -> _Target:
        pool = self.pools.setdefault(model, _Pool())
        if retry:
            pool.retry_waiting += 1
        try:
            while True:
                now = time.monotonic()
                if retry or not pool.retry_waiting:
                    target = pool.free(now, avoid)
                    if target is not None:
                        target.in_flight += 1
                        return target
                # nothing listed, or all set aside as failing: how long since one answered
                if not any(t.active and t.down_until <= now for t in pool.targets.values()) \
                        and now - pool.last_ok > self.o["wait_timeout"]:
                    raise BatchStopped(
                        f"no ready {'router' if self.o['target'] == 'router' else 'instance'}"
                        f" of {model!r} answered for {self.o['wait_timeout']:g}s (aegis "
                        f"status {self.run.run_dir})")
                downs = [t.down_until - now for t in pool.targets.values()
                         if t.active and t.down_until > now]
                await self._changed(max(0.01, min([1.0] + downs)))
        finally:
            if retry:
                pool.retry_waiting -= 1

    async def release(self, model: str, target: _Target) -> None:
        target.in_flight -= 1
        pool = self.pools.get(model)
        if pool and not target.active and not target.in_flight:
            pool.targets.pop(target.url, None)
        self._notify()

    # -- one line
    async def send(self, line: _Line, target: _Target) -> None:
        attempts, avoid = 0, None
        try:
            while True:
                attempts += 1
                outcome = await self._attempt(line, target)
                await self.release(line.model, target)
                if outcome is None:
                    self.counts.done += 1
                    self._resolve(line.nbytes)
                    return
                retryable, code, message, response = outcome
                if retryable:
                    self._strike(target, code)
                if not retryable or attempts > self.o["max_retries"]:
                    self.counts.failed += 1
                    self._resolve(line.nbytes)
                    self._write(False, self._error_record(
                        line.custom_id, line.lineno, code, message, response, attempts))
                    return
                self.counts.retries += 1
                backoff = min(10.0, 0.25 * 2 ** (attempts - 1)) * (0.5 + random.random())
                await asyncio.sleep(backoff)
                avoid = target.url
                target = await self.acquire(line.model, avoid=avoid, retry=True)
        finally:  # (a line cancelled mid-request is not resolved: it is not sent)
            self.budget.give(len(line.body))

    @staticmethod
    def _strike(target: _Target, code: str) -> None:
        """A target that cannot be reached (or timed out) is set aside at once, one that
        answers 5xx after 3 in a row; for 1 s, doubling up to 30 s while it keeps failing.
        Failures of requests in flight together count once."""
        target.strikes += 1
        now = time.monotonic()
        if (code in ("connection_error", "timeout") or target.strikes >= 3) and \
                now >= target.down_until:
            target.down_until = now + min(30.0, 0.5 * 2 ** (target.downs + 1))
            target.downs += 1

    async def _attempt(self, line: _Line, target: _Target):
        """None when answered (written); else (retryable, code, message, response)."""
        import aiohttp

        url = _origin(target.url) + line.url
        try:
            async with self.session.post(url, data=line.body) as reply:
                raw = await reply.read()
                status = reply.status
                request_id = reply.headers.get("x-request-id")
        except asyncio.TimeoutError:
            return True, "timeout", f"no answer from {target.url} within " \
                                    f"{self.o['timeout']:g}s", None
        except (aiohttp.ClientError, OSError) as err:
            return True, "connection_error", f"{target.url}: {err.__class__.__name__}: " \
                                             f"{str(err)[:200]}", None
        text = None
        try:
            text = raw.decode("utf-8")
            body: Any = json.loads(text)
        except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
            body = raw.decode("utf-8", "replace")[:2000]
        if isinstance(body, dict) and request_id is None:
            request_id = body.get("id")
        request_id = request_id if isinstance(request_id, str) else self._new_id()
        if 200 <= status < 300:
            if not isinstance(body, (dict, list)):
                return True, "invalid_response", f"{target.url} answered {status} with a " \
                                                 "body that is not JSON", None
            target.strikes = target.downs = 0
            self.pools[line.model].last_ok = time.monotonic()
            if "\n" not in text and "\r" not in text:  # vLLM's compact JSON: kept as it came
                self.out_lines.append(
                    f'{{"id": "{self._new_id()}", "custom_id": {json.dumps(line.custom_id)}, '
                    f'"response": {{"status_code": {status}, "request_id": '
                    f'{json.dumps(request_id)}, "body": {text.strip()}}}, "error": null}}\n'
                    .encode())
            else:
                self._write(True, {"id": self._new_id(), "custom_id": line.custom_id,
                                   "response": {"status_code": status, "request_id": request_id,
                                                "body": body}, "error": None})
            return None
        response = {"status_code": status, "request_id": request_id, "body": body}
        if status in (401, 403):
            self.fatal = BatchStopped(f"{target.url} refused the run's key ({status}): is "
                                      f"this still the run that made {self.run.run_dir}?")
            self.main_task.cancel()
        message = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(message, dict):
            message = message.get("message", message)
        text = f"{target.url} answered {status}: {str(message)[:500]}"
        return (status >= 500 or status in RETRY_STATUS), f"http_{status}", text, response

    # -- writing
    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    async def writer(self) -> None:
        """Appends what was answered every 50 ms (one write per file), fsyncs OUTPUT at
        least every FSYNC_INTERVAL; ends after a last round once `closing` is set."""
        last_sync = time.monotonic()
        dirty = False
        while not self.closing:
            await asyncio.sleep(0.05)
            dirty |= await self.flush(sync=False)
            if dirty and time.monotonic() - last_sync >= FSYNC_INTERVAL:
                await asyncio.to_thread(os.fsync, self.out_fd)
                last_sync, dirty = time.monotonic(), False

    async def flush(self, sync: bool) -> bool:
        out, self.out_lines = self.out_lines, []
        err, self.err_lines = self.err_lines, []
        try:
            if out:
                await asyncio.to_thread(self._write_all, self.out_fd, b"".join(out))
            if err:
                await asyncio.to_thread(self._write_all, self.err_fd, b"".join(err))
            if sync:
                await asyncio.to_thread(os.fsync, self.out_fd)
                await asyncio.to_thread(os.fsync, self.err_fd)
        except OSError as e:
            raise BatchStopped(f"cannot write {self.o['output']}: {e.strerror}") from None
        return bool(out)

    async def ticker(self) -> None:
        while True:
            self.progress.update(self.counts, self.resolved_bytes)
            await asyncio.sleep(0.5 if self.progress.bar is not None else
                                min(1.0, self.o["progress_interval"]))

    # -- the whole
    async def main(self, in_fd: int, total: int | None) -> None:
        import aiohttp

        self.main_task = asyncio.current_task()
        self.models = self.run.models()
        await self.refresh()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=4)
        self.budget = _Budget(QUEUE_BYTES)
        routerless = set()
        if self.o["target"] == "router":
            routerless = set(self.models) - set(self.run.config.routed_models)
        checker = _Checker(self.models, routerless, self.o["answered"])
        reader = threading.Thread(target=_reader, name="aegis-batch-reader", daemon=True,
                                  args=(in_fd, checker, self.o["strict"], loop, queue,
                                        self.budget, self.stop_reading))
        timeout = aiohttp.ClientTimeout(total=self.o["timeout"], sock_connect=30)
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        headers = {"Authorization": f"Bearer {self.o['key']}",
                   "Content-Type": "application/json"}
        helpers = []
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=headers,
                                         trust_env=False) as self.session:
            writer = asyncio.create_task(self.writer())
            helpers = [writer] + [asyncio.create_task(c) for c in
                                  (self.refresher(), self.ticker())]
            reader.start()
            try:
                await self._dispatch(queue, helpers)
            finally:
                self.stop_reading.set()
                for task in self.tasks:
                    task.cancel()
                await asyncio.gather(*self.tasks, return_exceptions=True)
                self.closing = True
                for task in helpers[1:]:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
                await self.flush(sync=True)
            if self.counts.strict:
                raise ConfigError(f"input line {self.strict_line}: {self.strict_message} "
                                  "(--strict: stopped before sending anything further)")

    async def _dispatch(self, queue: asyncio.Queue, helpers: list[asyncio.Task]) -> None:
        def check_helpers():
            for task in helpers:
                if task.done() and not task.cancelled() and task.exception():
                    raise task.exception()

        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait([getter, *helpers], return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                check_helpers()
                continue
            group = getter.result()
            if group is None:
                break
            if isinstance(group, BaseException):
                if isinstance(group, OSError):
                    raise BatchStopped(f"cannot read {self.o['input']}: {group.strerror}")
                raise group
            for item in group:
                if isinstance(item, int):
                    self.counts.lines += 1
                    self.counts.skipped += 1
                    self._resolve(item)
                    continue
                self.counts.lines += 1
                if isinstance(item, _Invalid):
                    self.invalid(item)
                    if self.o["strict"]:
                        self.counts.strict = True
                        self.strict_line, self.strict_message = item.lineno, item.message
                        self.stop_reading.set()  # what is queued is never sent
                        await self._drain()
                        return
                    continue
                target = await self._slot(item.model, helpers)
                task = asyncio.create_task(self.send(item, target))
                self.tasks.add(task)
                task.add_done_callback(self._task_done)
            check_helpers()
        await self._drain(helpers)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.fatal is None:
            self.fatal = task.exception()
            self.main_task.cancel()

    async def _slot(self, model: str, helpers) -> _Target:
        """A free slot for a new line; meanwhile a failed helper (refresh: the run ended)
        ends the batch."""
        acquire = asyncio.ensure_future(self.acquire(model))
        try:
            while True:
                done, _ = await asyncio.wait([acquire, *helpers],
                                             return_when=asyncio.FIRST_COMPLETED)
                if acquire in done:
                    return acquire.result()
                for task in helpers:
                    if task in done and task.exception():
                        raise task.exception()
        finally:
            if not acquire.done():
                acquire.cancel()

    async def _drain(self, helpers=()) -> None:
        while self.tasks:
            pending = list(self.tasks)
            done, _ = await asyncio.wait([*pending, *helpers],
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in helpers:
                if task in done and task.exception():
                    raise task.exception()



def batch(run: Run, input: str | os.PathLike, output: str | os.PathLike, *,
          errors: str | os.PathLike | None = None, target: str = "auto",
          max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, max_retries: int = DEFAULT_MAX_RETRIES,
          timeout: float = DEFAULT_TIMEOUT, wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
          strict: bool = False, progress: bool = False, progress_interval: float = 10.0,
          refresh_interval: float | None = None, handle_signals: bool = False,
          on_start: Callable[[str], None] | None = None) -> BatchCounts:
    """Send every line of `input` (OpenAI batch JSONL) to the run; append the answers to
    `output`, skipping custom_ids already there. Returns the counts.

    Raises ConfigError for bad input found before anything is sent (options, files, and with
    `strict` the first malformed line), RunError when nothing of the run is ready, and
    BatchStopped (a RunError, with `.counts`) when it stops early (the run ended, no ready
    instance for `wait_timeout` s, the key refused). With `handle_signals`, SIGINT and SIGTERM
    stop it cleanly: counts.signal says which. `on_start(message)` hears what resumes."""
    input, output = os.fspath(input), os.fspath(output)
    errors = os.fspath(errors) if errors is not None else _errors_path(output)
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r}: one of {', '.join(TARGETS)}")
    for name, value, low in (("max_in_flight", max_in_flight, 1), ("max_retries", max_retries, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"--{name.replace('_', '-')} {value!r}: an integer >= {low}")
    if refresh_interval is None:
        refresh_interval = REFRESH_INTERVAL if run.backend is None else JOB_REFRESH_INTERVAL
    for name, value in (("timeout", timeout), ("wait_timeout", wait_timeout),
                        ("refresh_interval", refresh_interval)):
        if not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')} {value!r}: must be > 0")
    models = run.models()
    if target == "router" and not set(models) & set(run.config.routed_models):
        raise ConfigError("--target router: this run has no router (router off, or every "
                          "model has one instance); use --target instances")
    in_fd, total = _open_input(input)
    fds = [in_fd]
    try:
        out_fd = _open_append(output, "output")
        fds.append(out_fd)
        if _same_file(in_fd, out_fd):
            raise ConfigError(f"output {output}: is the input file")
        _lock(out_fd, output)
        err_fd = _open_append(errors, "errors file")
        fds.append(err_fd)
        if _same_file(err_fd, out_fd) or _same_file(err_fd, in_fd):
            raise ConfigError(f"errors file {errors}: is the "
                              f"{'output' if _same_file(err_fd, out_fd) else 'input'} file")
        _lock(err_fd, errors, "errors file")
        answered, dropped = read_answered(out_fd, output)
        key = run.api_key()
        status = run.state()
        if status.gone:
            raise RunError(f"the run {status.phase}: {status.reason}")
        if status.ready == 0:
            hint = (f"; wait for it: aegis wait {run.run_dir}"
                    if status.phase in ("pending", "starting") else "")
            raise RunError(f"nothing of this run is ready ({status.phase}: {status.reason})"
                           + hint)
        os.ftruncate(err_fd, 0)  # this invocation's failures only
        if on_start is not None and (answered or dropped):
            on_start(f"resuming: {len(answered)} answer(s) already in {output}"
                     + (f"; dropped a torn last line ({dropped} bytes)" if dropped else ""))
        options = dict(input=input, output=output, errors=errors, target=target,
                       max_in_flight=max_in_flight, max_retries=max_retries, timeout=timeout,
                       wait_timeout=wait_timeout, strict=strict, key=key, answered=answered,
                       refresh_interval=refresh_interval, progress_interval=progress_interval)
        job = _Batch(run, options)
        job.counts.output, job.counts.errors = output, errors
        job.out_fd, job.err_fd = out_fd, err_fd
        job.progress = _Progress(progress, total, progress_interval)
        started = time.monotonic()
        try:
            _run_loop(job, in_fd, total, handle_signals)
        finally:
            job.counts.seconds = time.monotonic() - started
            if job.progress.bar is not None:
                job.progress.update(job.counts, job.resolved_bytes)
            job.progress.close()
            if os.fstat(err_fd).st_size == 0:
                _unlink_quietly(errors)
        return job.counts
    finally:
        for fd in fds:
            os.close(fd)


def _run_loop(job: _Batch, in_fd: int, total: int | None, handle_signals: bool) -> None:
    """Runs the batch; a stop (fatal error or signal) is recorded in job.counts."""
    got: list[int] = []

    try:
        asyncio.get_running_loop()
        in_loop = True  # called from async code (a Jupyter cell): run in a thread of our own
    except RuntimeError:
        in_loop = False
    handle_signals = handle_signals and not in_loop and \
        threading.current_thread() is threading.main_thread()

    async def guarded():
        job.loop, task = asyncio.get_running_loop(), asyncio.current_task()
        if handle_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                job.loop.add_signal_handler(signum,
                                            lambda s=signum: (got.append(s), task.cancel()))
        await job.main(in_fd, total)

    try:
        if in_loop:
            _in_thread(job, guarded)
        else:
            asyncio.run(guarded())
    except (asyncio.CancelledError, KeyboardInterrupt):
        if job.fatal is None and not got:
            raise
    except BatchStopped as err:
        job.fatal = err
    counts = job.counts
    # every line read and neither resolved nor counted is not sent
    resolved = counts.done + counts.skipped + counts.failed + counts.invalid + counts.not_sent
    counts.not_sent += max(0, counts.lines - resolved)
    if got:
        counts.signal = got[0]
        counts.stopped = f"stopped by {signal.Signals(got[0]).name}"
    elif job.fatal is not None:
        counts.stopped = str(job.fatal)
        if isinstance(job.fatal, BatchStopped):
            job.fatal.counts = counts
            raise job.fatal
        raise job.fatal


def _in_thread(job: _Batch, make) -> None:
    """asyncio.run(make()) in another thread, waited for; Ctrl-C here cancels it there."""
    box: dict[str, BaseException] = {}

    def runner():
        try:
            asyncio.run(make())
        except BaseException as err:  # noqa: BLE001 (raised again in the caller's thread)
            box["error"] = err

    thread = threading.Thread(target=runner, name="aegis-batch", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        if getattr(job, "main_task", None) is not None:
            job.loop.call_soon_threadsafe(job.main_task.cancel)
        thread.join()
        raise
    if "error" in box:
        raise box["error"]


def _unlink_quietly(path: str) -> None:
    try:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            os.unlink(path)
    except OSError:
        pass


def _errors_path(output: str) -> str:
    """OUTPUT with .errors.jsonl: out.jsonl -> out.errors.jsonl."""
    base = output[:-len(".jsonl")] if output.endswith(".jsonl") else output
    return base + ".errors.jsonl"
