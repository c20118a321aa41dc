"""`aegis metrics`: vLLM's /metrics read right (names old and new, a real capture), totals
that are the sum of the instances' own counters, rates between two scrapes (never negative,
also across a restart), outliers flagged, and attacks on the scraper: a /metrics that hangs,
trickles, is huge, is not Prometheus text, not UTF-8, holds NaN or Inf; 1,000 instances of
which 10 hang. Stand-in servers (tests/standin_vllm.py) listed in a run directory the test
writes (tests/metrics_fleet.py); the launcher end to end (prometheus-targets.json, the
routers' exporters) with tests/unit/test_launch_run.py's Run."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import stat
import time
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from aegis.cli import main
from aegis.clients import Run
from aegis.clients import metrics as M
from aegis.config import ConfigError
from aegis.run import RunError
from harness import until
from metrics_fleet import MetricsFleet
from test_launch_run import Run as LaunchRun
from test_launch_run import _no_strays, processes_with  # noqa: F401 (autouse: no strays)

ROOT = Path(__file__).resolve().parents[2]
REAL = (ROOT / "tests" / "data" / "vllm-0.32.0-metrics.txt").read_bytes()
ROUTER_TEXT = (ROOT / "tests" / "data" / "vllm-router-0.1.17-metrics.txt").read_bytes()
SCHEMA = json.loads((ROOT / "docs" / "schemas" / "metrics.schema.json").read_text())


def check_schema(doc) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)


@pytest.fixture(autouse=True)
def _fresh_parse_cache():
    M._PARSED.clear()
    yield
    M._PARSED.clear()


@pytest.fixture
def fleets(tmp_path):
    made = []

    def make(*args, **kwargs):
        sub = tmp_path / f"fleet{len(made)}"
        sub.mkdir()
        fleet = MetricsFleet(sub, *args, **kwargs)
        made.append(fleet)
        return fleet, Run.open(fleet.run_dir)

    yield make
    for fleet in made:
        fleet.close()


# ------------------------------------------------------------------ reading the text (pure)


def test_a_real_vllm_0_32_text_reads_as_the_whole_text_parsed_says():
    """The captured text of a real vLLM 0.32 instance (tests/data): the selected lines give
    what prometheus_client's parser makes of the whole text."""
    from prometheus_client.parser import text_string_to_metric_families

    whole = {}
    for family in text_string_to_metric_families(REAL.decode()):
        for s in family.samples:
            whole.setdefault(s.name, []).append((s.labels, s.value))

    def total(name):
        return sum(v for _, v in whole[name])

    r = M.read_instance(REAL)
    assert r.running == total("vllm:num_requests_running")
    assert r.waiting == total("vllm:num_requests_waiting")
    assert r.kv_cache_usage == total("vllm:kv_cache_usage_perc")
    assert r.prompt_tokens == total("vllm:prompt_tokens_total") == 4684
    assert r.generation_tokens == total("vllm:generation_tokens_total") == 5470
    assert r.finished == {lab["finished_reason"]: v
                          for lab, v in whole["vllm:request_success_total"]}
    assert r.finished["length"] == 47
    assert r.http == {"2xx": 47, "4xx": 31}
    assert r.prefix_cache_queries == total("vllm:prefix_cache_queries_total")
    assert r.prefix_cache_hits == total("vllm:prefix_cache_hits_total")
    assert r.rejected == total("vllm:admission_rejections_total") == 0
    assert r.started == total("process_start_time_seconds")
    assert r.problems == []
    # the lines picked are exactly the samples of those names in the text
    names = {n for group in M.INSTANCE_NAMES for n in group}
    picked = M.select_lines(REAL, M._INSTANCE_LINES)
    assert len(picked) == sum(len(v) for k, v in whole.items() if k in names)


