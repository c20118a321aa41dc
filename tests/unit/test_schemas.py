"""The JSON Aegis prints and writes matches the schemas it publishes (docs/schemas/), from real
output: `aegis plan --format json` of every example, and a real launch (stand-in servers, a
real router) read through `status --json`, `endpoints --json [--router]` and its
endpoints.json. One meaning per field: `node` is a node's index everywhere, `host` a name."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from aegis.cli import main
from aegis.run import Run
from test_launch_run import Run as LaunchRun
from test_launch_run import _no_strays  # noqa: F401 (autouse: no strays)

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "docs" / "schemas"


def schema(name: str) -> dict:
    doc = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(doc)
    return doc


def check(name: str, data) -> None:
    jsonschema.validate(data, schema(name), cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_plan_json_matches_its_schema(example):
    result = CliRunner().invoke(main, ["plan", "-c", str(ROOT / "examples" / example),
                                       "--format", "json"])
    assert result.exit_code == 0, result.output
    check("plan", json.loads(result.stdout))


def test_a_real_launch_matches_every_schema(tmp_path):
    launch = LaunchRun(tmp_path, [{"name": "m", "served_model_name": "m", "instances": 2}])
    proc = launch.start()
    try:
        launch.wait_endpoints(lambda d: d["launcher"]["state"] == "serving" and d["routers"]
                              and d["routers"][0]["state"] == "ready", timeout=60)
        run = str(launch.run_dir)
        outputs = {}
        for name, args in (("status", ["status", run, "--json"]),
                           ("endpoints", ["endpoints", run, "--json"]),
                           ("routers", ["endpoints", run, "--router", "--json"])):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
            outputs[name] = json.loads(result.stdout)
        file_doc = launch.endpoints()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    check("status", outputs["status"])
    check("endpoints", outputs["endpoints"])
    check("endpoints", outputs["routers"])
    check("endpoints-file", file_doc)
    # one meaning per field: node the index, host the address, in all of them
    records = outputs["status"]["instances"] + outputs["endpoints"] + file_doc["instances"]
    assert {(r["node"], r["host"]) for r in records} == {(0, "127.0.0.1")}
    assert outputs["routers"][0]["node"] == file_doc["routers"][0]["node"] == 0
    assert Run.open(run).state().instances[0].node == 0


def test_batch_output_schema_takes_answers_and_errors_only():
    check("batch-output", {"id": "a-1", "custom_id": "c", "error": None,
                           "response": {"status_code": 200, "request_id": "r", "body": {}}})
    check("batch-output", {"id": "a-2", "custom_id": "c", "response": None,
                           "error": {"code": "unknown_model", "message": "m", "line": 3}})
    with pytest.raises(jsonschema.ValidationError):  # neither an answer nor an error
        check("batch-output", {"id": "a-3", "custom_id": "c", "response": None, "error": None})


def test_a_job_without_a_run_directory_matches_the_status_schema():
    check("status", {"job_id": "4242", "scheduler": "slurm", "job_state": "running"})
    with pytest.raises(jsonschema.ValidationError):
        check("status", {"job_id": "4242", "scheduler": "slurm", "job_state": "running",
                         "node": "n1"})
