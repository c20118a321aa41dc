"""What a run's fleet is doing now: `aegis metrics RUN [--watch S] [--json]`, `run.metrics()`.

One scrape reads every serving instance's `/metrics` (vLLM's Prometheus text) and, where this
host can reach them, the routers' exporters, all at once: at most `concurrency` requests in
flight, each given `timeout` seconds from its start (connection, headers and body; a server that
trickles its answer is cut off like one that never answers). An instance that does not answer,
answers an error or something that is not vLLM's Prometheus text is flagged with the reason,
and the others are reported as usual.

Per instance: requests running and waiting, KV-cache usage, prompt and generation tokens (the
counters, and per second between two scrapes), finished requests by reason, failures, the
prefix-cache hit rate. Per model: the fleet's totals. Flags: an instance that does not answer,
a full KV cache, an instance serving nothing while others of its model queue, counters that
went backwards (the server restarted), values that are not numbers (docs/metrics.md).

The text is parsed with prometheus_client's parser. Parsing all of vLLM's /metrics (~50 KB,
~600 lines, histograms included) costs 8-24 ms of CPU here, 8-24 s for 1,000 instances; so
the sample lines of the metrics read here are picked out as the text arrives (Picker:
bytes.find, ~0.15 ms) and only those (~17 lines) go through the parser, each distinct line
once (a line seen before, in another instance's text or the last scrape's, is not parsed
again). What a server can make the client hold is bounded (Picker).

Every request carries the run's key (vLLM 0.32 does not ask for it on /metrics, but every
request to a run's servers carries it: docs/security.md); no proxy variable is followed.

    run = aegis.Run.open(RUN)
    first = run.metrics()
    time.sleep(10)
    now = run.metrics(previous=first)      # rates over those 10 s
    for m in now.models:
        print(m.model, m.running, m.waiting, m.generation_tokens_per_s)
"""

from __future__ import annotations

import asyncio
import math
import resource
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from ..pids import this_host
from ..run import ConfigError, Run, RunError, Status
from ..runfiles import SERVING_STATES

DEFAULT_TIMEOUT = 2.0  # seconds per /metrics: what the launcher gives /health before it
#                        calls an instance unhealthy
DEFAULT_CONCURRENCY = 256  # instances asked at once (a socket each, never more than the
#   open-files limit allows); an instance's timeout starts when its turn comes. Higher makes a
#   hung instance cost the scrape exactly its timeout, but on a busy client (or a busy
#   server) every request waits longer for the CPU, and a healthy one may time out
MAX_BODY = 16 << 20  # a /metrics answer larger than this is refused (vLLM's is ~50 KB)
# What is held per instance while its text arrives (Picker): ~0.5 MB at most, so a thousand
# hostile servers cannot hold more than ~0.5 GB; vLLM's whole text is one block
PICK_BLOCK = 128 << 10  # text gathered before its lines are picked
MAX_LINE = 64 << 10  # a longer line of a metric read here refuses the text (others: skipped)
MAX_SAMPLES = 2000  # sample lines of the metrics read here (vLLM's: ~20 per engine)
MAX_PICKED = 256 << 10  # bytes of them (vLLM's: ~2 KB per engine)
HEAD = 64 << 10  # the text's beginning, kept to say what it was
KV_FULL = 0.99  # KV-cache usage at or above this is flagged as full
JOB_REFRESH_INTERVAL = 5.0  # --watch on a submitted run: its endpoints (and squeue/qstat)
#                             are read at most this often
SCHEMA = 1  # docs/schemas/metrics.schema.json

# What is read, under each name vLLM has used (newest first). Counters are summed over their
# samples (engines, label values), gauges too, except KV-cache usage: the fullest engine's.
RUNNING = ("vllm:num_requests_running",)
WAITING = ("vllm:num_requests_waiting",)
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # the latter <= 0.10
PROMPT = ("vllm:prompt_tokens_total",)
GENERATION = ("vllm:generation_tokens_total",)
FINISHED = ("vllm:request_success_total",)  # by finished_reason: stop length abort error ...
PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
PREFIX_HIT_RATE = ("vllm:gpu_prefix_cache_hit_rate",)  # vLLM's V0 engine: a gauge, no counters
REJECTED = ("vllm:admission_rejections_total",)  # refused by a queue limit
HTTP = ("http_requests_total",)  # by status: 2xx 4xx 5xx (vLLM's API server, prometheus-
#                                  fastapi-instrumentator)
STARTED = ("process_start_time_seconds",)  # the API server's start: a new one is a restart
NOT_FAILURES = ("abort", "error")  # finished reasons that are no success
# each group: its names in order of preference (only the first that is there is read); the
# groups in the order vLLM writes them, so that one pass over the text finds them all
INSTANCE_NAMES = (STARTED, RUNNING, WAITING, KV_USAGE, PREFIX_QUERIES + PREFIX_HIT_RATE,
                  PREFIX_HITS, PROMPT, GENERATION, FINISHED, REJECTED, HTTP)

# vllm-router's exporter (metrics-exporter-prometheus): counters appear once they count.
R_REQUESTS = ("vllm_router_requests_total",)
R_ERRORS = ("vllm_router_request_errors_total",)
R_RETRIES = ("vllm_router_retries_total",)
R_ACTIVE = ("vllm_router_active_workers",)
R_HEALTH = ("vllm_router_worker_health",)
R_PROCESSED = ("vllm_router_processed_requests_total",)  # by worker
ROUTER_NAMES = (R_REQUESTS, R_ERRORS, R_RETRIES, R_ACTIVE, R_HEALTH, R_PROCESSED)

# Scrape outcomes (InstanceMetrics.scrape, RouterMetrics.scrape)
OK, TIMEOUT, UNREACHABLE, HTTP_ERROR, BAD_METRICS = ("ok", "timeout", "unreachable",
                                                    "http_error", "bad_metrics")


_INSTANCE_LINES = tuple(tuple(n.encode() for n in group) for group in INSTANCE_NAMES)
_ROUTER_LINES = tuple(tuple(n.encode() for n in group) for group in ROUTER_NAMES)
_AFTER_NAME = b"{ \t"


def _sample_at(body: bytes, at: int, name: bytes) -> bool:
    """A sample line of `name` starts at `at`: at a line's start, the name, then `{` or a
    space (not a longer name, not a comment)."""
    after = at + len(name)
    return after < len(body) and (at == 0 or body[at - 1] == 10) and \
        body[after] in _AFTER_NAME and body.startswith(name, at)