def test_older_vllm_names_are_read_too():
    old = (REAL.replace(b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")
           .replace(b"vllm:prefix_cache_", b"vllm:gpu_prefix_cache_")
           .replace(b'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.0',
                    b"").replace(b'vllm:gpu_cache_usage_perc{engine="0",model_name="tiny"} 0.0',
                                 b'vllm:gpu_cache_usage_perc{engine="0",model_name="tiny"} 0.5'))
    r = M.read_instance(old)
    assert r.kv_cache_usage == 0.5
    assert r.prefix_cache_queries == 4684 and r.prefix_cache_hits == 0
    # vLLM's V0 engine: a hit-rate gauge and no counters
    v0 = (b'vllm:num_requests_running{model_name="x"} 2.0\n'
          b'vllm:num_requests_waiting{model_name="x"} 0.0\n'
          b'vllm:gpu_cache_usage_perc{model_name="x"} 0.25\n'
          b'vllm:gpu_prefix_cache_hit_rate{model_name="x"} 0.75\n')
    r = M.read_instance(v0)
    assert (r.running, r.kv_cache_usage, r.prefix_hit_rate_gauge) == (2, 0.25, 0.75)
    rec = M.instance_record(_target(), r, at=1.0, seconds=0.1)
    assert rec.prefix_cache_hit_rate == 0.75 and rec.prompt_tokens is None


def test_engines_are_summed_and_the_fullest_kv_cache_counts():
    text = (b'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
            b'vllm:num_requests_running{engine="1",model_name="m"} 4.0\n'
            b'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2\n'
            b'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.9\n'
            b'vllm:generation_tokens_total{engine="0",model_name="m"} 10\n'
            b'vllm:generation_tokens_total{engine="1",model_name="m"} 5\n')
    r = M.read_instance(text)
    assert (r.running, r.kv_cache_usage, r.generation_tokens) == (7, 0.9, 15)


@pytest.mark.parametrize("body, why", [
    (b"<html><body>Welcome to nginx!</body></html>\n", "not Prometheus text"),
    (b'{"object": "list", "data": []}', "not Prometheus text"),
    (b"", "an empty answer"),
    (b"   \n\n", "an empty answer"),
    (ROUTER_TEXT, "without vLLM's metrics: is this vLLM?"),
    (b"process_start_time_seconds 1.7e9\n", "without vLLM's request metrics"),
    (b'vllm:num_requests_running{model_name="\xff\xfe"} 1.0\n', "not UTF-8 (byte 0xff"),
    (b'vllm:num_requests_running{model_name="m" 1.0\n', "not Prometheus text"),
    (b"vllm:num_requests_running 1.0 2.0 3.0 x\n", "not Prometheus text"),
])
def test_what_is_not_vllms_text_says_why(body, why):
    with pytest.raises(M.MetricsTextError) as err:
        M.read_instance(body)
    assert why in str(err.value)
    assert "\n" not in str(err.value)


def test_bytes_that_are_not_utf8_outside_the_lines_read_do_not_matter():
    body = REAL.replace(b"# HELP vllm:num_requests_running", b"# HELP \xff\xfe", 1)
    assert M.read_instance(body).prompt_tokens == 4684


def test_nan_inf_and_negative_values_are_not_numbers_and_say_so():
    text = (b'vllm:num_requests_running{engine="0"} 1.0\n'
            b'vllm:kv_cache_usage_perc{engine="0"} NaN\n'
            b'vllm:num_requests_waiting{engine="0"} +Inf\n'
            b'vllm:generation_tokens_total{engine="0"} -Inf\n'
            b'vllm:prompt_tokens_total{engine="0"} -3\n'
            b'vllm:request_success_total{finished_reason="stop"} NaN\n'
            b'vllm:prefix_cache_queries_total{engine="0"} 1e400\n')
    r = M.read_instance(text)
    assert r.running == 1
    assert r.kv_cache_usage is r.waiting is r.generation_tokens is r.prompt_tokens is None
    assert r.finished is None and r.prefix_cache_queries is None
    assert any("kv_cache_usage_perc is NaN" in p for p in r.problems)
    assert any("num_requests_waiting is +Inf" in p for p in r.problems)
    assert any("prompt_tokens_total is negative" in p for p in r.problems)
    rec = M.instance_record(_target(), r, at=1.0, seconds=0.1)
    flags = M.find_flags([rec])
    assert [f.kind for f in flags] == ["bad_values"]
    json.dumps(rec.to_dict(), allow_nan=False)  # no NaN reaches JSON


@pytest.mark.parametrize("body, expect", [
    (b"vllm:num_requests_running 1\r\nvllm:num_requests_waiting 2\r\n", (1, 2)),
    (b"vllm:num_requests_running 1\nvllm:num_requests_waiting 2", (1, 2)),  # no last newline
    (b"vllm:num_requests_running_other 5\nvllm:num_requests_running 1\n"
     b"vllm:num_requests_waiting_by_reason{reason=\"x\"} 9\nvllm:num_requests_waiting 2\n", (1, 2)),
    (b"# HELP vllm:num_requests_running 7\nvllm:num_requests_running{a=\"vllm:num_requests_"
     b"waiting 3\"} 1\nx vllm:num_requests_waiting 8\nvllm:num_requests_waiting\t2\n", (1, 2)),
    (b"vllm:num_requests_running 1\nother 0\nvllm:num_requests_running 2\n"
     b"vllm:num_requests_waiting 0\n", (1, 0)),  # one block per family, as the format says
    (b"vllm:num_requests_waiting 4\nvllm:num_requests_running 1\n", (1, 4)),  # any order
])
def test_line_selection_takes_sample_lines_only(body, expect):
    r = M.read_instance(body)
    assert (r.running, r.waiting) == expect


def test_the_text_picked_as_it_arrives_in_any_pieces_is_the_same():
    import random

    whole = M.select_lines(REAL, M._INSTANCE_LINES)
    rng = random.Random(7)
    for sizes in ([1], [7], [100, 3], [4096], [M.PICK_BLOCK], [len(REAL)], None):
        picker, at = M.Picker(M._INSTANCE_LINES), 0
        while at < len(REAL):
            size = rng.randint(1, 3000) if sizes is None else sizes[at % len(sizes)]
            picker.feed(REAL[at:at + size])
            at += size
        assert picker.lines() == whole, sizes


def test_a_family_cut_between_two_blocks_is_read_whole():
    """A text longer than PICK_BLOCK is looked at block by block: a family whose lines
    straddle the cut is read whole, and names are found in any order across blocks."""
    whole = M.select_lines(REAL, M._INSTANCE_LINES)
    at = REAL.index(b"vllm:request_success_total{")
    for shift in range(-300, 300, 37):
        padding = b"# " + b"p" * (M.PICK_BLOCK - at - 3 + shift) + b"\n"
        body = padding + REAL
        picker = M.Picker(M._INSTANCE_LINES)
        for k in range(0, len(body), 1000):
            picker.feed(body[k:k + 1000])
        assert sorted(picker.lines()) == sorted(whole), shift


def test_what_a_hostile_text_can_make_the_picker_hold_is_bounded():
    long_other = b'vllm:cache_config_info{x="' + b"a" * (200 << 10) + b'"} 1.0\n'
    body = long_other + REAL + long_other
    picker = M.Picker(M._INSTANCE_LINES)
    for at in range(0, len(body), 1000):
        picker.feed(body[at:at + 1000])
        assert len(picker.carry) <= M.MAX_LINE and picker.pending_bytes <= M.PICK_BLOCK + 1000
    assert picker.lines() == M.select_lines(REAL, M._INSTANCE_LINES)  # the long one skipped
    long_ours = b'vllm:num_requests_running{x="' + b"a" * (100 << 10) + b'"} 1.0\n'
    with pytest.raises(M.MetricsTextError, match="a line of vllm:num_requests_running longer "
                                                 "than 64 KiB"):
        M.read_instance(long_ours)
    many = b'vllm:num_requests_running{engine="0"} 1.0\n' * (M.MAX_SAMPLES + 1)
    with pytest.raises(M.MetricsTextError, match="more than 2000 samples or 256 KiB"):
        M.read_instance(many)
    wide = (b'vllm:num_requests_running{x="' + b"a" * (60 << 10) + b'"} 1.0\n') * 5
    with pytest.raises(M.MetricsTextError, match="more than 2000 samples or 256 KiB"):
        M.read_instance(wide)


def test_a_line_seen_before_is_not_parsed_again_and_gives_the_same():
    first = M.read_instance(REAL)
    assert M._PARSED
    assert M.read_instance(REAL) == first
    M._PARSED_MAX, saved = 3, M._PARSED_MAX
    try:  # a full cache is emptied, not grown
        assert M.read_instance(REAL) == first
    finally:
        M._PARSED_MAX = saved


# ------------------------------------------------------------------ rates, totals, flags (pure)


def _target(i=0, model="m"):
    return {"model": model, "id": i, "node": 0, "host": "h", "url": f"http://h:{i}/metrics",
            "state": "ready"}


def _reading(**values):
    base = dict(running=1, waiting=0, kv_cache_usage=0.5, prompt_tokens=100,
                generation_tokens=1000, finished={"stop": 5, "length": 5, "abort": 1,
                                                  "error": 0}, http={"2xx": 10, "5xx": 2},
                rejected=0, prefix_cache_hits=20, prefix_cache_queries=100, started=1000.0)
    base.update(values)
    return M._Reading(**base)


def test_rates_between_two_scrapes():
    before = M.instance_record(_target(), _reading(), at=100.0, seconds=0.01)
    after = M.instance_record(_target(), _reading(
        prompt_tokens=300, generation_tokens=1500, prefix_cache_hits=70, prefix_cache_queries=200,
        finished={"stop": 10, "length": 10, "abort": 1, "error": 0}), at=110.0, seconds=0.01,
        previous=before)
    assert after.prompt_tokens_per_s == 20.0 and after.generation_tokens_per_s == 50.0
    assert after.requests_per_s == 1.0
    assert after.prefix_cache_hit_rate_interval == 0.5  # 50 of 100 queried since
    assert after.prefix_cache_hit_rate == 0.35 and not after.restarted
    assert before.prompt_tokens_per_s is None  # one scrape: no rate
    assert (after.succeeded, after.aborted, after.failed) == (20, 1, 2)


def test_counters_that_go_backwards_are_a_restart_and_rates_never_go_negative():
    before = M.instance_record(_target(), _reading(), at=100.0, seconds=0.01)
    after = M.instance_record(_target(), _reading(prompt_tokens=40, generation_tokens=10,
                                                  prefix_cache_queries=10, prefix_cache_hits=0),
                              at=110.0, seconds=0.01, previous=before)
    assert after.restarted
    assert after.prompt_tokens_per_s == 4.0 and after.generation_tokens_per_s == 1.0
    assert after.prefix_cache_hit_rate_interval == 0.0
    assert [f.kind for f in M.find_flags([after])] == ["restarted"]
    # a new process whose counters already passed the old ones: still a restart
    quick = M.instance_record(_target(), _reading(prompt_tokens=5000, started=2000.0),
                              at=110.0, seconds=0.01, previous=before)
    assert quick.restarted and quick.prompt_tokens_per_s == 500.0
    # one of two counters going back is enough
    half = M.instance_record(_target(), _reading(prompt_tokens=150, generation_tokens=10,
                                                 started=None), at=110.0, seconds=0.01,
                             previous=M.instance_record(_target(), _reading(started=None),
                                                        at=100.0, seconds=0.01))
    assert half.restarted and half.prompt_tokens_per_s == 15.0
    for rec in (after, quick, half):
        assert all(v is None or v >= 0 for k, v in rec.to_dict().items() if k.endswith("_s"))


def test_no_rate_against_a_failed_scrape_or_no_time():
    failed = M.instance_record(_target(), None, scrape=M.TIMEOUT, error="x", at=100.0,
                               seconds=2.0)
    after = M.instance_record(_target(), _reading(), at=110.0, seconds=0.01, previous=failed)
    assert after.prompt_tokens_per_s is None
    before = M.instance_record(_target(), _reading(), at=110.0, seconds=0.01)
    same = M.instance_record(_target(), _reading(prompt_tokens=200), at=110.0, seconds=0.01,
                             previous=before)
    assert same.prompt_tokens_per_s is None  # no time between them (a clock step back too)


def test_model_totals_are_sums_of_the_instances_and_skip_failed_scrapes():
    recs = [M.instance_record(_target(i), _reading(running=i, waiting=2 * i,
                                                   kv_cache_usage=0.1 * i, prompt_tokens=10 * i,
                                                   prefix_cache_hits=i, prefix_cache_queries=4 * i),
                              at=1.0, seconds=0.1) for i in range(1, 4)]
    recs.append(M.instance_record(_target(9), None, scrape=M.TIMEOUT, error="x", at=1, seconds=2))
    m = M.model_totals("m", recs)
    assert (m.instances, m.answered) == (4, 3)
    assert (m.running, m.waiting, m.prompt_tokens) == (6, 12, 60)
    assert m.kv_cache_usage_max == pytest.approx(0.3)
    assert m.kv_cache_usage_mean == pytest.approx(0.2)
    assert m.finished == {"stop": 15, "length": 15, "abort": 3, "error": 0}
    assert (m.succeeded, m.aborted, m.failed) == (30, 3, 6)
    assert m.prefix_cache_hit_rate == 0.25
    assert m.prompt_tokens_per_s is None  # nobody has a rate yet


def test_outliers_are_flagged():
    def rec(i, **kw):
        return M.instance_record(_target(i), _reading(**kw), at=1.0, seconds=0.1)

    recs = [rec(0, running=0, waiting=0), rec(1, running=8, waiting=5),
            rec(2, running=3, waiting=0, kv_cache_usage=1.0), rec(3, running=0, waiting=0),
            M.instance_record(_target(4), None, scrape=M.TIMEOUT, error="no answer within 2s",
                              at=1.0, seconds=2.0),
            M.instance_record(_target(5), None, scrape=M.BAD_METRICS, error="not UTF-8",
                              at=1.0, seconds=0.1),
            rec(6, running=None, waiting=None)]  # unknown is not idle
    flags = {(f.kind, f.id) for f in M.find_flags(recs)}
    assert flags == {("idle_while_others_queue", 0), ("idle_while_others_queue", 3),
                     ("kv_cache_full", 2), ("not_answering", 4), ("bad_metrics", 5)}
    # nobody queues: an idle instance is just idle
    quiet = [rec(0, running=0, waiting=0), rec(1, running=2, waiting=0)]
    assert M.find_flags(quiet) == []
    # another model's queue is not this one's
    other = [rec(0, running=0, waiting=0),
             M.instance_record(_target(1, "other"), _reading(waiting=9), at=1, seconds=0.1)]
    assert M.find_flags(other) == []


def test_the_router_exporters_text_is_read():
    r = type("R", (), {"model": "m", "state": "ready"})()
    rec = M.router_record(r, "http://127.0.0.1:1/metrics", ROUTER_TEXT, scrape=M.OK, at=10.0)
    assert (rec.requests, rec.request_errors, rec.retries) == (5, 0, 0)
    assert (rec.active_workers, rec.healthy_workers) == (2, 2)
    assert sorted(rec.processed.values()) == [2, 3]
    later = M.router_record(r, "u", ROUTER_TEXT.replace(b'route="/v1/completions"} 5',
                                                        b'route="/v1/completions"} 25'),
                            scrape=M.OK, at=20.0, previous=rec)
    assert later.requests_per_s == 2.0
    bad = M.router_record(r, "u", REAL, scrape=M.OK)
    assert bad.scrape == "bad_metrics" and "is this vllm-router?" in bad.error


# ------------------------------------------------------------------ over HTTP (stand-ins)


def test_totals_equal_the_sum_of_each_instances_own_counters(fleets):
    fleet, run = fleets({"a": 3, "b": 2})
    own = {}  # instance -> what its answers said it used
    for i in range(5):
        answers = fleet.complete(i, n=i + 1, words=2 + i, max_tokens=3 * i + 1)
        own[i] = (sum(a["usage"]["prompt_tokens"] for a in answers),
                  sum(a["usage"]["completion_tokens"] for a in answers), len(answers))
    fleet.complete(4, 2, status=503)
    got = run.metrics()
    check_schema(got.to_dict())
    assert got.answered == 5 and got.flags == []
    by_id = {i.id: i for i in got.instances}
    for i, (prompt, generated, done) in own.items():
        assert (by_id[i].prompt_tokens, by_id[i].generation_tokens) == (prompt, generated)
        assert by_id[i].finished["length"] == done
    for model, ids in (("a", [0, 1, 2]), ("b", [3, 4])):
        m = got.model(model)
        assert m.instances == m.answered == len(ids)
        assert m.prompt_tokens == sum(own[i][0] for i in ids)
        assert m.generation_tokens == sum(own[i][1] for i in ids)
        assert m.succeeded == sum(own[i][2] for i in ids)
    assert got.model("b").failed == 2 and got.model("a").failed == 0


def test_rates_between_two_scrapes_over_http(fleets):
    fleet, run = fleets(2)
    first = run.metrics()
    fleet.complete(0, n=4, words=5, max_tokens=10)
    time.sleep(0.2)
    second = run.metrics(previous=first)
    check_schema(second.to_dict())
    one = next(i for i in second.instances if i.id == 0)
    before = next(i for i in first.instances if i.id == 0)
    assert second.interval > 0.2
    assert one.generation_tokens_per_s * (one.at - before.at) == pytest.approx(40)
    assert one.prompt_tokens_per_s * (one.at - before.at) == pytest.approx(20)
    assert second.model("m").generation_tokens_per_s == pytest.approx(
        one.generation_tokens_per_s)  # the other instance made none
    with pytest.raises(ConfigError):
        run.metrics(previous={"not": "a scrape"})


def test_a_restarted_instance_has_no_negative_rate(fleets):
    fleet, run = fleets(1)
    fleet.complete(0, n=5, words=10, max_tokens=10)
    first = run.metrics()
    fleet.control(0, reset=True)  # a restart: counters from 0, a new start time
    fleet.complete(0, n=1, words=1, max_tokens=2)
    second = run.metrics(previous=first)
    (inst,) = second.instances
    assert inst.restarted and inst.generation_tokens == 2
    assert inst.generation_tokens_per_s >= 0 and inst.prompt_tokens_per_s >= 0
    assert [f.kind for f in second.flags] == ["restarted"]


def test_a_hung_instance_costs_its_timeout_and_no_more(fleets):
    fleet, run = fleets(5)
    fleet.control(2, fault="hang")
    t0 = time.monotonic()
    got = run.metrics(timeout=1.0)
    took = time.monotonic() - t0
    assert 1.0 <= got.seconds < 1.8 and took < 3.0, (got.seconds, took)
    assert got.answered == 4
    (flag,) = got.flags
    assert (flag.kind, flag.id) == ("not_answering", 2)
    assert flag.message == "no answer within 1s"
    hung = next(i for i in got.instances if i.id == 2)
    assert hung.scrape == "timeout" and hung.running is None
    check_schema(got.to_dict())


def test_attacks_on_the_scraper_are_flagged_and_the_others_reported(fleets):
    faults = ["drip", "huge", "html", "not-utf8", "nan", "empty", "status-500", "old-names",
              "slow:0.3", "", "huge-chunked"]
    fleet, run = fleets(len(faults))
    for i, fault in enumerate(faults):
        fleet.control(i, fault=fault or None, set={"kv": 0.5})
    t0 = time.monotonic()
    got = run.metrics(timeout=3)
    assert time.monotonic() - t0 < 6
    by_id = {i.id: i for i in got.instances}
    flags = {f.id: f for f in got.flags}
    expect = {0: ("not_answering", "no answer within 3s"),
              1: ("bad_metrics", "larger than 16 MiB"),
              2: ("bad_metrics", "not Prometheus text (Content-Type text/html)"),
              3: ("bad_metrics", "not UTF-8"),
              4: ("bad_values", "is NaN"),
              5: ("bad_metrics", "an empty answer"),
              6: ("bad_metrics", "HTTP 500"),
              10: ("bad_metrics", "larger than 16 MiB")}
    for i, (kind, text) in expect.items():
        assert flags[i].kind == kind and text in flags[i].message, (i, flags[i])
    assert by_id[6].scrape == "http_error"
    assert by_id[4].ok and by_id[4].kv_cache_usage is None and by_id[4].running == 0
    for i in (7, 8, 9):  # old names, slow but in time, plain: read, not flagged
        assert by_id[i].ok and by_id[i].kv_cache_usage == 0.5 and i not in flags
    assert got.answered == 4  # nan, old-names, slow, plain
    check_schema(got.to_dict())


def test_the_key_goes_with_every_scrape_and_no_proxy_is_used(fleets, monkeypatch):
    fleet, run = fleets(2, args=("--metrics-needs-key",))
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    got = run.metrics()
    assert got.answered == 2 and got.flags == []
    # a key the servers refuse is said so
    bad, bad_run = fleets(1, args=("--metrics-needs-key",), key="x" * 40)
    Path(bad_run.layout.api_key).write_text("y" * 40)  # not the servers' key
    got = bad_run.metrics()
    (flag,) = got.flags
    assert flag.kind == "bad_metrics" and "HTTP 401 (the server refused the run's key)" in \
        flag.message


def test_a_thousand_instances_with_ten_hung(fleets):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2400:
        pytest.fail(f"the open-files limit ({hard}) is too low for 1,000 stand-in servers")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    try:
        fleet, run = fleets(1000)
        hung = list(range(5, 1000, 100))
        for i in hung:
            fleet.control(i, fault="hang")
        got = run.metrics(timeout=2.0)
        assert got.answered == 990
        assert sorted(f.id for f in got.flags if f.kind == "not_answering") == hung
        assert len(got.flags) == 10
        # every request started at once: the hung ones cost their timeout, once
        assert got.seconds < 2.0 + 2.5, got.seconds
        assert got.model("m").answered == 990 and got.model("m").instances == 1000
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_concurrency_is_bounded_by_the_open_files_limit(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda what: (512, 4096))
    assert M._usable_concurrency(1000) == 448
    assert M._usable_concurrency(10) == 10
    monkeypatch.setattr(resource, "getrlimit", lambda what: (60, 60))
    assert M._usable_concurrency(1000) == 1


def test_called_from_async_code(fleets):
    """A Jupyter cell runs in an event loop: run.metrics() still works there."""
    fleet, run = fleets(1)

    async def cell():
        return run.metrics()

    assert asyncio.run(cell()).answered == 1


def test_watch_gives_rates_from_the_second_scrape(fleets):
    fleet, run = fleets(2)
    got = []
    for m in M.watch(run, 0.2, count=3):
        got.append(m)
        fleet.complete(1, n=2, max_tokens=5)
    assert [m.interval is None for m in got] == [True, False, False]
    assert got[0].instances[1].generation_tokens_per_s is None
    assert got[2].model("m").generation_tokens_per_s > 0
    assert all(0.15 < m.interval < 2 for m in got[1:])
    with pytest.raises(ConfigError):
        next(M.watch(run, 0))


def test_options_are_checked(fleets):
    fleet, run = fleets(1)
    for bad in ({"timeout": 0}, {"timeout": float("nan")}, {"timeout": float("inf")},
                {"concurrency": 0}, {"timeout": "2"}):
        with pytest.raises(ConfigError):
            run.metrics(**bad)


# ------------------------------------------------------------------ the command


def test_cli_one_scrape_as_a_table_and_as_json(fleets):
    fleet, run = fleets(3)
    fleet.control(1, set={"waiting": 3})
    fleet.complete(0, 2)
    result = CliRunner().invoke(main, ["metrics", str(fleet.run_dir)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "3/3 instance(s) answered" in out and "rates need a second scrape" in out
    assert "MODEL" in out and "PROMPT TOK/S" in out
    assert "flag idle_while_others_queue: m instance 0" in out
    result = CliRunner().invoke(main, ["metrics", str(fleet.run_dir), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    check_schema(doc)
    assert doc["answered"] == 3 and doc["models"][0]["waiting"] == 3


def test_cli_watch_without_a_terminal_prints_lines_and_json_lines(fleets):
    fleet, run = fleets(2)
    result = CliRunner().invoke(main, ["metrics", str(fleet.run_dir), "--watch", "0.1",
                                       "--count", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("aegis: metrics ") for line in lines)
    assert "m: 2/2 up, run 0, wait 0" in lines[-1] and "gen 0.0 tok/s" in lines[-1]
    result = CliRunner().invoke(main, ["metrics", str(fleet.run_dir), "--watch", "0.1",
                                       "--count", "2", "--json"])
    assert result.exit_code == 0, result.output
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(docs) == 2 and docs[0]["interval"] is None and docs[1]["interval"] > 0
    for doc in docs:
        check_schema(doc)


def test_cli_watch_in_a_log_says_each_flag_when_it_comes_not_every_scrape(fleets):
    fleet, run = fleets(2)
    fleet.control(0, set={"kv": 1.0})
    result = CliRunner().invoke(main, ["metrics", str(fleet.run_dir), "--watch", "0.1",
                                       "--count", "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("flag kv_cache_full: m instance 0") == 1
    assert result.stdout.count("1 flag(s): kv_cache_full m#0") == 3
    first = run.metrics()
    fleet.control(0, set={"kv": 0.2})
    raised, cleared = M.flag_changes(first, run.metrics())
    assert raised == [] and [(f.kind, f.id) for f in cleared] == [("kv_cache_full", 0)]


def test_cli_watch_on_a_terminal_redraws_in_place(fleets):
    """On a terminal (a pty here) --watch draws with rich: the screen is redrawn, not
    appended to, and Ctrl-C (here --count) ends it with exit 0."""
    import pty
    import subprocess
    import sys

    fleet, run = fleets(3)
    fleet.control(2, fault="hang")
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "aegis.cli", "metrics", str(fleet.run_dir),
                             "--watch", "0.2", "--count", "3", "--timeout", "0.5"],
                            stdin=secondary, stdout=secondary, stderr=secondary,
                            env={**os.environ, "COLUMNS": "160", "LINES": "30",
                                 "TERM": "xterm-256color"}, close_fds=True)
    os.close(secondary)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=30) == 0, out.decode(errors="replace")
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
    text = out.decode(errors="replace")
    assert "aegis metrics" in text and "2/3 answered" in text
    assert "not_answering" in text and "GEN TOK/S" in text
    assert "\x1b[" in text  # drawn with escape sequences (cursor moves), not plain lines
    assert "aegis: metrics " not in text  # not the log form


def test_cli_bad_input_and_nothing_ready(fleets, tmp_path):
    result = CliRunner().invoke(main, ["metrics", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run directory" in result.output
    fleet, run = fleets(2)
    result = CliRunner().invoke(main, ["metrics", str(fleet.run_dir), "--count", "2"])
    assert result.exit_code == 2 and "--count: only with --watch" in result.output
    for flag in (["--timeout", "0"], ["--timeout", "nan"], ["--watch", "-1"],
                 ["--concurrency", "0"]):
        result = CliRunner().invoke(main, ["metrics", str(fleet.run_dir), *flag])
        assert result.exit_code == 2, (flag, result.output)
    for inst in fleet.instances:
        inst["state"] = "starting"
    fleet.write(launcher_state="starting")
    result = CliRunner().invoke(main, ["metrics", str(fleet.run_dir)])
    assert result.exit_code == 1
    assert "aegis: error: nothing of this run is ready (starting: 0 of 2 instance(s) ready)" \
        in result.output and "aegis wait" in result.output
    with pytest.raises(RunError, match="nothing of this run is ready"):
        run.metrics()
    fleet.write(launcher_state="stopped")
    result = CliRunner().invoke(main, ["metrics", str(fleet.run_dir)])
    assert result.exit_code == 1 and "the run ended" in result.output


def test_cli_none_answering_is_exit_1(fleets):
    fleet, run = fleets(2)
    for i in range(2):
        fleet.control(i, fault="status-500")
    result = CliRunner().invoke(main, ["metrics", str(fleet.run_dir), "--instances", "0"])
    assert result.exit_code == 1
    assert "none of the 2 ready instance(s) answered /metrics" in result.output
    assert result.stdout.count("flag bad_metrics") == 2


def test_routers_metrics_from_another_host_are_remote_not_a_failure(fleets):
    from aegis.launch.router import free_local_port

    routers = [{"model": "m", "url": "http://nodeX:9000/v1", "host": "nodeX", "node": 0,
                "port": 9000, "state": "ready", "workers": 2, "restarts": 0, "error": "",
                "metrics_port": free_local_port()},
               {"model": "n", "url": "http://nodeX:9001/v1", "host": "nodeX", "node": 0,
                "port": 9001, "state": "ready", "workers": 2, "restarts": 0, "error": ""}]
    fleet, run = fleets({"m": 1, "n": 1}, routers=routers)
    fleet.write(host="some-other-node.example")
    got = run.metrics()
    by_model = {r.model: r for r in got.routers}
    assert by_model["m"].scrape == "remote"
    assert "listens on 127.0.0.1 of some-other-node.example only" in by_model["m"].error
    assert by_model["n"].scrape == "not_recorded"
    assert got.answered == 2 and got.flags == []
    check_schema(got.to_dict())
    # on the launcher's host: scraped, and a port with nothing behind it is unreachable
    fleet.write()
    got = run.metrics(timeout=1)
    assert {r.model: r.scrape for r in got.routers} == {"m": "unreachable",
                                                        "n": "not_recorded"}
    assert got.flags == []  # a router is not an instance: reported, not flagged


# ------------------------------------------------------------------ the launcher end to end


def test_targets_file_follows_the_instances_and_the_routers_exporter_is_scraped(tmp_path):
    """A real launch (stand-ins, a real vllm-router): prometheus-targets.json lists the ready
    instances and follows one going unhealthy and back; the router's record names its
    exporter's port and `aegis metrics` reads it; the file is empty once the launch stops."""
    from aegis.launch.router import router_installed

    assert router_installed(), "vllm-router is not installed (scripts/setup-dev)"
    launch = LaunchRun(tmp_path, [{"name": "m", "served_model_name": "m", "instances": 2}],
                       restart_backoff=0.2)
    proc = launch.start()
    targets = launch.run_dir / "prometheus-targets.json"

    def listed():
        try:
            return sorted(g["targets"][0] for g in json.loads(targets.read_text()))
        except (OSError, ValueError):
            return None

    try:
        doc = launch.wait_endpoints(lambda d: d["launcher"]["state"] == "serving" and
                                    d["routers"] and d["routers"][0]["state"] == "ready",
                                    timeout=60)
        ports = [i["port"] for i in doc["instances"]]
        until(lambda: listed() == [f"127.0.0.1:{p}" for p in ports], 10, "both listed")
        assert stat.S_IMODE(targets.stat().st_mode) == 0o644
        groups = json.loads(targets.read_text())
        assert groups[0]["labels"] == {"job": doc["job"], "model": "m", "node": "0",
                                       "instance": "instance-0000", "host": "127.0.0.1"}
        router = doc["routers"][0]
        assert isinstance(router["metrics_port"], int)
        assert f"--prometheus-port {router['metrics_port']} " in " ".join(
            processes_with("--prometheus-port"))

        run = Run.open(launch.run_dir)
        fleet_key = run.api_key()
        import urllib.request
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(4):
            request = urllib.request.Request(
                run.router_url("m") + "/completions",
                data=json.dumps({"model": "m", "prompt": "a b", "max_tokens": 3}).encode(),
                headers={"Authorization": f"Bearer {fleet_key}",
                         "Content-Type": "application/json"})
            assert opener.open(request, timeout=10).status == 200
        got = run.metrics()
        check_schema(got.to_dict())
        (r,) = got.routers
        assert r.scrape == "ok", r
        assert r.requests >= 4 and r.healthy_workers == 2 and sum(r.processed.values()) >= 4
        # (the launcher's readiness probes add a 1-token completion per instance)
        assert got.model("m").generation_tokens >= 12

        stopped = doc["instances"][0]
        (pid,) = [int(p.split(":")[0]) for p in processes_with(f"--port {stopped['port']} ")
                  if "standin_vllm" in p]
        os.kill(pid, signal.SIGSTOP)
        try:
            until(lambda: listed() == [f"127.0.0.1:{ports[1]}"], 10, "the stopped one leaves")
            got = run.metrics(timeout=1)  # listed unhealthy, still scraped: does not answer
            hung = next(i for i in got.instances if i.id == stopped["id"])
            assert hung.state == "unhealthy" and hung.scrape == "timeout"
        finally:
            os.kill(pid, signal.SIGCONT)
        until(lambda: listed() == [f"127.0.0.1:{p}" for p in ports], 10, "back when it answers")
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=40)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert listed() == []
    assert launch.leftovers() == []


def test_targets_are_pure_ready_instances_with_their_labels():
    from aegis.launch.endpoints import InstanceState
    from aegis.launch.targets import prometheus_targets, render_targets

    def state(i, s, host="node1"):
        return InstanceState(id=i, model="org/m", served_name="m", node=i // 2, host=host,
                             port=8000 + i, state=s, log="")

    groups = prometheus_targets([state(3, "ready", "fe80::1"), state(0, "ready"),
                                 state(1, "unhealthy"), state(2, "starting")], job="4242")
    assert groups == [
        {"targets": ["node1:8000"], "labels": {"job": "4242", "model": "m", "node": "0",
                                                "instance": "instance-0000", "host": "node1"}},
        {"targets": ["[fe80::1]:8003"], "labels": {"job": "4242", "model": "m", "node": "1",
                                                    "instance": "instance-0003",
                                                    "host": "fe80::1"}}]
    assert json.loads(render_targets(groups)) == groups
    assert render_targets([]) == "[]\n"


def test_router_records_the_exporter_port_router_args_may_override():
    from aegis.launch.router import _last_port, router_argv

    assert _last_port(router_argv("h", 1, 29001), "--prometheus-port") == 29001
    assert _last_port(router_argv("h", 1, 29001, ("--prometheus-port", "30000")),
                      "--prometheus-port") == 30000
    assert _last_port(router_argv("h", 1, 29001, ("--prometheus-port=30001",)),
                      "--prometheus-port") == 30001
    assert _last_port(["--prometheus-port", "x"], "--prometheus-port") is None


def test_a_targets_file_that_cannot_be_written_does_not_stop_the_launch(tmp_path):
    from aegis.config import from_mapping
    from aegis.launch.board import Board
    from aegis.launch.endpoints import EndpointsFile, InstanceState
    from aegis.layout import RunLayout
    from aegis.plan import make_plan
    from aegis.platforms import get_platform

    config = from_mapping({"platform": "local", "model": "m", "instances": 1, "router": False})
    endpoints = EndpointsFile(tmp_path / "endpoints.json", run_dir=str(tmp_path), job="j",
                              ranks=1)
    lines = []
    board = Board(config, make_plan(config, get_platform("local")), endpoints,
                  layout=RunLayout(str(tmp_path)), router_host="127.0.0.1",
                  router_node="127.0.0.1", api_key="k" * 43, log=lines.append)
    (tmp_path / "prometheus-targets.json").mkdir()  # cannot be replaced by a file
    board.starting()
    ready = InstanceState(id=0, model="m", served_name="m", node=0, host="h", port=8000,
                          state="ready", log="")
    board.update({0: [ready]})
    board.update({})
    assert len([x for x in lines if "prometheus-targets.json" in x]) == 1  # said once
    (tmp_path / "prometheus-targets.json").rmdir()
    board.update({})  # the next tick writes it
    assert json.loads((tmp_path / "prometheus-targets.json").read_text())[0]["targets"] == \
        ["h:8000"]
    board.finish("stopped", 0)
    assert json.loads((tmp_path / "prometheus-targets.json").read_text()) == []
