"""`aegis list`: the runs under a run directory, newest first, a chain as one entry, foreign
and unreadable entries left out with a note, never a traceback (stand-in batch commands)."""

from __future__ import annotations

import json
import os
import time

from click.testing import CliRunner

from aegis.cli import main
from aegis.clients.runs import age_text, list_runs
from conftest import EXAMPLES
from test_run import instance, launched_run, write_doc


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _age(path, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(path, (when, when))


def test_list_shows_runs_newest_first_with_a_chain_as_one_entry(tmp_path, monkeypatch,
                                                                 fake_batch):
    monkeypatch.chdir(tmp_path)
    fake_batch.answer("sbatch", out="4242\n")
    assert invoke("submit", "-c", EXAMPLES / "frontier.yaml").exit_code == 0
    fake_batch.answer("sbatch", out="5000\n")
    res = invoke("submit", "-c", EXAMPLES / "frontier.yaml", "--chain", "2")
    assert res.exit_code == 0, res.stderr
    runs_dir = tmp_path / "aegis-runs"
    (single,) = [p for p in runs_dir.iterdir() if (p / "job.id").exists()]
    (chain,) = [p for p in runs_dir.iterdir() if (p / "chain.json").exists()]
    _age(single / "config.yaml", 7200)
    for gen in ("gen-1", "gen-2"):
        _age(chain / gen / "config.yaml", 60)
    # a run started by `aegis launch --run-dir aegis-runs/mine`, serving 2 of 2, newest
    launched = launched_run(runs_dir / "mine-parent")
    os.rename(launched, runs_dir / "mine")
    (runs_dir / "mine-parent").rmdir()
    # foreign and broken entries
    (runs_dir / "notes.txt").write_text("hello")
    (runs_dir / "empty").mkdir()
    (runs_dir / "badconfig").mkdir()
    (runs_dir / "badconfig" / "config.yaml").write_text("models: [unterminated\n\x00")
    (runs_dir / "badchain").mkdir()
    (runs_dir / "badchain" / "chain.json").write_text("{")
    (runs_dir / "dangling").symlink_to(tmp_path / "nowhere")
    fake_batch.answer("squeue", out="RUNNING\n")

    res = invoke("list")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["NAME", "JOB", "PHASE", "READY", "AGE"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["mine", chain.name, single.name], res.stdout
    assert lines[1].split() == ["mine", "-", "ready", "2/2"] + lines[1].split()[4:]
    assert f"{chain.name} (chain of 2)" in lines[2] and "5000" in lines[2]
    assert lines[3].split()[1:4] == ["4242", "starting", "0/9"] and lines[3].endswith("2h00m")
    notes = res.stderr.splitlines()
    assert len(notes) == 5 and all(n.startswith("aegis: note: aegis-runs/") for n in notes)
    for name in ("notes.txt", "empty", "badconfig", "badchain", "dangling"):
        assert any(f"/{name}: skipped (" in n for n in notes), (name, notes)
    assert "Traceback" not in res.stderr

    res = invoke("list", "--json", "--run-dir", runs_dir)
    assert res.exit_code == 0
    records = json.loads(res.stdout)
    assert [(r["name"], r["kind"], r["job_id"], r["phase"], r["ready"], r["total"])
            for r in records] == [("mine", "run", None, "ready", 2, 2),
                                  (chain.name, "chain", "5000", "starting", 0, 9),
                                  (single.name, "run", "4242", "starting", 0, 9)]
    assert records[2]["age_s"] >= 7199 and records[0]["generations"] == 0
    assert records[1]["generations"] == 2


def test_a_run_whose_state_cannot_be_read_is_listed_as_unknown(tmp_path, monkeypatch,
                                                               fake_batch):
    monkeypatch.chdir(tmp_path)
    fake_batch.answer("sbatch", out="77\n")
    assert invoke("submit", "-c", EXAMPLES / "frontier.yaml").exit_code == 0
    fake_batch.remove("squeue")  # not a login node of this batch system
    (run_dir,) = (tmp_path / "aegis-runs").iterdir()
    res = invoke("list")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.splitlines()[1].split()[1:4] == ["77", "unknown", "0/9"]
    (records,) = json.loads(invoke("list", "--json").stdout)
    assert records["phase"] == "unknown" and "squeue not found" in records["reason"]
    # an endpoints file that is not one
    write_doc(run_dir, [instance(0)])
    (run_dir / "endpoints.json").write_text("garbage")
    res = invoke("list", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["phase"] == "unknown"


def test_list_of_a_missing_or_empty_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = invoke("list")
    assert res.exit_code == 2
    assert res.stderr == ("aegis: error: aegis-runs: no such directory (runs are made there by "
                          "aegis submit; --run-dir DIR to look elsewhere)\n")
    (tmp_path / "file").write_text("")
    res = invoke("list", "--run-dir", tmp_path / "file")
    assert res.exit_code == 2 and "not a directory" in res.stderr
    (tmp_path / "aegis-runs").mkdir()
    res = invoke("list")
    assert res.exit_code == 0 and res.stdout == "" and "no runs in aegis-runs" in res.stderr
    assert invoke("list", "--json").stdout.strip() == "[]"
    assert list_runs(tmp_path / "aegis-runs") == ([], [])


def test_age_text():
    assert [age_text(s) for s in (5, 59, 60, 3599, 3600, 7260, 86400, 90000)] == [
        "5s", "59s", "1m", "59m", "1h00m", "2h01m", "1d00h", "1d01h"]