def select_lines(body: bytes, groups: tuple[tuple[bytes, ...], ...]) -> list[bytes]:
    """The sample lines of these metrics, as they are: of each group of names, the lines of
    the first name that has any (a family's samples are one block of lines, as the format
    requires; a second block of the same name is not read). ~0.1 ms for vLLM's 50 KB, where a
    regular expression over the text took 0.45."""
    picker = Picker(groups)
    picker.feed(body)
    return picker.lines()


def _select(body: bytes, name: bytes, out: list[bytes], start: int = 0,
            stop: int | None = None) -> int:
    """Appends the first block of sample lines of `name` in body[start:stop] (the block may
    run past stop); returns where the block ends, or -1 when there is none."""
    stop = len(body) if stop is None else stop
    while True:
        at = body.find(name, start, stop)
        if at < 0:
            return -1
        if _sample_at(body, at, name):
            break
        start = at + len(name)
    while _sample_at(body, at, name):  # this line and the ones after it
        end = body.find(b"\n", at)
        end = len(body) if end < 0 else end
        out.append(body[at:end])
        at = end + 1
    return at


class Picker:
    """Picks the sample lines of some metrics out of a text as it arrives, so that what is
    held per instance stays small whatever the server sends: at most PICK_BLOCK bytes of
    text not yet looked at, lines of at most MAX_LINE bytes (a longer one of another metric
    is skipped, one of ours refuses the text), MAX_SAMPLES lines or MAX_PICKED bytes picked,
    and the first HEAD bytes (to say what the text was when it holds none of them)."""

    def __init__(self, groups: tuple[tuple[bytes, ...], ...]):
        self.groups = groups
        self.names = tuple(n for group in groups for n in group)
        self.found: dict[bytes, list[bytes]] = {}
        self.picked = self.picked_bytes = 0
        self.head = b""
        self.pending: list[bytes] = []  # whole lines not looked at yet
        self.pending_bytes = 0
        self.carry = b""  # a line not ended yet
        self.skipping = False  # inside a line longer than MAX_LINE (not one of ours)

    def feed(self, chunk: bytes) -> None:
        if len(self.head) < HEAD:
            self.head += chunk[:HEAD - len(self.head)]
        if self.skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                return
            chunk, self.skipping = chunk[newline + 1:], False
        data = self.carry + chunk if self.carry else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            self._hold(data)
            return
        self.pending.append(data[:cut + 1])
        self.pending_bytes += cut + 1
        self._hold(data[cut + 1:])
        if self.pending_bytes >= PICK_BLOCK:
            self._pick()

    def _hold(self, rest: bytes) -> None:
        if len(rest) <= MAX_LINE:
            self.carry = rest
            return
        for name in self.names:
            if _sample_at(rest, 0, name):
                raise MetricsTextError(f"a line of {name.decode()} longer than "
                                       f"{MAX_LINE >> 10} KiB")
        self.carry, self.skipping = b"", True

    def _pick(self) -> None:
        """One pass over the block, where names come in the order expected (a name not
        after the one before it is looked for before); a name is not looked for once one
        before it in its group was found."""
        block = b"".join(self.pending)
        self.pending, self.pending_bytes = [], 0
        pos = 0
        for group in self.groups:
            for name in group:
                if any(n in self.found for n in group[:group.index(name)]):
                    break
                lines: list[bytes] = []
                end = _select(block, name, lines, pos)
                if end < 0 and pos:
                    end = _select(block, name, lines, 0, pos + len(name))
                if end < 0:
                    continue
                pos = end
                self._keep(name, lines)
                break

    def _keep(self, name: bytes, lines: list[bytes]) -> None:
        self.found.setdefault(name, []).extend(lines)
        self.picked += len(lines)
        self.picked_bytes += sum(map(len, lines))
        if self.picked > MAX_SAMPLES or self.picked_bytes > MAX_PICKED:
            raise MetricsTextError(f"more than {MAX_SAMPLES} samples or "
                                   f"{MAX_PICKED >> 10} KiB of the metrics read (vLLM has "
                                   "about 20 per engine)")
        if max(map(len, lines)) > MAX_LINE:
            raise MetricsTextError(f"a line of {name.decode()} longer than "
                                   f"{MAX_LINE >> 10} KiB")

    def lines(self) -> list[bytes]:
        """The end of the text: of each group of names, the lines of the first that has
        any."""
        if self.carry and not self.skipping:
            self.pending.append(self.carry)
            self.carry = b""
        if self.pending:
            self._pick()
        out = []
        for group in self.groups:
            for name in group:
                if name in self.found:
                    out.extend(self.found[name])
                    break
        return out


# line -> (name, labels, value) as the parser gave it: the same line from another instance (a
# zero count, a model's constant labels) or from the last scrape (--watch) is not parsed again
_PARSED: dict[bytes, tuple[str, dict[str, str], float]] = {}
_PARSED_MAX = 200_000


class MetricsTextError(ValueError):
    """A /metrics answer that cannot be read (one line: why)."""


# ------------------------------------------------------------------ parsing (pure)


@dataclass
class _Samples:
    """name -> [(labels, value)] of the selected lines, and what was wrong with values."""

    by_name: dict[str, list[tuple[dict[str, str], float]]]
    problems: list[str] = field(default_factory=list)

    def first(self, names: tuple[str, ...]) -> tuple[str, list] | None:
        for name in names:
            if name in self.by_name:
                return name, self.by_name[name]
        return None

    def _values(self, names) -> tuple[str, list[float]] | None:
        """The values of the first of `names` present; None (and a problem noted) when one
        is not a number every metric read here can be: finite and >= 0."""
        found = self.first(names)
        if found is None:
            return None
        name, samples = found
        values = [v for _, v in samples]
        bad = [v for v in values if not math.isfinite(v) or v < 0]
        if bad:
            self.problems.append(f"{name} is {_show(bad[0])}")
            return None
        return name, values

    def total(self, names) -> float | None:
        got = self._values(names)
        return None if got is None else _clean(sum(got[1]))

    def largest(self, names) -> float | None:
        got = self._values(names)
        return None if got is None else _clean(max(got[1]))

    def by_label(self, names, label: str) -> dict[str, float] | None:
        found = self.first(names)
        if found is None:
            return None
        name, samples = found
        out: dict[str, float] = {}
        for labels, value in samples:
            if not math.isfinite(value) or value < 0:
                self.problems.append(f"{name}{{{label}={labels.get(label, '')!r}}} is "
                                     f"{_show(value)}")
                return None
            key = labels.get(label, "")
            out[key] = _clean(out.get(key, 0.0) + value)
        return out


