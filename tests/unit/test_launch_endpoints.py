"""The endpoints file: its schema, the writer (atomic, 0600, heartbeat, nothing ready once the
launcher stops) and the readers' liveness rule."""

import json
import stat
import time

import pytest

from aegis.launch.endpoints import EndpointsFile, InstanceState
from aegis.runfiles import HEARTBEAT_INTERVAL, SCHEMA, STALE_AFTER, launcher_alive, read_endpoints, serving


def _state(i, state="ready", **kw):
    base = dict(id=i, model="org/m", served_name="m", node=i // 2, host=f"n{i // 2}",
                port=8000 + i, state=state, log=f"/r/logs/instance-{i:04d}.log")
    return InstanceState(**{**base, **kw})


def _until(condition, timeout=10.0, what="condition"):
    """Poll condition() until it is true; fail at the deadline. A wait for something that must
    happen, however loaded the machine (a fixed sleep only guesses how long it takes)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.01)
    return result


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def _file(tmp_path, clock=None, **kw):
    return EndpointsFile(tmp_path / "endpoints.json", run_dir="/r", job="123.pbs", ranks=2,
                         clock=clock or Clock(), **kw)


def test_schema_content_and_mode(tmp_path):
    ep = _file(tmp_path)
    ep.update([_state(0), _state(1, "failed", exit_code=3, error="exited with code 3",
                                 log_tail=("Traceback", "RuntimeError: boom"))], state="serving")
    for p in (ep.json_path, ep.txt_path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    doc = read_endpoints(ep.json_path)
    assert doc["schema"] == SCHEMA == 1
    assert doc["job"] == "123.pbs" and doc["run_dir"] == "/r"
    assert doc["ready"] == 1 and doc["total"] == 2
    launcher = doc["launcher"]
    assert launcher["state"] == "serving" and launcher["exit_code"] is None
    assert launcher["ranks"] == 2 and isinstance(launcher["pid"], int) and launcher["host"]
    assert launcher["heartbeat_at"] == launcher["started_at"] == 1_000_000.0
    assert launcher["heartbeat_interval"] == HEARTBEAT_INTERVAL
    assert doc["instances"][0] == {
        "id": 0, "model": "org/m", "served_name": "m", "node": 0, "host": "n0", "port": 8000,
        "state": "ready", "log": "/r/logs/instance-0000.log", "restarts": 0, "exit_code": None,
        "error": "", "url": "http://n0:8000", "base_url": "http://n0:8000/v1"}
    assert doc["instances"][1]["exit_code"] == 3 and "log_tail" not in doc["instances"][1]
    assert ep.txt_path.read_text() == "n0:8000\n"  # only ready instances
    assert sorted(p.name for p in tmp_path.iterdir()) == ["endpoints.json", "endpoints.txt"]


def test_rewrite_replaces_atomically_and_keeps_0600(tmp_path):
    target = tmp_path / "endpoints.json"
    target.write_text("old")
    target.chmod(0o644)
    _file(tmp_path).update([_state(0)])
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert json.loads(target.read_text())["total"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["endpoints.json", "endpoints.txt"]


def test_finish_lists_nothing_as_ready_and_keeps_failures(tmp_path):
    clock = Clock()
    ep = _file(tmp_path, clock)
    ep.update([_state(0), _state(1, "failed", error="boom"), _state(2, "restarting")],
              state="serving")
    clock.now += 7
    ep.finish("failed", 1)
    doc = read_endpoints(ep.json_path)
    assert [i["state"] for i in doc["instances"]] == ["stopped", "failed", "stopped"]
    assert doc["instances"][1]["error"] == "boom"
    assert doc["ready"] == 0 and ep.txt_path.read_text() == ""
    assert doc["launcher"]["state"] == "failed" and doc["launcher"]["exit_code"] == 1
    assert doc["launcher"]["updated_at"] == doc["launcher"]["heartbeat_at"] == 1_000_007.0
    assert not launcher_alive(doc, clock.now) and serving(doc, clock.now) == []


def test_heartbeat_thread_refreshes_only_the_heartbeat_until_finish(tmp_path):
    ep = _file(tmp_path, clock=time.time, interval=0.05)
    ep.update([_state(0)], state="serving")
    first = read_endpoints(ep.json_path)["launcher"]
    ep.start_heartbeat()
    beat = _until(lambda: (doc := read_endpoints(ep.json_path)["launcher"])["heartbeat_at"]
                  > first["heartbeat_at"] and doc, what="a heartbeat")
    assert beat["updated_at"] == first["updated_at"]  # no change, only a heartbeat
    ep.finish("stopped", 0)
    assert not ep._thread.is_alive()
    final = ep.json_path.read_text()
    time.sleep(0.2)
    assert ep.json_path.read_text() == final  # no beat after the end


def test_a_failing_file_system_does_not_stop_the_launch(tmp_path, monkeypatch, capsys):
    import aegis.launch.endpoints as endpoints

    ep = _file(tmp_path, clock=time.time, interval=0.02)
    ep.update([_state(0)], state="serving")
    assert ep.txt_path.read_text() == "n0:8000\n"
    real = endpoints.write_atomic
    full = [True]
    refused = []  # writes refused while the file system is full

    def write(path, text, mode=0o600):
        if full[0]:
            refused.append(path)
            raise OSError(28, "No space left on device")
        real(path, text, mode)

    monkeypatch.setattr(endpoints, "write_atomic", write)
    ep.start_heartbeat()
    ep.update([_state(0, "restarting")])  # neither raises
    with pytest.raises(OSError):
        ep.update(must_write=True)  # the first write of a launch must succeed
    tried = len(refused)
    _until(lambda: len(refused) >= tried + 3, what="heartbeats on the full file system")
    assert ep._thread.is_alive()  # the failed beats did not end the thread
    stale = read_endpoints(ep.json_path)
    assert stale["instances"][0]["state"] == "ready"  # the old content, whose heartbeat ages
    full[0] = False
    fresh = _until(lambda: (doc := read_endpoints(ep.json_path))["launcher"]["heartbeat_at"]
                   > stale["launcher"]["heartbeat_at"] and doc, what="a beat once writable")
    assert fresh["instances"][0]["state"] == "restarting"  # the change caught up
    assert ep.txt_path.read_text() == ""  # ... in the .txt too
    ep.finish("stopped", 0)
    assert read_endpoints(ep.json_path)["launcher"]["state"] == "stopped"
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "No space left on device" in err
    assert err.count("written again") == 1


@pytest.mark.parametrize("state, age, alive", [
    ("serving", 0, True), ("starting", STALE_AFTER * HEARTBEAT_INTERVAL, True),
    ("serving", STALE_AFTER * HEARTBEAT_INTERVAL + 0.1, False),  # a SIGKILLed launcher
    ("stopping", 1, True), ("stopped", 0, False), ("failed", 0, False)])
def test_readers_tell_a_dead_launcher(tmp_path, state, age, alive):
    clock = Clock()
    ep = _file(tmp_path, clock)
    ep.update([_state(0)], state=state)
    doc = read_endpoints(ep.json_path)
    assert launcher_alive(doc, clock.now + age) is alive
    assert len(serving(doc, clock.now + age)) == (1 if alive else 0)


def test_the_launcher_record_names_its_process(tmp_path):
    """pid, start time (field 22 of /proc/<pid>/stat) and boot id: a reader on this host
    does not take a later process with the same pid for the launcher."""
    import os

    ep = _file(tmp_path, clock=time.time)
    ep.update([_state(0)], state="serving")
    doc = read_endpoints(ep.json_path)
    launcher = doc["launcher"]
    with open(f"/proc/{os.getpid()}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    assert (launcher["pid"], launcher["start_ticks"], launcher["boot_id"]) == (
        os.getpid(), ticks, boot)
    assert launcher_alive(doc, time.time())
    doc["launcher"]["start_ticks"] = ticks - 1  # the pid now names another process
    assert not launcher_alive(doc, time.time()) and serving(doc, time.time()) == []
    doc["launcher"].update(start_ticks=ticks, heartbeat_at=float("inf"))  # never trusted
    assert not launcher_alive(doc, time.time())
    for garbage in (None, [], {"launcher": "x"}, {"launcher": {"state": "serving"}}):
        assert not launcher_alive(garbage, time.time()) and serving(garbage, time.time()) == []


def test_read_endpoints_refuses_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"ready": 1}')
    with pytest.raises(ValueError, match="not an aegis endpoints file"):
        read_endpoints(path)
