"""`aegis fetch` and `download_weights` against a stand-in hub on loopback (tests/standin_hub.py;
huggingface_hub honours HF_ENDPOINT): the hub-cache layout staging serves, nothing moved twice,
a cut transfer resumed, a killed fetch cleaned up and finished, gated models, and a fetched
model that really stages and serves (the stand-in vLLM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import RUN_MARKER, kill_marked, wait_gone
from ports import free_port_block
from standin_hub import Hub, Repo, serve

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests" / "standin_vllm.py"
WEIGHTS = os.urandom(3 << 20)
BIG = os.urandom(24 << 20)  # huggingface_hub writes 10 MiB pieces: a cut after 15 MiB keeps one


def tiny_repo(**extra) -> Repo:
    return Repo({"config.json": json.dumps({"model_type": "standin"}).encode(),
                 "model.safetensors": WEIGHTS, "tokenizer.json": b'{"version": "1.0"}',
                 "tokenizer_config.json": b"{}", "README.md": b"# tiny",
                 "pytorch_model.bin": b"not wanted" * 100, "sub/extra.json": b'{"extra": 1}'}, **extra)


@pytest.fixture
def hub():
    hub = Hub({"org/tiny": tiny_repo(), "org/gated": tiny_repo(gated_token="hf_granted"),
               "org/big": Repo({"config.json": b"{}", "model.safetensors": BIG})})
    server, url = serve(hub)
    hub.url = url
    yield hub
    server.shutdown()
    server.server_close()


def aegis(hub, *args, env=None, timeout=120, **popen):
    environ = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               **(env or {})}
    if "HF_TOKEN" not in (env or {}):
        environ.pop("HF_TOKEN", None)
    environ.pop("AEGIS_REMOTE", None)
    argv = [sys.executable, "-m", "aegis", "fetch", *args]
    if popen.pop("popen", False):
        return subprocess.Popen(argv, env=environ, **popen)
    return subprocess.run(argv, env=environ, capture_output=True, text=True, timeout=timeout)


def test_fetch_lands_in_the_hub_cache_layout_and_a_second_fetch_moves_nothing(hub, tmp_path):
    cache = tmp_path / "hub cache's dir"  # a space and a quote: paths are never shell words
    done = aegis(hub, "org/tiny", "--to", str(cache), "-q")
    assert done.returncode == 0, done.stderr
    storage = cache / "models--org--tiny"
    assert done.stdout == f"{storage}\n"  # the model_source to use
    sha = (storage / "refs" / "main").read_text()
    snapshot = storage / "snapshots" / sha
    assert sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if not p.is_dir()) \
        == ["config.json", "model.safetensors", "sub/extra.json", "tokenizer.json",
            "tokenizer_config.json"]  # safetensors, config and tokenizer: no README, no .bin
    link = snapshot / "model.safetensors"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.read_bytes() == WEIGHTS
    from aegis.model_source import resolve

    assert resolve(str(storage)).form == "hub-cache"  # what staging will serve
    assert "5 of 5 file(s) fetched" in done.stderr
    bodies = {r.path.rsplit("/", 1)[1] for r in hub.downloads()}
    assert "model.safetensors" in bodies and "README.md" not in bodies

    hub.requests.clear()
    again = aegis(hub, "org/tiny", "--to", str(cache), "-q")
    assert again.returncode == 0, again.stderr
    assert hub.downloads() == [] and "0 of 5 file(s) fetched (0 B)" in again.stderr


def test_a_cut_transfer_goes_on_from_its_last_byte(hub, tmp_path):
    cut = 15 << 20
    hub.drop_after["model.safetensors"] = cut
    done = aegis(hub, "org/big", "--to", str(tmp_path), "-q")
    assert done.returncode == 0, done.stderr
    first, second = hub.downloads("model.safetensors")
    assert first.range is None and first.sent == cut
    resumed_at = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= cut and second.sent == len(BIG) - resumed_at  # went on, not over
    snapshot = next((tmp_path / "models--org--big" / "snapshots").iterdir())
    assert (snapshot / "model.safetensors").read_bytes() == BIG


def test_a_killed_fetch_is_finished_by_the_next_one(hub, tmp_path):
    hub.delay = 0.05  # 64 KiB per 50 ms: the 3 MiB file takes ~2.5 s
    proc = aegis(hub, "org/tiny", "--to", str(tmp_path), "-q", popen=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    blobs = tmp_path / "models--org--tiny" / "blobs"
    deadline = time.monotonic() + 60
    partial = done_blobs = []
    while time.monotonic() < deadline and not (partial and done_blobs):
        if blobs.is_dir():
            partial = list(blobs.glob("*.incomplete"))
            done_blobs = [p for p in blobs.iterdir() if not p.name.endswith(".incomplete")]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial, "the fetch ended before it could be killed"
    before = {p.name for p in blobs.iterdir() if not p.name.endswith(".incomplete")}
    old = time.time() - 3600  # nobody has written to it for an hour: a dead fetch's
    for p in blobs.glob("*.incomplete"):
        os.utime(p, (old, old))
    hub.delay = 0.0
    time.sleep(0.5)  # the killed fetch's last answers are recorded (each piece sleeps first)
    hub.requests.clear()
    done = aegis(hub, "org/tiny", "--to", str(tmp_path), "-q")
    assert done.returncode == 0, done.stderr
    assert "removed a partial download" in done.stderr
    assert list(blobs.glob("*.incomplete")) == []
    moved = {r.path.rsplit("/", 1)[1] for r in hub.downloads()}
    assert "model.safetensors" in moved
    repo = hub.repos["org/tiny"]
    kept = {name for name in repo.files if repo.etag(name) in before}
    assert not kept & moved  # what the killed fetch finished is not fetched again


def test_gated_model_says_which_setting_gives_the_token(hub, tmp_path):
    denied = aegis(hub, "org/gated", "--to", str(tmp_path), "-q")
    assert denied.returncode == 2
    (line,) = denied.stderr.strip().splitlines()
    assert line.startswith("aegis: error: org/gated: gated or private (HTTP 401); no token") \
        and "hf_token" in line and "--hf-token-file" in line and "HF_TOKEN" in line
    wrong = tmp_path / "wrong"
    wrong.write_text("hf_other\n")
    refused = aegis(hub, "org/gated", "--to", str(tmp_path), "-q", "--hf-token-file", str(wrong))
    assert refused.returncode == 2 and "(HTTP 403); the token from --hf-token-file has no " \
        "access" in refused.stderr, refused.stderr
    good = aegis(hub, "org/gated", "--to", str(tmp_path), "-q", env={"HF_TOKEN": "hf_granted"})
    assert good.returncode == 0, good.stderr


@pytest.mark.parametrize("model,revision,message", [
    ("org/nosuch", None, "org/nosuch: not found, or private (HTTP 401)"),
    ("org/tiny", "v9", "org/tiny: no revision 'v9' on the hub"),
    ("../etc", None, "'../etc': not a Hugging Face model id (ORG/NAME)"),
    ("org/tiny", "--x", "--revision '--x': not a branch, tag or commit"),
])
def test_bad_model_or_revision_is_one_line_exit_2(hub, tmp_path, model, revision, message):
    done = aegis(hub, model, "--to", str(tmp_path), "-q",
                 *([f"--revision={revision}"] if revision else []))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"aegis: error: {message}"] or \
        done.stderr.startswith(f"aegis: error: {message}"), done.stderr


def test_a_pinned_revision_gives_its_snapshot_as_model_source(hub, tmp_path):
    sha = hub.repos["org/tiny"].sha
    done = aegis(hub, "org/tiny", "--to", str(tmp_path), "--revision", sha, "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path}/models--org--tiny/snapshots/{sha}\n"


def test_the_fetched_model_stages_and_serves(hub, tmp_path):
    done = aegis(hub, "org/tiny", "--to", str(tmp_path / "hub"), "-q")
    assert done.returncode == 0, done.stderr
    port = free_port_block(1)
    token = f"fetch{os.getpid()}"
    config = {"platform": "local", "port_start": port, "hf_home": str(tmp_path / "staged"),
              "vllm_command": f"{sys.executable} {STANDIN} serve", "startup_timeout": 30,
              "models": [{"model": "org/tiny", "model_source": done.stdout.strip()}]}
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    env = {**os.environ, RUN_MARKER: token,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        launched = subprocess.run(
            [sys.executable, "-m", "aegis", "launch", "-c", str(tmp_path / "c.yaml"),
             "--run-dir", str(tmp_path / "run"), "--once", "--stop-grace", "3"],
            env=env, capture_output=True, text=True, timeout=120)
    finally:
        left = wait_gone(token, 10)
        kill_marked(token)
    assert launched.returncode == 0, launched.stderr
    assert left == {}
    log = (tmp_path / "run" / "logs" / "instance-0000.log").read_text()
    assert "standin: serving 'org/tiny'" in log
    staged = list((tmp_path / "staged").rglob("model.safetensors"))
    assert staged and staged[0].read_bytes() == WEIGHTS  # the staged copy is what was fetched


def test_download_weights_fetches_on_submit_after_the_checks(hub, tmp_path, monkeypatch,
                                                               fake_batch):
    from test_cli import invoke

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "hub" / "models--org--tiny"
    base = f"model: org/tiny\nmodel_source: {source}\ndownload_weights: true\n"
    # a submission that would be refused (no account on aurora) fetches nothing first
    (tmp_path / "c.yaml").write_text(base + "platform: aurora\n")
    refused = invoke("submit", "-c", "c.yaml")
    assert refused.exit_code == 2 and "account: missing" in refused.stderr
    assert hub.requests == [] and not source.exists()
    # a model_source that cannot hold the fetch names the key
    (tmp_path / "d.yaml").write_text("model: org/tiny\nmodel_source: /x/tiny\n"
                                     "download_weights: true\nplatform: local\n")
    wrong = invoke("submit", "-c", "d.yaml")
    assert wrong.exit_code == 2 and wrong.stderr.startswith(
        "aegis: error: model_source: /x/tiny: with download_weights it must be a hub-cache "
        "directory named models--org--tiny"), wrong.stderr
    fake_batch.answer("sbatch", out="42\n")
    (tmp_path / "e.yaml").write_text(base + "platform: local\n")
    done = invoke("submit", "-c", "e.yaml")
    assert done.exit_code == 0, done.stderr
    assert done.stdout == "42\n" and (source / "refs" / "main").is_file()
    assert "org/tiny: 5 of 5 file(s) fetched" in done.stderr