def _show(value: float) -> str:
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf") \
        if math.isinf(value) else f"negative ({value:g})"


def _clean(value: float) -> float | int:
    """Counts as ints where they are whole (JSON reads better), other values as they are."""
    return int(value) if float(value).is_integer() and abs(value) < 2 ** 53 else value


def parse_samples(picked: bytes | Picker, names: tuple[tuple[bytes, ...], ...], expect: str
                  ) -> _Samples:
    """The samples of these metrics (a text, or a Picker fed one), parsed by
    prometheus_client's parser. MetricsTextError when none is there or the text is not
    Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    if not isinstance(picked, Picker):
        body, picked = picked, Picker(names)
        picked.feed(body)
    lines = picked.lines()
    if not lines:
        raise MetricsTextError(_why_nothing(picked.head, expect))
    known: dict[bytes, tuple] = {}  # (a dict of its own: another thread may empty _PARSED)
    missing = []
    for line in dict.fromkeys(lines):
        hit = _PARSED.get(line)
        if hit is None:
            missing.append(line)
        else:
            known[line] = hit
    if missing:
        try:
            text = b"\n".join(missing).decode("utf-8")
        except UnicodeDecodeError as err:
            raise MetricsTextError(f"not UTF-8 (byte 0x{err.object[err.start]:02x} in a "
                                   f"{expect} line)") from None
        try:  # no TYPE lines: one sample per line, in order
            samples = [sample for family in text_string_to_metric_families(text + "\n")
                       for sample in family.samples]
        except Exception as err:  # noqa: BLE001 (ValueError, and others on junk)
            raise MetricsTextError(f"not Prometheus text ({_one_line(err)})") from None
        if len(samples) != len(missing):
            raise MetricsTextError("not Prometheus text (a line is not one sample)")
        if len(_PARSED) + len(missing) > _PARSED_MAX:
            _PARSED.clear()
        for line, sample in zip(missing, samples):
            known[line] = _PARSED[line] = (sample.name, sample.labels, float(sample.value))
    by_name: dict[str, list] = {}
    for line in lines:
        name, labels, value = known[line]
        by_name.setdefault(name, []).append((labels, value))
    return _Samples(by_name)


def _why_nothing(body: bytes, expect: str) -> str:
    """Why a text (its first HEAD bytes) holds none of the lines looked for: not Prometheus
    text at all, or another exporter's."""
    from prometheus_client.parser import text_string_to_metric_families

    if not body.strip():
        return "an empty answer"
    head = body[:HEAD]
    head = head[:head.rfind(b"\n") + 1] or head
    try:
        families = list(text_string_to_metric_families(head.decode("utf-8", "replace")))
    except Exception as err:  # noqa: BLE001
        return f"not Prometheus text ({_one_line(err)})"
    if not families:
        return "not Prometheus text (no samples)"
    return f"Prometheus text without {expect}'s metrics: is this {expect}?"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass
class _Reading:
    """What one instance's text says (before rates)."""

    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    finished: dict[str, float] | None = None
    rejected: float | None = None
    http: dict[str, float] | None = None
    prefix_cache_hits: float | None = None
    prefix_cache_queries: float | None = None
    prefix_hit_rate_gauge: float | None = None
    started: float | None = None
    problems: list[str] = field(default_factory=list)


def read_instance(body: bytes | Picker) -> _Reading:
    """One vLLM /metrics text (or a Picker fed one) -> its numbers. MetricsTextError when it
    is not one."""
    s = parse_samples(body, _INSTANCE_LINES, "vLLM")
    if s.first(RUNNING + WAITING + PROMPT + GENERATION + FINISHED) is None:
        raise MetricsTextError("Prometheus text without vLLM's request metrics "
                               "(vllm:num_requests_running, ...): is this vLLM?")
    reading = _Reading(
        running=s.total(RUNNING), waiting=s.total(WAITING), kv_cache_usage=s.largest(KV_USAGE),
        prompt_tokens=s.total(PROMPT),
        generation_tokens=s.total(GENERATION),
        finished=s.by_label(FINISHED, "finished_reason"),
        rejected=s.total(REJECTED), http=s.by_label(HTTP, "status"),
        prefix_cache_hits=s.total(PREFIX_HITS),
        prefix_cache_queries=s.total(PREFIX_QUERIES),
        prefix_hit_rate_gauge=s.largest(PREFIX_HIT_RATE), started=s.largest(STARTED))
    reading.problems = s.problems
    return reading


# ------------------------------------------------------------------ the records


