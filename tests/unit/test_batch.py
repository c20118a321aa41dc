"""`aegis batch` / `run.batch()` against stand-in servers listed in a hand-written run directory
(tests/batch_fleet.py): exactly once across re-runs and torn output, retries and what is not
retried, the errors file, bad and hostile input refused before anything is sent, endpoints
followed while the batch runs, progress. The launcher end to end (real `aegis launch`, its
router, an instance and the client killed): test_batch_launch.py."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from aegis.cli import main
from aegis.clients import batch as batch_module
from aegis.clients.batch import BatchStopped, _Progress, BatchCounts
from aegis.config import ConfigError
from aegis.clients import Run
from aegis.run import RunError
from batch_fleet import KEY, Fleet, line, output_ids, write_input

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
AEGIS = [sys.executable, "-m", "aegis.cli"]


@pytest.fixture
def fleet(tmp_path):
    made = []

    def make(*args, **kw):
        f = Fleet(tmp_path, *args, **kw)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


BATCH_SCHEMA = json.loads((ROOT / "docs" / "schemas" / "batch-output.schema.json").read_text())


def records(path: Path) -> list[dict]:
    """The lines of an output or errors file, each checked against the published schema."""
    import jsonschema

    out = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    for record in out:
        jsonschema.validate(record, BATCH_SCHEMA, cls=jsonschema.Draft202012Validator)
    return out


def served_by(path: Path) -> set[str]:
    return {r["response"]["body"]["system_fingerprint"] for r in records(path)}


def assert_once(path: Path, n: int) -> None:
    ids = output_ids(path)
    assert sorted(ids) == sorted(f"req-{i}" for i in range(n)), \
        f"{len(ids)} lines, {len(set(ids))} distinct, of {n}"
    assert all(r["response"]["status_code"] == 200 and r["error"] is None
               for r in records(path))


def alive(f: Fleet) -> bool:
    return all(p.poll() is None for p in f.procs)


# ------------------------------------------------------------------ the format, exactly once


def test_every_line_answered_once_in_the_openai_batch_format(fleet, tmp_path):
    f = fleet(2, args=["--delay", "0.01"])
    inp = write_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.jsonl"
    res = invoke("batch", f.run_dir, inp, "-o", out, "--max-in-flight", "3", "--json")
    assert res.exit_code == 0, res.stderr
    assert_once(out, 200)
    first = records(out)[0]
    assert set(first) == {"id", "custom_id", "response", "error"}
    assert set(first["response"]) == {"status_code", "request_id", "body"}
    assert first["response"]["body"]["object"] == "text_completion"
    assert first["response"]["request_id"] == "cmpl-standin"  # the answer's own id
    assert len({r["id"] for r in records(out)}) == 200
    assert served_by(out) == {f"standin-{f.port}", f"standin-{f.port + 1}"}
    counts = json.loads(res.stdout)
    assert counts["done"] == 200 and counts["complete"] and counts["lines"] == 200
    assert "200 done, 0 skipped (already in the output), 0 failed, 0 invalid" in res.stderr
    assert not (tmp_path / "out.errors.jsonl").exists()  # removed when empty
    # again: everything skipped, nothing sent (an instance that crashes on any request)
    f.kill(0)
    f.kill(1)
    f.start(0, ["--fault", "crash-after:1"])
    f.start(1, ["--fault", "crash-after:1"])
    res = invoke("batch", f.run_dir, inp, "-o", out)
    assert res.exit_code == 0, res.stderr
    assert "0 done, 200 skipped" in res.stderr and "resuming: 200 answer(s)" in res.stderr
    assert alive(f) and len(output_ids(out)) == 200


def test_answers_that_are_not_compact_json_are_written_on_one_line(fleet, tmp_path):
    f = fleet(1)
    inp = tmp_path / "in.jsonl"
    inp.write_text(line(0, standin_pretty=True) + "\n" + line(1) + "\n")
    out = tmp_path / "out.jsonl"
    assert Run.open(f.run_dir).batch(inp, out).done == 2
    assert_once(out, 2)
    by_id = {r["custom_id"]: r for r in records(out)}
    assert by_id["req-0"]["response"]["body"] == {**by_id["req-1"]["response"]["body"],
                                                  "created": by_id["req-0"]["response"]["body"]
                                                  ["created"]}


def test_crlf_a_byte_order_mark_and_no_final_newline_are_read(fleet, tmp_path):
    f = fleet(1)
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(line(i) for i in range(5)).encode())
    out = tmp_path / "out.jsonl"
    counts = Run.open(f.run_dir).batch(inp, out)
    assert (counts.done, counts.invalid) == (5, 0)
    assert_once(out, 5)


def test_a_full_disk_stops_the_batch_and_a_resume_finishes_it(fleet, tmp_path):
    """Writes fail (EFBIG under RLIMIT_FSIZE, as ENOSPC would): exit 1 with the reason; what
    was written (maybe with a torn last line) is resumed from."""
    f = fleet(1)
    inp = write_input(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out.jsonl"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    res = subprocess.run([*AEGIS, "batch", str(f.run_dir), str(inp), "-o", str(out), "-q"],
                         env=ENV, capture_output=True, text=True, timeout=60,
                         preexec_fn=small_files)
    assert res.returncode == 1, res.stderr
    assert "cannot write" in res.stderr and "File too large" in res.stderr
    assert "run again with the same -o to resume" in res.stderr
    assert 0 < out.stat().st_size <= 20000
    res = invoke("batch", f.run_dir, inp, "-o", out)
    assert res.exit_code == 0, res.stderr
    assert_once(out, 300)


def test_lines_answered_before_are_skipped_even_if_they_no_longer_check(fleet, tmp_path):
    """A resume against a run that serves the model under another name: what is in the
    output already is not reported again."""
    f = fleet(1)
    inp = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    assert Run.open(f.run_dir).batch(inp, out).done == 3
    write_input(inp, 4, model="renamed")
    counts = Run.open(f.run_dir).batch(inp, out)
    assert (counts.skipped, counts.invalid) == (3, 1)
    (error,) = records(tmp_path / "out.errors.jsonl")
    assert error["custom_id"] == "req-3" and error["error"]["code"] == "unknown_model"


def test_a_torn_last_line_is_dropped_and_answered_again(fleet, tmp_path):
    f = fleet(1)
    inp = write_input(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out.jsonl"
    assert f.run_dir and Run.open(f.run_dir).batch(inp, out).done == 20
    lines = out.read_bytes().splitlines(keepends=True)
    torn = b"".join(lines[:5]) + lines[5][:37]  # a write SIGKILL cut short
    out.write_bytes(torn)
    res = invoke("batch", f.run_dir, inp, "-o", out)
    assert res.exit_code == 0, res.stderr
    assert "dropped a torn last line (37 bytes)" in res.stderr
    assert_once(out, 20)


def test_an_output_that_is_not_ours_is_refused_not_appended_to(fleet, tmp_path):
    f = fleet(1, args=["--fault", "crash-after:1"])
    inp = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    out.write_text('{"custom_id": "a"}\nhello world\n{"custom_id": "b"}\n')
    res = invoke("batch", f.run_dir, inp, "-o", out)
    assert res.exit_code == 2
    assert "line 2 is not an answer this batch wrote" in res.stderr
    assert out.read_text().count("\n") == 3 and alive(f)


def test_duplicates_and_unknown_models_are_error_lines_and_the_rest_proceeds(fleet, tmp_path):
    f = fleet(1)
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([line(0), line(1), line(0), line(2, model="other"),
                              "", line(3, url="/v1/chat/completions",
                                       messages=[{"role": "user", "content": "hi"}])]) + "\n")
    out = tmp_path / "out.jsonl"
    res = invoke("batch", f.run_dir, inp, "-o", out)
    assert res.exit_code == 2, res.stderr  # only the input was wrong
    assert sorted(output_ids(out)) == ["req-0", "req-1", "req-3"]
    errors = records(tmp_path / "out.errors.jsonl")
    assert [(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in errors] == [
        ("req-0", "duplicate_custom_id", 3), ("req-2", "unknown_model", 4)]
    assert "custom_id already on line 1" in errors[0]["error"]["message"]
    assert "input line 4: body.model 'other' is not served by this run (it serves m)" in \
        res.stderr
    assert "2 line(s) not answered" in res.stderr


def test_garbage_input_every_line_reported_with_its_number(fleet, tmp_path):
    f = fleet(1, args=["--fault", "crash-after:1"])
    inp = tmp_path / "in.bin"
    inp.write_bytes(b"\x00\x01\xff\xfe garbage\n" + os.urandom(3000).replace(b"\n", b"\r")
                    + b"\n[1, 2]\n42\n\"text\"\n{\"custom_id\": 7}\n{}\n" + b"[" * 100000 + b"\n")
    out = tmp_path / "out.jsonl"
    res = invoke("batch", f.run_dir, inp, "-o", out)
    assert res.exit_code == 2, res.stderr
    assert "Traceback" not in res.stderr and out.read_text() == ""
    errors = records(tmp_path / "out.errors.jsonl")
    assert [e["error"]["line"] for e in errors] == list(range(1, 9))
    assert {e["error"]["code"] for e in errors} == {"invalid_json", "invalid_line"}
    assert errors[5]["error"]["message"] == "custom_id must be a string, not int"
    assert errors[7]["error"]["message"] == "not JSON (nested too deeply)"
    # the first few on stderr, then a pointer to the errors file
    assert res.stderr.count("input line") == batch_module.SHOWN_INVALID
    assert "more malformed lines: see" in res.stderr
    assert alive(f)


@pytest.mark.parametrize("body, code, message", [
    ({"custom_id": "x" * (10 << 20), "method": "POST", "url": "/v1/completions",
      "body": {"model": "m"}}, "invalid_line", "custom_id is 10485760 characters long"),
    ({"custom_id": ["a"], "method": "POST", "url": "/v1/completions", "body": {}},
     "invalid_line", "custom_id must be a string, not list"),
    ({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": "hi"},
     "invalid_body", "body must be a JSON object, not str"),
    ({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": None},
     "invalid_body", "body must be a JSON object, not null"),
    ({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}},
     "invalid_method", "method 'GET': only POST"),
    ({"custom_id": "a", "method": "POST", "url": "/admin/add_worker", "body": {}},
     "invalid_url", "url '/admin/add_worker': one of"),
    ({"custom_id": "a", "method": "POST", "url": "/v1/completions"},
     "invalid_line", "missing body"),
    ({"custom_id": "a", "method": "POST", "url": "/v1/completions",
      "body": {"model": "m", "stream": True}}, "invalid_body", "streaming is not supported"),
    ({"custom_id": "", "method": "POST", "url": "/v1/completions", "body": {}},
     "invalid_line", "custom_id is 0 characters long"),
])
def test_hostile_lines_are_refused_one_by_one(fleet, tmp_path, body, code, message):
    f = fleet(1)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(body) + "\n" + line(1) + "\n")
    out = tmp_path / "out.jsonl"
    counts = Run.open(f.run_dir).batch(inp, out)
    assert (counts.done, counts.invalid) == (1, 1)
    (error,) = records(tmp_path / "out.errors.jsonl")
    assert error["error"]["code"] == code and message in error["error"]["message"]
    assert error["error"]["line"] == 1
    assert len(json.dumps(error)) < 10000  # a 10 MB custom_id is not copied whole


def test_a_line_over_the_limit_is_skipped_unread_in_bounded_memory(fleet, tmp_path):
    """A 1.5 GB line (sparse: no disk) under a 1 GiB address-space limit: reported, skipped,
    the next line answered."""
    f = fleet(1)
    inp = tmp_path / "in.jsonl"
    with open(inp, "wb") as fh:
        fh.write(b'{"custom_id": "huge", "body": "')
        fh.truncate(1500 << 20)
        fh.seek(0, os.SEEK_END)
        fh.write(b'"}\n' + line(1).encode() + b"\n")
    out = tmp_path / "out.jsonl"

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    res = subprocess.run([*AEGIS, "batch", str(f.run_dir), str(inp), "-o", str(out), "-q"],
                         env=ENV, capture_output=True, text=True, timeout=120,
                         preexec_fn=limit)
    assert res.returncode == 2, res.stderr
    assert "input line 1: longer than 32 MiB; not read" in res.stderr
    assert output_ids(out) == ["req-1"]


# ------------------------------------------------------------------ refused before sending


def test_bad_input_is_refused_before_anything_is_sent(fleet, tmp_path):
    f = fleet(1, args=["--fault", "crash-after:1"])  # any request would end this instance
    inp = write_input(tmp_path / "in.jsonl", 5)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    devnull = tmp_path / "devnull.jsonl"
    devnull.symlink_to("/dev/null")
    (tmp_path / "adir").mkdir()
    cases = [
        ((tmp_path / "nope", inp, "-o", tmp_path / "o1"), "no such run directory"),
        ((f.run_dir, tmp_path / "missing.jsonl", "-o", tmp_path / "o2"),
         "cannot open it (No such file or directory)"),
        ((f.run_dir, tmp_path / "adir", "-o", tmp_path / "o3"), "is a directory; give a JSONL"),
        ((f.run_dir, inp, "-o", tmp_path / "no" / "such" / "dir.jsonl"), "cannot write it"),
        ((f.run_dir, inp, "-o", tmp_path / "adir"), "cannot write it (Is a directory)"),
        ((f.run_dir, inp, "-o", fifo), "is a FIFO; give a regular file"),
        ((f.run_dir, inp, "-o", devnull), "is a character device; give a regular file"),
        ((f.run_dir, inp, "-o", inp), "is the input file"),
        ((f.run_dir, inp, "-o", tmp_path / "o4", "--errors", inp), "is the input file"),
        ((f.run_dir, inp, "-o", tmp_path / "o5", "--errors", fifo), "is a FIFO"),
        ((f.run_dir, inp, "-o", tmp_path / "o6", "--target", "router"), "has no router"),
        ((f.run_dir, inp, "-o", tmp_path / "o7", "--max-in-flight", "0"), "--max-in-flight"),
    ]
    for args, message in cases:
        res = invoke("batch", *args)
        assert res.exit_code == 2, (args, res.stderr)
        assert message in res.stderr, (args, res.stderr)
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert alive(f)
    assert inp.read_text().count("\n") == 5  # never written to


def test_a_run_with_nothing_ready_exits_1_with_the_reason(fleet, tmp_path):
    f = fleet(2)
    f.states = ["starting", "starting"]
    f.write()
    inp = write_input(tmp_path / "in.jsonl", 3)
    res = invoke("batch", f.run_dir, inp, "-o", tmp_path / "out.jsonl")
    assert res.exit_code == 1
    assert "nothing of this run is ready (starting: 0 of 2 instance(s) ready" in res.stderr
    assert "wait for it: aegis wait" in res.stderr
    f.states = ["failed", "starting"]
    f.write(launcher_state="starting")  # still starting: every instance is needed
    res = invoke("batch", f.run_dir, inp, "-o", tmp_path / "out.jsonl")
    assert res.exit_code == 1
    assert "nothing of this run is ready (failed: 1 of 2 instance(s) failed; 2 needed)\n" \
        in res.stderr
    f.write(launcher_state="stopped")
    res = invoke("batch", f.run_dir, inp, "-o", tmp_path / "out.jsonl")
    assert res.exit_code == 1 and "the run ended: the launcher stopped" in res.stderr


def test_two_batches_on_one_output_the_second_is_refused(fleet, tmp_path):
    f = fleet(1, args=["--delay", "0.2"])
    inp = write_input(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out.jsonl"
    first = subprocess.Popen([*AEGIS, "batch", str(f.run_dir), str(inp), "-o", str(out),
                              "--max-in-flight", "2", "-q"], env=ENV, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 30
        while not (out.exists() and out.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        res = invoke("batch", f.run_dir, inp, "-o", out)
        assert res.exit_code == 2 and "another aegis batch is writing it" in res.stderr
        res = invoke("batch", f.run_dir, inp, "-o", tmp_path / "other.jsonl", "--errors",
                     tmp_path / "out.errors.jsonl")
        assert res.exit_code == 2, res.stderr
        assert "errors file" in res.stderr and "another aegis batch is writing it" in res.stderr
        assert first.wait(timeout=60) == 0, first.stderr.read()
    finally:
        first.kill()
    assert_once(out, 40)


def test_strict_stops_at_the_first_bad_line_and_sends_nothing_after_it(fleet, tmp_path):
    f = fleet(1)
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([line(0), line(1), "{not json", *[line(i) for i in range(3, 300)]])
                   + "\n")
    out = tmp_path / "out.jsonl"
    res = invoke("batch", f.run_dir, inp, "-o", out, "--strict")
    assert res.exit_code == 2
    assert "input line 3: not JSON" in res.stderr and "--strict" in res.stderr
    assert set(output_ids(out)) <= {"req-0", "req-1"}
    (error,) = records(tmp_path / "out.errors.jsonl")
    assert error["error"]["line"] == 3


# ------------------------------------------------------------------ failures and retries


def test_transient_5xx_are_retried_and_answered(fleet, tmp_path):
    f = fleet(2, args=["--fault", "flaky:3"])  # every third completion answers 503
    inp = write_input(tmp_path / "in.jsonl", 60)
    out = tmp_path / "out.jsonl"
    counts = Run.open(f.run_dir).batch(inp, out, max_in_flight=2)
    assert counts.done == 60 and counts.failed == 0 and counts.retries >= 15, counts
    assert_once(out, 60)


def test_lasting_5xx_fail_after_the_retries_and_4xx_are_not_retried(fleet, tmp_path):
    f = fleet(1)
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([line(0, standin_status=503), line(1, standin_status=400),
                              line(2, standin_status=404), line(3)]) + "\n")
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    res = invoke("batch", f.run_dir, inp, "-o", out, "--max-retries", "2")
    assert res.exit_code == 1, res.stderr
    assert time.monotonic() - started < 20
    assert output_ids(out) == ["req-3"]
    errors = {e["custom_id"]: e for e in records(tmp_path / "out.errors.jsonl")}
    assert errors["req-0"]["error"]["attempts"] == 3  # 1 + 2 retries
    assert errors["req-0"]["error"]["code"] == "http_503"
    assert errors["req-0"]["response"]["status_code"] == 503
    for cid, status in (("req-1", 400), ("req-2", 404)):
        assert errors[cid]["error"]["attempts"] == 1
        assert errors[cid]["response"]["body"]["error"]["message"] == "standin_status asked"
        assert errors[cid]["error"]["line"] == int(cid[-1]) + 1
    assert "3 failed" in res.stderr
    # a re-run tries the failed lines again (they are not in the output); the errors file is
    # this run's only
    res = invoke("batch", f.run_dir, inp, "-o", out, "--max-retries", "0")
    assert res.exit_code == 1
    assert len(records(tmp_path / "out.errors.jsonl")) == 3 and output_ids(out) == ["req-3"]


def test_timeouts_are_retried_on_the_other_instance(fleet, tmp_path):
    f = fleet(2)
    f.kill(0)
    f.start(0, ["--fault", "hang-after:0"])  # accepts, never answers
    inp = write_input(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out.jsonl"
    counts = Run.open(f.run_dir).batch(inp, out, timeout=1, max_in_flight=2)
    assert counts.done == 20 and counts.retries >= 1, counts
    assert served_by(out) == {f"standin-{f.port + 1}"}


def test_a_killed_instance_mid_batch_loses_no_line(fleet, tmp_path):
    f = fleet(2, args=["--delay", "0.05"])
    inp = write_input(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out.jsonl"
    killer = threading.Thread(target=lambda: (_wait_lines(out, 60), f.kill(0)))
    killer.start()
    counts = Run.open(f.run_dir).batch(inp, out, max_in_flight=4)
    killer.join()
    assert counts.done == 300 and counts.failed == 0 and counts.retries >= 1, counts
    assert_once(out, 300)


def test_a_refused_key_stops_the_batch(fleet, tmp_path):
    f = fleet(1, key="z" * 40)
    (f.run_dir / "api-key").unlink()
    fd = os.open(f.run_dir / "api-key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, KEY.encode())
    os.close(fd)
    inp = write_input(tmp_path / "in.jsonl", 50)
    res = invoke("batch", f.run_dir, inp, "-o", tmp_path / "out.jsonl")
    assert res.exit_code == 1
    assert "refused the run's key (401)" in res.stderr
    assert "run again with the same -o to resume" in res.stderr
    assert len(records(tmp_path / "out.errors.jsonl")) < 50  # stopped, not 50 error lines


# ------------------------------------------------------------------ the run changing


def test_an_instance_that_becomes_ready_is_used_and_the_run_ending_stops_the_batch(
        fleet, tmp_path):
    f = fleet(2, args=["--delay", "0.05"])
    f.states = ["ready", "starting"]
    f.write()
    inp = write_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.jsonl"

    def later():
        _wait_lines(out, 20)
        f.states = ["ready", "ready"]
        f.write()
    t = threading.Thread(target=later)
    t.start()
    counts = Run.open(f.run_dir).batch(inp, out, max_in_flight=2, refresh_interval=0.2)
    t.join()
    assert counts.done == 200
    assert served_by(out) == {f"standin-{f.port}", f"standin-{f.port + 1}"}

    out2 = tmp_path / "out2.jsonl"
    ender = threading.Thread(target=lambda: (_wait_lines(out2, 20),
                                             f.write(launcher_state="stopped")))
    ender.start()
    with pytest.raises(BatchStopped, match="the run ended: the launcher stopped") as stop:
        Run.open(f.run_dir).batch(inp, out2, max_in_flight=2, refresh_interval=0.2)
    ender.join()
    counts = stop.value.counts
    assert counts.done >= 20 and counts.done + counts.not_sent == counts.lines
    assert len(output_ids(out2)) == counts.done == len(set(output_ids(out2)))


def test_no_ready_instance_for_the_wait_timeout_stops_the_batch(fleet, tmp_path):
    f = fleet(1, args=["--delay", "0.05"])
    inp = write_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.jsonl"

    def gone():
        _wait_lines(out, 10)
        f.states = ["unhealthy"]
        f.write()
    t = threading.Thread(target=gone)
    t.start()
    with pytest.raises(BatchStopped, match="no ready instance of 'm' answered for 1s"):
        Run.open(f.run_dir).batch(inp, out, wait_timeout=1, refresh_interval=0.2,
                                  max_in_flight=2)
    t.join()
    assert len(set(output_ids(out))) == len(output_ids(out)) >= 10


def test_a_fleet_that_stops_answering_stops_the_batch_instead_of_failing_every_line(
        fleet, tmp_path):
    f = fleet(2)
    f.kill(0)
    f.kill(1)  # both still listed ready: connections refused
    inp = write_input(tmp_path / "in.jsonl", 500)
    out = tmp_path / "out.jsonl"
    res = invoke("batch", f.run_dir, inp, "-o", out, "--wait-timeout", "3")
    assert res.exit_code == 1, res.stderr
    assert "no ready instance of 'm' answered for 3s" in res.stderr
    assert "run again with the same -o to resume" in res.stderr
    failed = records(tmp_path / "out.errors.jsonl") if (tmp_path / "out.errors.jsonl").exists() \
        else []
    assert len(failed) < 10, len(failed)  # not 500 lines failed into the errors file


def _wait_lines(path: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_bytes().count(b"\n") >= n):
        assert time.monotonic() < deadline, f"{path}: fewer than {n} lines"
        time.sleep(0.01)


# ------------------------------------------------------------------ stopping and resuming


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_batch_then_a_resume_answers_each_line_once(fleet, tmp_path, signum):
    f = fleet(2, args=["--delay", "0.05"])
    inp = write_input(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out.jsonl"
    argv = [*AEGIS, "batch", str(f.run_dir), str(inp), "-o", str(out), "--max-in-flight", "3"]
    proc = subprocess.Popen(argv, env=ENV, stderr=subprocess.PIPE, text=True)
    _wait_lines(out, 50)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}; run again with the same -o" in err
    kept = output_ids(out)
    assert 50 <= len(kept) < 300 and len(set(kept)) == len(kept)
    res = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"{300 - len(kept)} done, {len(kept)} skipped" in res.stderr
    assert_once(out, 300)


def test_input_from_stdin_and_never_through_a_proxy(fleet, tmp_path):
    f = fleet(1)
    data = "".join(line(i) + "\n" for i in range(10))
    out = tmp_path / "out.jsonl"
    proxy = "http://127.0.0.1:9"  # nothing listens: a request through it would fail
    env = {**ENV, "http_proxy": proxy, "HTTP_PROXY": proxy, "all_proxy": proxy,
           "ALL_PROXY": proxy, "NO_PROXY": "", "no_proxy": ""}
    res = subprocess.run([*AEGIS, "batch", str(f.run_dir), "-", "-o", str(out),
                          "--max-retries", "0"], env=env, input=data, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert_once(out, 10)
    res = subprocess.run([*AEGIS, "batch", str(f.run_dir), "-", "-o", str(out)], env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: os.close(0))
    assert res.returncode == 2 and "there is no standard input to read" in res.stderr, \
        res.stderr


# ------------------------------------------------------------------ progress


def test_plain_progress_lines_off_a_terminal(fleet, tmp_path, capsys):
    f = fleet(1, args=["--delay", "0.05"])
    inp = write_input(tmp_path / "in.jsonl", 60)
    Run.open(f.run_dir).batch(inp, tmp_path / "out.jsonl", progress=True,
                              progress_interval=0.3, max_in_flight=2)
    err = capsys.readouterr().err
    assert "aegis: batch: " in err and "% of input, done " in err and " req/s" in err
    assert "\r" not in err  # no bar redraws in a log


def test_a_bar_with_rate_and_eta_on_a_terminal():
    class Tty:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return True
    tty = Tty()
    p = _Progress(True, 10_000, 10.0, stream=tty)
    assert p.bar is not None
    counts = BatchCounts(lines=40, done=30, skipped=10)
    p.update(counts, 4000)
    time.sleep(0.3)
    counts.done, counts.lines = 40, 50
    p.update(counts, 5000)
    p.close()
    assert "50%" in tty.text and "req/s" in tty.text and "ETA 0:0" in tty.text
    assert "skipped 10" in tty.text


# ------------------------------------------------------------------ the Python API


def test_run_batch_returns_counts_and_checks_its_options(fleet, tmp_path):
    f = fleet(1)
    run = Run.open(f.run_dir)
    inp = write_input(tmp_path / "in.jsonl", 5)
    counts = run.batch(inp, tmp_path / "out.jsonl")
    assert counts.complete and counts.to_dict()["done"] == 5 and counts.rate > 0
    for bad in ({"target": "nowhere"}, {"max_retries": -1}, {"timeout": 0},
                {"max_in_flight": True}):
        with pytest.raises(ConfigError):
            run.batch(inp, tmp_path / "out.jsonl", **bad)
    f.states = ["starting"]
    f.write()
    with pytest.raises(RunError, match="nothing of this run is ready"):
        run.batch(inp, tmp_path / "other.jsonl")


def test_run_batch_from_async_code_as_in_a_notebook(fleet, tmp_path):
    """Jupyter runs cells inside an event loop: asyncio.run() there refuses to start."""
    import asyncio

    f = fleet(1)
    inp = write_input(tmp_path / "in.jsonl", 10)

    async def cell():
        return Run.open(f.run_dir).batch(inp, tmp_path / "out.jsonl", handle_signals=True)
    counts = asyncio.run(cell())
    assert counts.done == 10
    assert_once(tmp_path / "out.jsonl", 10)