@dataclass
class InstanceMetrics:
    """One instance at one scrape. Counters are totals since the instance started; `*_per_s`
    and `*_interval` need a previous scrape (None without one)."""

    model: str
    id: int | None
    node: int | None
    host: str
    url: str  # the /metrics URL scraped
    state: str  # the launcher's word: ready | unhealthy
    scrape: str = OK  # ok | timeout | unreachable | http_error | bad_metrics
    error: str = ""  # why the scrape failed ("" when ok)
    at: float = 0.0  # unix time of the answer (or of giving up)
    seconds: float = 0.0  # how long the scrape of this instance took
    running: float | None = None  # requests in the engine's batch now
    waiting: float | None = None  # requests queued now
    kv_cache_usage: float | None = None  # 0..1, the fullest engine's
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    prompt_tokens_per_s: float | None = None
    generation_tokens_per_s: float | None = None
    requests_per_s: float | None = None  # finished requests (any reason) per second
    finished: dict[str, float] = field(default_factory=dict)  # by finished_reason
    succeeded: float | None = None  # finished for any reason but abort and error
    aborted: float | None = None  # finished_reason abort (the client went away)
    failed: float | None = None  # HTTP 5xx answers; without HTTP counters: finished_reason
    #                              error + admission rejections
    http_4xx: float | None = None  # requests refused as bad (the client's fault)
    rejected: float | None = None  # refused by a queue limit (vllm:admission_rejections)
    prefix_cache_hits: float | None = None  # tokens
    prefix_cache_queries: float | None = None
    prefix_cache_hit_rate: float | None = None  # hits / queries since the instance started
    prefix_cache_hit_rate_interval: float | None = None  # since the previous scrape
    started: float | None = None  # unix time its API server started (a new one: restarted)
    restarted: bool = False  # its counters started again since the previous scrape
    problems: list[str] = field(default_factory=list)  # values that were not numbers
    # prefix-cache (hits, queries) since the previous scrape: the model's interval hit rate
    _interval: tuple[float, float] | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.scrape == OK

    @property
    def key(self) -> tuple:
        return (self.model, self.id, self.url)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class ModelMetrics:
    """A model's fleet: sums over its instances that answered (rates over those with a rate;
    None when none has one)."""

    model: str
    instances: int = 0  # serving (ready or unhealthy) per the run
    answered: int = 0  # of which answered this scrape
    running: float = 0
    waiting: float = 0
    kv_cache_usage_mean: float | None = None
    kv_cache_usage_max: float | None = None
    prompt_tokens: float = 0
    generation_tokens: float = 0
    prompt_tokens_per_s: float | None = None
    generation_tokens_per_s: float | None = None
    requests_per_s: float | None = None
    finished: dict[str, float] = field(default_factory=dict)
    succeeded: float = 0
    aborted: float = 0
    failed: float = 0
    http_4xx: float = 0
    rejected: float = 0
    prefix_cache_hits: float = 0
    prefix_cache_queries: float = 0
    prefix_cache_hit_rate: float | None = None
    prefix_cache_hit_rate_interval: float | None = None
    flagged: int = 0  # instances with a flag

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RouterMetrics:
    """A model's router. Its exporter listens on 127.0.0.1 of the first node only: from
    another host it is `remote`, never a failure."""

    model: str
    state: str  # the run's word for the router: ready | starting | restarting | failed | ...
    url: str | None  # its /metrics URL (None when the run does not record it)
    scrape: str = "not_scraped"  # ok | timeout | unreachable | http_error | bad_metrics |
    #                              remote | not_recorded | not_scraped (router not ready)
    error: str = ""
    requests: float | None = None  # vllm_router_requests_total
    request_errors: float | None = None
    retries: float | None = None
    active_workers: float | None = None
    healthy_workers: float | None = None
    requests_per_s: float | None = None
    processed: dict[str, float] = field(default_factory=dict)  # by worker URL
    at: float | None = None  # unix time of its answer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Flag:
    kind: str  # not_answering | bad_metrics | kv_cache_full | idle_while_others_queue |
    #            restarted | bad_values
    model: str
    id: int | None
    url: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Metrics:
    """One scrape of a run (`run.metrics()`); `to_dict()` is what `--json` prints."""

    run_dir: str
    at: float  # unix time the scrape started
    seconds: float  # how long it took
    interval: float | None  # seconds since the previous scrape given (rates are over it)
    timeout: float
    instances: list[InstanceMetrics]
    models: list[ModelMetrics]
    routers: list[RouterMetrics]
    flags: list[Flag]

    @property
    def answered(self) -> int:
        return sum(i.ok for i in self.instances)

    def model(self, name: str) -> ModelMetrics:
        for m in self.models:
            if m.model == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "run_dir": self.run_dir, "at": self.at,
                "seconds": self.seconds, "interval": self.interval, "timeout": self.timeout,
                "answered": self.answered, "total": len(self.instances),
                "models": [m.to_dict() for m in self.models],
                "instances": [i.to_dict() for i in self.instances],
                "routers": [r.to_dict() for r in self.routers],
                "flags": [f.to_dict() for f in self.flags]}


# ------------------------------------------------------------------ numbers (pure)


def _increase(now: float | None, before: float | None, restarted: bool) -> float | None:
    """How much a counter grew; after a restart (it went backwards, or the server is a new
    process) it counted from 0, as Prometheus's rate() takes it. Never negative."""
    if now is None or before is None:
        return None
    if restarted or now < before:
        return now
    return now - before


def _per_s(now, before, restarted: bool, dt: float | None) -> float | None:
    grown = _increase(now, before, restarted)
    return None if grown is None or not dt or dt <= 0 else grown / dt


def _ratio(part, whole) -> float | None:
    return part / whole if part is not None and whole else None


def instance_record(target: dict, reading: _Reading | None, *, scrape: str = OK,
                    error: str = "", at: float, seconds: float,
                    previous: InstanceMetrics | None = None) -> InstanceMetrics:
    """The record of one instance from what its text said (or why there is none), with
    rates against its previous record. Pure."""
    record = InstanceMetrics(**target, scrape=scrape, error=error, at=at,
                             seconds=round(seconds, 4))
    if reading is None:
        return record
    r = reading
    finished = dict(r.finished or {})
    record.running, record.waiting = r.running, r.waiting
    record.kv_cache_usage = r.kv_cache_usage
    record.prompt_tokens, record.generation_tokens = r.prompt_tokens, r.generation_tokens
    record.finished = finished
    if r.finished is not None:
        record.succeeded = _clean(sum(v for k, v in finished.items() if k not in NOT_FAILURES))
        record.aborted = finished.get("abort", 0)
    record.rejected = r.rejected
    if r.http is not None:
        record.failed = _clean(sum(v for k, v in r.http.items() if k.startswith("5")))
        record.http_4xx = _clean(sum(v for k, v in r.http.items() if k.startswith("4")))
    elif r.finished is not None or r.rejected is not None:
        record.failed = _clean(finished.get("error", 0) + (r.rejected or 0))
    record.prefix_cache_hits, record.prefix_cache_queries = r.prefix_cache_hits, \
        r.prefix_cache_queries
    record.prefix_cache_hit_rate = (_ratio(r.prefix_cache_hits, r.prefix_cache_queries)
                                    if r.prefix_cache_queries is not None
                                    else r.prefix_hit_rate_gauge)
    record.problems = list(r.problems)
    record.started = r.started
    if previous is not None and previous.ok:
        p = previous
        dt = at - p.at
        restarted = (r.started is not None and p.started is not None
                     and abs(r.started - p.started) > 1e-3) or any(
            now is not None and before is not None and now < before
            for now, before in ((record.prompt_tokens, p.prompt_tokens),
                                (record.generation_tokens, p.generation_tokens),
                                (_total(record.finished), _total(p.finished)),
                                (record.prefix_cache_queries, p.prefix_cache_queries)))
        record.restarted = restarted
        record.prompt_tokens_per_s = _per_s(record.prompt_tokens, p.prompt_tokens, restarted, dt)
        record.generation_tokens_per_s = _per_s(record.generation_tokens, p.generation_tokens,
                                                restarted, dt)
        if record.finished and p.finished:
            record.requests_per_s = _per_s(_total(record.finished), _total(p.finished),
                                           restarted, dt)
        hits = _increase(record.prefix_cache_hits, p.prefix_cache_hits, restarted)
        queries = _increase(record.prefix_cache_queries, p.prefix_cache_queries, restarted)
        record.prefix_cache_hit_rate_interval = _ratio(hits, queries)
        if hits is not None and queries is not None:
            record._interval = (hits, queries)
    return record


def _total(finished: dict[str, float] | None) -> float | None:
    return sum(finished.values()) if finished else None


def _sum_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def model_totals(model: str, records: list[InstanceMetrics]) -> ModelMetrics:
    """The fleet's totals for one model: sums of its instances' own numbers. Pure."""
    ok = [r for r in records if r.ok]
    m = ModelMetrics(model=model, instances=len(records), answered=len(ok))
    for name in ("running", "waiting", "prompt_tokens", "generation_tokens", "succeeded",
                 "aborted", "failed", "http_4xx", "rejected", "prefix_cache_hits",
                 "prefix_cache_queries"):
        setattr(m, name, _clean(sum(getattr(r, name) or 0 for r in ok)))
    for name in ("prompt_tokens_per_s", "generation_tokens_per_s", "requests_per_s"):
        setattr(m, name, _sum_or_none(getattr(r, name) for r in ok))
    kv = [r.kv_cache_usage for r in ok if r.kv_cache_usage is not None]
    if kv:
        m.kv_cache_usage_mean, m.kv_cache_usage_max = sum(kv) / len(kv), max(kv)
    for r in ok:
        for reason, count in r.finished.items():
            m.finished[reason] = _clean(m.finished.get(reason, 0) + count)
    if m.prefix_cache_queries:
        m.prefix_cache_hit_rate = m.prefix_cache_hits / m.prefix_cache_queries
    else:  # V0's gauge only
        rates = [r.prefix_cache_hit_rate for r in ok if r.prefix_cache_hit_rate is not None]
        m.prefix_cache_hit_rate = sum(rates) / len(rates) if rates else None
    spans = [r._interval for r in ok if r._interval is not None]
    if spans:  # the fleet's hits over its queries in the interval
        m.prefix_cache_hit_rate_interval = _ratio(sum(h for h, _ in spans),
                                                  sum(q for _, q in spans))
    return m


def find_flags(records: list[InstanceMetrics]) -> list[Flag]:
    """The outliers (docs/metrics.md "Flags"). Pure."""
    flags = []
    for r in records:
        if not r.ok:
            kind = "not_answering" if r.scrape in (TIMEOUT, UNREACHABLE) else "bad_metrics"
            flags.append(Flag(kind, r.model, r.id, r.url, r.error))
            continue
        if r.kv_cache_usage is not None and r.kv_cache_usage >= KV_FULL:
            flags.append(Flag("kv_cache_full", r.model, r.id, r.url,
                              f"KV cache {100 * r.kv_cache_usage:.0f}% used"
                              + (f"; {_n(r.waiting)} request(s) waiting" if r.waiting else "")))
        if r.restarted:
            flags.append(Flag("restarted", r.model, r.id, r.url,
                              "its counters started again since the previous scrape (the "
                              "server restarted); rates count from 0"))
        if r.problems:
            flags.append(Flag("bad_values", r.model, r.id, r.url, "; ".join(r.problems[:3])))
    by_model: dict[str, list[InstanceMetrics]] = {}
    for r in records:
        if r.ok:
            by_model.setdefault(r.model, []).append(r)
    for model, ok in by_model.items():
        queuing = [o for o in ok if (o.waiting or 0) >= 1]  # (an idle one is not among them)
        if not queuing:
            continue
        queued = _clean(sum(o.waiting for o in queuing))
        for r in ok:
            if r.running == 0 and r.waiting == 0:  # idle (and not unknown)
                flags.append(Flag("idle_while_others_queue", model, r.id, r.url,
                                  f"serves nothing while {len(queuing)} other instance(s) of "
                                  f"{model} queue {_n(queued)} request(s)"))
    return flags


def _n(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def router_record(router, url: str | None, body: bytes | Picker | None, *, scrape: str,
                  error: str = "",
                  at: float | None = None, previous: RouterMetrics | None = None
                  ) -> RouterMetrics:
    """A router's record from its exporter's text (or why there is none). Pure."""
    record = RouterMetrics(model=router.model, state=router.state, url=url, scrape=scrape,
                           error=error, at=at)
    if body is None:
        return record
    try:
        s = parse_samples(body, _ROUTER_LINES, "vllm-router")
    except MetricsTextError as err:
        record.scrape, record.error = BAD_METRICS, str(err)
        return record
    # (its counters appear once they count: absent is 0)
    record.requests, record.request_errors, record.retries = (
        0 if s.first(names) is None else s.total(names)
        for names in (R_REQUESTS, R_ERRORS, R_RETRIES))
    record.active_workers = s.total(R_ACTIVE)
    record.healthy_workers = s.total(R_HEALTH)
    record.processed = s.by_label(R_PROCESSED, "worker") or {}
    if previous is not None and previous.scrape == OK and previous.at and at:
        record.requests_per_s = _per_s(record.requests, previous.requests, False,
                                       at - previous.at)
    return record


# ------------------------------------------------------------------ scraping


def _serving(status: Status) -> list[dict]:
    """The instances to scrape: those the run calls ready or unhealthy (running, its health
    check failing: does it answer /metrics?)."""
    out = []
    for e in status.instances:
        if e.state not in SERVING_STATES:
            continue
        origin = e.url[:-3] if e.url.endswith("/v1") else e.url.rstrip("/")
        out.append({"model": e.model, "id": e.id, "node": e.node, "host": e.host,
                    "url": f"{origin}/metrics", "state": e.state})
    return out


def _router_ports(run: Run) -> dict[str, int]:
    """model -> the port of its router's Prometheus exporter, as the launcher records it in
    the router's record (`metrics_port`). Read through the Run's own reader of the endpoints
    file (every field it knows is checked there; this one is checked here)."""
    doc = run._document() or {}  # noqa: SLF001 (the Run's checked reader; see docs/metrics.md)
    ports = {}
    for record in doc.get("routers") or []:
        port = record.get("metrics_port") if isinstance(record, dict) else None
        if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 \
                and isinstance(record.get("model"), str):
            ports[record["model"]] = port
    return ports


def _check_options(timeout: float, concurrency: int) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
            not math.isfinite(timeout) or not timeout > 0:
        raise ConfigError(f"--timeout {timeout!r}: a number of seconds > 0")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"--concurrency {concurrency!r}: an integer >= 1")


def _usable_concurrency(concurrency: int) -> int:
    """At most what the open-files limit leaves room for (a login node's is often 1024)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return concurrency
    return max(1, min(concurrency, soft - 64))


class Scraper:
    """One HTTP session (aiohttp: no proxy, the run's key on every request) for one scrape or
    many (--watch). Use inside `async with`."""

    def __init__(self, key: str, *, timeout: float = DEFAULT_TIMEOUT,
                 concurrency: int = DEFAULT_CONCURRENCY, keep_alive: bool = False,
                 max_body: int = MAX_BODY):
        _check_options(timeout, concurrency)
        self.key, self.timeout, self.max_body = key, float(timeout), max_body
        self.concurrency = _usable_concurrency(concurrency)
        self.keep_alive = keep_alive
        self.session = None
        self._limit: asyncio.Semaphore | None = None

    async def __aenter__(self) -> Scraper:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=0,
                                         force_close=not self.keep_alive,
                                         enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=connector, trust_env=False, auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
            headers={"Authorization": f"Bearer {self.key}", "Accept-Encoding": "identity",
                     "Accept": "text/plain"})
        self._limit = asyncio.Semaphore(self.concurrency)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()

    async def fetch(self, url: str, groups=_INSTANCE_LINES
                    ) -> tuple[str, Picker | None, str, float, float]:
        """(outcome, the lines of these metrics or None, error, unix time, seconds) of one
        GET within the timeout, which starts once a slot is free."""
        async with self._limit:
            started = time.monotonic()
            try:
                body = await asyncio.wait_for(self._get(url, groups), self.timeout)
                outcome, error = OK, ""
            except asyncio.TimeoutError:
                body, outcome = None, TIMEOUT
                error = f"no answer within {self.timeout:g}s"
            except _Refused as err:
                body, outcome, error = None, err.outcome, str(err)
            except Exception as err:  # noqa: BLE001 (aiohttp.ClientError, OSError, ...)
                body, outcome, error = None, UNREACHABLE, _connection_problem(err)
            return outcome, body, error, time.time(), time.monotonic() - started

    async def _get(self, url: str, groups) -> Picker:
        async with self.session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                why = f"HTTP {resp.status}"
                if resp.status in (401, 403):
                    why += " (the server refused the run's key)"
                raise _Refused(HTTP_ERROR, why)
            kind = resp.headers.get("Content-Type", "text/plain").split(";")[0].strip().lower()
            if kind not in ("text/plain", "application/openmetrics-text", ""):
                raise _Refused(BAD_METRICS, f"not Prometheus text (Content-Type {kind})")
            encoding = resp.headers.get("Content-Encoding", "identity").lower()
            if encoding not in ("identity", ""):
                raise _Refused(BAD_METRICS, f"answered {encoding}-encoded; asked for identity")
            if (resp.content_length or 0) > self.max_body:
                raise _Refused(BAD_METRICS, f"larger than {self.max_body >> 20} MiB "
                                            f"({resp.content_length} bytes)")
            picker, size = Picker(groups), 0
            try:
                async for chunk in resp.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > self.max_body:
                        raise _Refused(BAD_METRICS, f"larger than {self.max_body >> 20} MiB")
                    picker.feed(chunk)
            except MetricsTextError as err:
                raise _Refused(BAD_METRICS, str(err)) from None
            return picker

    async def scrape(self, status: Status, *, previous: Metrics | None = None,
                     router_ports: dict[str, int] | None = None) -> Metrics:
        """One scrape of the run as `status` lists it."""
        started_at, started = time.time(), time.monotonic()
        targets = _serving(status)
        before = {i.key: i for i in previous.instances} if previous else {}
        routers_before = {r.model: r for r in previous.routers} if previous else {}

        async def one(target: dict) -> InstanceMetrics:
            outcome, body, error, at, seconds = await self.fetch(target["url"])
            reading = None
            if body is not None:
                try:
                    reading = read_instance(body)
                except MetricsTextError as err:
                    outcome, error = BAD_METRICS, str(err)
            key = (target["model"], target["id"], target["url"])
            return instance_record(target, reading, scrape=outcome, error=error, at=at,
                                   seconds=seconds, previous=before.get(key))

        async def router(r) -> RouterMetrics:
            port = (router_ports or {}).get(r.model)
            url = f"http://127.0.0.1:{port}/metrics" if port else None
            old = routers_before.get(r.model)
            if url is None:
                return router_record(r, None, None, scrape="not_recorded",
                                     error="the run does not record its exporter's port")
            launcher_host = (status.launcher or {}).get("host", "")
            if not this_host(launcher_host):
                return router_record(r, url, None, scrape="remote",
                                     error=f"its exporter listens on 127.0.0.1 of "
                                           f"{launcher_host} only; run aegis metrics there")
            if r.state != "ready":
                return router_record(r, url, None, scrape="not_scraped",
                                     error=f"the router is {r.state}")
            outcome, body, error, at, _ = await self.fetch(url, _ROUTER_LINES)
            return router_record(r, url, body, scrape=outcome, error=error, at=at,
                                 previous=old)

        jobs = [one(t) for t in targets] + [router(r) for r in status.routers]
        results = await asyncio.gather(*jobs)
        records, routers = results[:len(targets)], results[len(targets):]
        models = [model_totals(m, [r for r in records if r.model == m])
                  for m in _models_of(status, records)]
        flags = find_flags(records)
        flagged = {}
        for f in flags:
            flagged.setdefault(f.model, set()).add((f.id, f.url))
        for m in models:
            m.flagged = len(flagged.get(m.model, ()))
        return Metrics(run_dir=status.run_dir, at=started_at,
                       seconds=round(time.monotonic() - started, 4),
                       interval=round(started_at - previous.at, 4) if previous else None,
                       timeout=self.timeout, instances=list(records), models=models,
                       routers=list(routers), flags=flags)


def _models_of(status: Status, records) -> list[str]:
    names = []
    for e in list(status.instances) + list(records):
        if e.model not in names:
            names.append(e.model)
    return names


class _Refused(Exception):
    def __init__(self, outcome: str, message: str):
        super().__init__(message)
        self.outcome = outcome


def _connection_problem(err: BaseException) -> str:
    import aiohttp

    if isinstance(err, aiohttp.ClientConnectorError):
        why = err.os_error.strerror if getattr(err, "os_error", None) else None
        return f"cannot connect ({(why or _one_line(err)).lower()})"
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return "closed the connection without answering"
    return _one_line(err)


# ------------------------------------------------------------------ the API


def _ready_status(run: Run, *, allow_empty: bool = False) -> Status:
    """The run's status; RunError when it ended, or (unless allow_empty) serves nothing."""
    status = run.state()
    if status.gone:
        raise RunError(f"the run {status.phase}: {status.reason}")
    if not allow_empty and not _serving(status):
        hint = (f"; wait for it: aegis wait {run.run_dir}"
                if status.phase in ("pending", "starting") else "")
        raise RunError(f"nothing of this run is ready ({status.phase}"
                       + (f": {status.reason}" if status.reason else "") + ")" + hint)
    return status


def metrics(run: Run, *, previous: Metrics | None = None, timeout: float = DEFAULT_TIMEOUT,
            concurrency: int = DEFAULT_CONCURRENCY) -> Metrics:
    """One scrape of `run` (Run.metrics). With `previous` (an earlier scrape of the same run),
    the rates between the two. RunError when the run ended or nothing of it is ready;
    ConfigError for bad options."""
    _check_options(timeout, concurrency)
    if previous is not None and not isinstance(previous, Metrics):
        raise ConfigError(f"previous: an earlier run.metrics() result, not "
                          f"{type(previous).__name__}")
    status = _ready_status(run)
    key = run.api_key()
    ports = _router_ports(run) if status.routers else {}

    async def once() -> Metrics:
        async with Scraper(key, timeout=timeout, concurrency=concurrency) as scraper:
            return await scraper.scrape(status, previous=previous, router_ports=ports)

    loop = _Loop()
    try:
        return loop.run(once())
    finally:
        loop.close()


def watch(run: Run, interval: float, *, timeout: float = DEFAULT_TIMEOUT,
          concurrency: int = DEFAULT_CONCURRENCY, count: int | None = None,
          refresh_interval: float | None = None) -> Iterator[Metrics]:
    """Scrapes every `interval` seconds, each after the first with rates over the time since
    the one before, `count` times or for as long as the caller iterates. The run's endpoints
    are read again before each scrape (a submitted run's at most every
    JOB_REFRESH_INTERVAL s: each read asks squeue/qstat). RunError when nothing of the run is
    ready at the start, or when the run ends."""
    _check_options(timeout, concurrency)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or \
            not math.isfinite(interval) or not interval > 0:
        raise ConfigError(f"--watch {interval!r}: a number of seconds > 0")
    if refresh_interval is None:
        refresh_interval = 0.0 if run.backend is None else JOB_REFRESH_INTERVAL
    status = _ready_status(run)
    key = run.api_key()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    # idle connections are kept between scrapes unless that many sockets would not fit
    keep_alive = soft == resource.RLIM_INFINITY or len(_serving(status)) + 128 < soft
    scraper = Scraper(key, timeout=timeout, concurrency=concurrency, keep_alive=keep_alive)
    loop = _Loop()
    try:
        loop.run(scraper.__aenter__())
        previous, done, read_at = None, 0, time.monotonic()
        while count is None or done < count:
            began = time.monotonic()
            if done and began - read_at >= refresh_interval:
                status = _ready_status(run, allow_empty=True)
                read_at = began
            ports = _router_ports(run) if status.routers else {}
            previous = loop.run(scraper.scrape(status, previous=previous, router_ports=ports))
            done += 1
            yield previous
            if count is not None and done >= count:
                return
            left = interval - (time.monotonic() - began)
            if left > 0:
                time.sleep(left)
    finally:
        try:
            loop.run(scraper.__aexit__(None, None, None))
        finally:
            loop.close()


class _Loop:
    """A private event loop in a thread of its own, so that scrapes run the same whether the
    caller is plain code or async code (a Jupyter cell runs inside a loop). Ctrl-C in the
    caller cancels what runs there."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aegis-metrics",
                                       daemon=True)
        self.thread.start()

    def run(self, coroutine):
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


# ------------------------------------------------------------------ showing it


def _fmt(value, kind: str = "n") -> str:
    if value is None:
        return "-"
    if kind == "%":
        return f"{100 * value:.0f}%"
    if kind == "rate":
        return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.1f}"
    return f"{int(value):,}"


MODEL_COLUMNS = ("MODEL", "UP", "RUN", "WAIT", "KV MEAN", "KV MAX", "PROMPT TOK/S", "GEN TOK/S",
                 "REQ/S", "OK", "FAILED", "PREFIX HIT", "FLAGGED")
INSTANCE_COLUMNS = ("MODEL", "ID", "NODE", "HOST", "RUN", "WAIT", "KV", "PROMPT TOK/S",
                    "GEN TOK/S", "OK", "FAILED", "PREFIX HIT", "SCRAPE")


def model_rows(m: Metrics) -> list[tuple[str, ...]]:
    return [(x.model, f"{x.answered}/{x.instances}", _fmt(x.running), _fmt(x.waiting),
             _fmt(x.kv_cache_usage_mean, "%"), _fmt(x.kv_cache_usage_max, "%"),
             _fmt(x.prompt_tokens_per_s, "rate"), _fmt(x.generation_tokens_per_s, "rate"),
             _fmt(x.requests_per_s, "rate"), _fmt(x.succeeded), _fmt(x.failed),
             _fmt(x.prefix_cache_hit_rate_interval if x.prefix_cache_hit_rate_interval
                  is not None else x.prefix_cache_hit_rate, "%"), str(x.flagged))
            for x in m.models]


def instance_rows(m: Metrics, limit: int | None = None) -> list[tuple[str, ...]]:
    """Flagged instances first, then the rest in id order."""
    flagged = {(f.model, f.id, f.url) for f in m.flags}
    order = sorted(m.instances, key=lambda i: ((i.model, i.id, i.url) not in flagged,
                                               i.model, i.id if i.id is not None else -1))
    rows = []
    for i in order[:limit]:
        rows.append((i.model, _fmt(i.id), _fmt(i.node), i.host, _fmt(i.running),
                     _fmt(i.waiting), _fmt(i.kv_cache_usage, "%"),
                     _fmt(i.prompt_tokens_per_s, "rate"), _fmt(i.generation_tokens_per_s, "rate"),
                     _fmt(i.succeeded), _fmt(i.failed),
                     _fmt(i.prefix_cache_hit_rate_interval if i.prefix_cache_hit_rate_interval
                          is not None else i.prefix_cache_hit_rate, "%"),
                     i.scrape if i.ok else f"{i.scrape}: {i.error}"))
    return rows


def router_lines(m: Metrics) -> list[str]:
    out = []
    for r in m.routers:
        if r.scrape == OK:
            out.append(f"router {r.model}: {_fmt(r.requests)} requests"
                       + (f" ({_fmt(r.requests_per_s, 'rate')}/s)" if r.requests_per_s
                          is not None else "")
                       + f", {_fmt(r.request_errors)} errors, {_fmt(r.retries)} retries, "
                       f"{_fmt(r.healthy_workers)}/{_fmt(r.active_workers)} workers healthy")
        else:
            out.append(f"router {r.model} ({r.state}): metrics {r.scrape.replace('_', ' ')}"
                       + (f": {r.error}" if r.error else ""))
    return out


def _seconds(value: float) -> str:
    return f"{value:.1f}s" if value >= 1 else f"{value:.2f}s"


def flag_changes(before: Metrics | None, now: Metrics) -> tuple[list[Flag], list[Flag]]:
    """(flags new since `before`, flags of `before` gone now): what a log needs to hear."""
    def key(f: Flag) -> tuple:
        return (f.kind, f.model, f.id, f.url)

    old = {key(f): f for f in before.flags} if before else {}
    new = {key(f): f for f in now.flags}
    return ([f for k, f in new.items() if k not in old],
            [f for k, f in old.items() if k not in new])


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def text_report(m: Metrics, *, instances: int | None = 50) -> str:
    """The plain report: models, routers, flags, then the instances (flagged first)."""
    head = (f"{m.answered}/{len(m.instances)} instance(s) answered in {m.seconds:.2f}s"
            + (f"; rates over {_seconds(m.interval)}" if m.interval else
               "; rates need a second scrape (--watch)"))
    parts = [head, _table([MODEL_COLUMNS, *model_rows(m)])]
    parts += router_lines(m)
    parts += [f"flag {f.kind}: {f.model} instance {_fmt(f.id)} ({f.url}): {f.message}"
              for f in m.flags[:50]]
    if len(m.flags) > 50:
        parts.append(f"... and {len(m.flags) - 50} more flags (--json has all)")
    if instances:
        rows = instance_rows(m, instances)
        parts.append(_table([INSTANCE_COLUMNS, *rows]))
        if len(m.instances) > instances:
            parts.append(f"... {len(m.instances) - instances} more instance(s) (--json has all)")
    return "\n".join(parts)


def line_report(m: Metrics) -> str:
    """One line per scrape for logs (--watch without a terminal)."""
    when = time.strftime("%H:%M:%S", time.localtime(m.at))
    models = "; ".join(
        f"{x.model}: {x.answered}/{x.instances} up, run {_fmt(x.running)}, wait "
        f"{_fmt(x.waiting)}, kv max {_fmt(x.kv_cache_usage_max, '%')}, gen "
        f"{_fmt(x.generation_tokens_per_s, 'rate')} tok/s, prompt "
        f"{_fmt(x.prompt_tokens_per_s, 'rate')} tok/s, failed {_fmt(x.failed)}"
        for x in m.models)
    flags = f"; {len(m.flags)} flag(s): " + ", ".join(
        f"{f.kind} {f.model}#{_fmt(f.id)}" for f in m.flags[:5]) + (
        ", ..." if len(m.flags) > 5 else "") if m.flags else ""
    return f"aegis: metrics {when}: {models}{flags}"


def rich_view(m: Metrics, *, height: int | None = None):
    """The --watch screen on a terminal (rich): models, routers and flags, then as many
    instances as fit, flagged first."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text(f"aegis metrics  {m.run_dir}  {time.strftime('%H:%M:%S', time.localtime(m.at))}"
                f"  {m.answered}/{len(m.instances)} answered in {m.seconds:.2f}s"
                + (f"  rates over {_seconds(m.interval)}" if m.interval else ""),
                style="bold")
    models = Table(box=None, header_style="bold", pad_edge=False)
    for c in MODEL_COLUMNS:
        models.add_column(c, justify="left" if c == "MODEL" else "right")
    for row in model_rows(m):
        models.add_row(*row)
    parts: list = [head, models]
    for line in router_lines(m):
        parts.append(Text(line))
    for f in m.flags[:8]:
        parts.append(Text(f"! {f.kind}: {f.model} #{_fmt(f.id)} {f.message}", style="red"))
    if len(m.flags) > 8:
        parts.append(Text(f"! ... {len(m.flags) - 8} more", style="red"))
    room = None if height is None else max(3, height - 8 - len(m.models) - len(m.routers)
                                           - min(len(m.flags), 9))
    table = Table(box=None, header_style="bold", pad_edge=False)
    for c in INSTANCE_COLUMNS:
        table.add_column(c, justify="left" if c in ("MODEL", "HOST", "SCRAPE") else "right",
                         overflow="ellipsis", no_wrap=True)
    flagged = {(f.model, f.id, f.url) for f in m.flags}
    rows = instance_rows(m, room)
    for row, inst in zip(rows, sorted(m.instances, key=lambda i: (
            (i.model, i.id, i.url) not in flagged, i.model, i.id if i.id is not None else -1))):
        table.add_row(*row, style="red" if (inst.model, inst.id, inst.url) in flagged else None)
    parts.append(table)
    if room is not None and len(m.instances) > room:
        parts.append(Text(f"... {len(m.instances) - room} more instance(s)", style="dim"))
    return Group(*parts)


__all__ = ["Metrics", "ModelMetrics", "InstanceMetrics", "RouterMetrics", "Flag", "metrics",
           "watch", "Scraper", "read_instance", "MetricsTextError", "DEFAULT_TIMEOUT",
           "DEFAULT_CONCURRENCY"]
