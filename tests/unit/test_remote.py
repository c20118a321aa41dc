"""--remote, aegis forward, from the laptop's side, against a real OpenSSH server on loopback in
front of this machine with a user of its own (tests/login_node.py): a run launched on the
"login node", then wait, endpoints, key, forward with the OpenAI SDK through the tunnel,
cancel, and no process left on either side; the failures (unknown host key, refused login,
aegis missing there, the master connection killed during wait, the laptop's aegis SIGKILLed
during wait) each one line with its exit code and no ssh left; hostile host names, remote_aegis
values, run names and a config with a secret.

Needs root and the OpenSSH server (scripts/setup-system installs it): without them these tests
skip, except in CI (CI=true) or with AEGIS_REQUIRE_SSH=1, where they fail instead."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness import RUN_MARKER, kill_marked, wait_gone
from login_node import LoginNode, require
from ports import free_port_block

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests" / "standin_vllm.py"
HOST = "aegis-login"


@pytest.fixture(scope="module")
def login():
    why = require()
    if why:
        if os.environ.get("CI") or os.environ.get("AEGIS_REQUIRE_SSH") == "1":
            pytest.fail(f"the --remote tests cannot run: {why}")
        pytest.skip(why)
    node = LoginNode()
    yield node
    node.close()


@pytest.fixture
def laptop(login):
    """After each test: no ssh client of the laptop side but the master, nothing of the user's
    left running on the login node (whatever a failing test left is killed)."""
    yield login
    try:
        login.wait_for(lambda: not {p: c for p, c in login.ssh_clients().items()
                                    if "ControlMaster=yes" not in c}, 10, "ssh clients to end")
        login.wait_for(lambda: not login.processes(), 15, "the login node's processes to end")
    finally:
        for pid in login.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def aegis(login, *args, env=None, timeout=120, **popen):
    argv = [sys.executable, "-m", "aegis", *args]
    full = login.laptop_env(**(env or {}))
    if popen.pop("popen", False):
        return subprocess.Popen(argv, env=full, **popen)
    return subprocess.run(argv, env=full, capture_output=True, text=True, timeout=timeout)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("aegis: error:")]


def test_a_run_on_the_login_node_used_from_the_laptop(laptop, tmp_path):
    login = laptop
    token = f"remote{os.getpid()}"
    port = free_port_block(1)
    standin = login.home / "standin_vllm.py"
    standin.write_bytes(STANDIN.read_bytes())
    config = {"platform": "local", "port_start": port, "node_local_dir": str(login.home / "nl"),
              "vllm_command": f"{login.python} {standin} serve", "startup_timeout": 30,
              "model": "org/tiny", "served_model_name": "tiny", "router": False}
    (login.home / "fleet.yaml").write_text(json.dumps(config))
    for path in (standin, login.home / "fleet.yaml"):
        os.chown(path, login.uid, login.uid)
    launcher = login.as_user([login.python, "-m", "aegis", "launch", "-c", "fleet.yaml",
                              "--run-dir", str(login.home / "runs" / "one")],
                             env={RUN_MARKER: token}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    forward = None
    try:
        waited = aegis(login, "wait", "--remote", HOST, "runs/one", "--timeout", "60")
        assert waited.returncode == 0, waited.stderr
        assert waited.stdout == f"http://127.0.0.1:{port}/v1\n"
        listed = aegis(login, "endpoints", "--json", "runs/one", env={"AEGIS_REMOTE": HOST})
        assert listed.returncode == 0, listed.stderr
        (record,) = json.loads(listed.stdout)
        assert (record["model"], record["state"]) == ("tiny", "ready")
        key = aegis(login, "key", "--remote", HOST, "runs/one")
        assert key.returncode == 0 and len(key.stdout.strip()) > 20, key.stderr

        forward = aegis(login, "forward", "--remote", HOST, "runs/one", popen=True,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = forward.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), url
        from openai import OpenAI

        client = OpenAI(base_url=url, api_key=key.stdout.strip(), max_retries=0)
        for _ in range(3):  # kept-alive and new connections alike cross the tunnel
            done = client.completions.create(model="tiny", prompt="hello", max_tokens=4)
            assert done.choices[0].text
        client.close()
        (master,) = login.masters()
        os.kill(master, signal.SIGKILL)  # the connection drops: the tunnel opens again
        client = OpenAI(base_url=url, api_key=key.stdout.strip(), max_retries=0)
        assert client.completions.create(model="tiny", prompt="again", max_tokens=4).choices
        client.close()
        assert list(login.masters()) != [master]
        with pytest.raises(Exception, match="401|Unauthorized|auth"):
            OpenAI(base_url=url, api_key="wrong", max_retries=0).completions.create(
                model="tiny", prompt="x", max_tokens=1)  # the key still guards the run

        taken = aegis(login, "forward", "--remote", HOST, "runs/one", "--local-port",
                      url.split(":")[2].split("/")[0])
        assert taken.returncode == 2 and errors(taken.stderr)[0].endswith(
            "another program listens there?): pick another port, or leave --local-port out "
            "for a free one"), taken.stderr
        forward.send_signal(signal.SIGINT)
        assert forward.wait(15) == 0
        assert "aegis: forward: stopped" in forward.stderr.read()

        cancelled = aegis(login, "cancel", "--remote", HOST, "runs/one", "--wait",
                          "--timeout", "30")
        assert cancelled.returncode == 0, cancelled.stderr
        assert launcher.wait(30) == 128 + signal.SIGTERM  # the launcher stopped by cancel
    finally:
        if forward is not None and forward.poll() is None:
            forward.kill()
            forward.wait()
        if launcher.poll() is None:
            launcher.kill()
        left = wait_gone(token, 10)
        kill_marked(token)
    assert left == {}  # launcher, keepers, instances: nothing on the login node
    login.close_masters()
    assert login.ssh_clients() == {}  # nothing on the laptop either


def test_unknown_host_key_is_never_accepted(laptop):
    login = laptop
    before = (login.dir / "known_hosts_empty").read_text()
    done = aegis(login, "status", "--remote", "aegis-login-unknown", "runs/x")
    assert done.returncode == 4
    (line,) = errors(done.stderr)
    assert line.startswith("aegis: error: remote aegis-login-unknown: its host key is not known "
                           "here and aegis never accepts one for you: run `ssh "
                           "aegis-login-unknown` once, compare the fingerprint"), line
    assert (login.dir / "known_hosts_empty").read_text() == before
    assert login.ssh_clients() == {} or all("aegis-login-unknown" not in c
                                           for c in login.ssh_clients().values())


def test_refused_login_and_missing_aegis_are_one_line_exit_4(laptop):
    login = laptop
    refused = aegis(login, "list", "--remote", f"nobody@{HOST}")
    assert refused.returncode == 4
    (line,) = errors(refused.stderr)
    assert line.startswith(f"aegis: error: remote nobody@{HOST}: the login was refused (") and \
        "check the user name" in line, line
    missing = aegis(login, "list", "--remote", HOST, "--remote-aegis", "/nonexistent/aegis")
    assert missing.returncode == 4
    assert errors(missing.stderr) == [
        f"aegis: error: remote {HOST}: aegis could not be started there (exit 127: not found, "
        "remote_aegis '/nonexistent/aegis'): install aegis on the login node, or say how to "
        "start it with --remote-aegis / remote_aegis / $AEGIS_REMOTE_AEGIS (e.g. 'module load "
        "frameworks; aegis')"]


def _remote_wait(login, name: str):
    proc = aegis(login, "wait", "--remote", HOST, name, popen=True, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    login.wait_for(lambda: any("--over-ssh wait" in c for c in login.processes().values()), 30,
                   "the remote wait to start")
    return proc


def test_master_killed_during_wait_is_exit_4_and_leaves_nothing(laptop):
    login = laptop
    proc = _remote_wait(login, "not-yet/run")
    (master,) = login.masters()
    os.kill(master, signal.SIGKILL)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 4
    assert errors(err) == [f"aegis: error: remote {HOST}: the connection was lost (a run keeps "
                           "going; run the command again once the login node answers)"]
    # the fixture checks that no ssh client and no remote `aegis wait` is left


def test_laptop_aegis_sigkilled_during_wait_leaves_no_ssh_and_no_remote_wait(laptop):
    login = laptop
    proc = _remote_wait(login, "not-yet/run")
    proc.kill()
    proc.wait()
    login.wait_for(lambda: not [c for c in login.ssh_clients().values()
                                if "ControlMaster=yes" not in c], 10, "its ssh client to end")
    login.wait_for(lambda: not login.processes(), 15, "the remote wait to end")


@pytest.fixture
def ssh_log(login, tmp_path):
    """AEGIS_SSH_COMMAND through a wrapper that logs every argv it is given, then runs ssh."""
    log = tmp_path / "ssh-argv.log"
    wrapper = tmp_path / "ssh-logged"
    wrapper.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> {log}\nexec ssh \"$@\"\n")
    wrapper.chmod(0o755)
    return log, f"{wrapper} -F {login.dir / 'ssh_config'}"


@pytest.mark.parametrize("host", ["a;touch /tmp/aegis-pwned", "-oProxyCommand=touch x",
                                  "$(touch pwned)", "host name", "a`id`"])
def test_hostile_host_names_are_refused_before_ssh(laptop, ssh_log, host):
    log, command = ssh_log
    done = aegis(laptop, "status", "--remote", host, "x", env={"AEGIS_SSH_COMMAND": command})
    assert done.returncode == 2 and "is not [USER@]HOST" in errors(done.stderr)[0]
    assert not log.exists() and not os.path.exists("/tmp/aegis-pwned")


@pytest.mark.parametrize("remote_aegis", ["aegis; touch pwned;", "aegis #", "aegis &",
                                          "aegis 'unterminated"])
def test_a_remote_aegis_that_would_cut_off_the_arguments_is_refused(laptop, remote_aegis):
    done = aegis(laptop, "list", "--remote", HOST, "--remote-aegis", remote_aegis)
    assert done.returncode == 2 and errors(done.stderr)[0].startswith(
        "aegis: error: --remote-aegis: "), done.stderr
    assert not (laptop.home / "pwned").exists()


def test_run_names_with_spaces_quotes_and_shell_words_arrive_as_one_argument(laptop):
    name = "run dir 'x' \"y\" ; touch pwned $(touch pwned2) `touch pwned3`"
    done = aegis(laptop, "status", "--remote", HOST, f"./{name}")
    assert done.returncode == 2
    assert errors(done.stderr) == [f"aegis: error: ./{name}: no such run directory"]
    assert not any((laptop.home / p).exists() for p in ("pwned", "pwned2", "pwned3"))


def test_submit_sends_the_config_and_token_over_the_connection_never_argv(laptop, ssh_log,
                                                                          tmp_path):
    """A fake sbatch on the login node (through remote_aegis' PATH) records what it got."""
    login = laptop
    log, command = ssh_log
    fake = login.home / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "sbatch").write_text("#!/bin/bash\nprintf '%s\\n' \"$@\" > \"$HOME/sbatch.argv\"\n"
                                 "printf '%s' \"${HF_TOKEN-<unset>}\" > \"$HOME/sbatch.token\"\n"
                                 "echo 4242\n")
    (fake / "sbatch").chmod(0o755)
    for path in (fake, fake / "sbatch"):
        os.chown(path, login.uid, login.uid)
    remote_aegis = login.aegis_command(PATH=f"{fake}:/usr/bin:/bin")
    secret = "hf_SECRET_not_for_argv"
    (tmp_path / "token").write_text(secret + "\n")
    (tmp_path / "c.yaml").write_text(
        "platform: local\nmodel: org/tiny\nmodel_source: /no/such/fs/models--org--tiny\n"
        "run_dir: remote-runs\nhf_token: hf_INLINE_in_the_config\n")  # a secret in the file
    done = aegis(login, "submit", "-c", str(tmp_path / "c.yaml"), "--remote", HOST,
                 "--remote-aegis", remote_aegis, "--hf-token-file", str(tmp_path / "token"),
                 "--job-name", "viaSsh", env={"AEGIS_SSH_COMMAND": command})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "4242\n"
    (run_dir,) = [p for p in (login.home / "remote-runs").iterdir() if p.name != ".incoming"]
    assert run_dir.name.startswith("viaSsh-") and (run_dir / "config.yaml").is_file()
    assert (login.home / "sbatch.token").read_text() == secret  # by environment
    assert list((login.home / "remote-runs" / ".incoming").iterdir()) == []  # removed again
    for value in (secret, "hf_INLINE_in_the_config"):
        assert value not in log.read_text()  # never on an ssh command line
        for path in run_dir.iterdir():
            assert value not in path.read_text()


def test_a_relative_path_in_a_remote_config_is_refused_before_ssh(laptop, ssh_log, tmp_path):
    log, command = ssh_log
    (tmp_path / "c.yaml").write_text("platform: local\nmodel: m\nmodel_source: models/m\n")
    done = aegis(laptop, "submit", "-c", str(tmp_path / "c.yaml"), "--remote", HOST,
                 env={"AEGIS_SSH_COMMAND": command})
    assert done.returncode == 2
    assert errors(done.stderr) == [
        f"aegis: error: {tmp_path / 'c.yaml'}: model_source: models/m: a relative path; with "
        "--remote, paths name files on the login node: give it absolute"]
    assert not log.exists()


def test_batch_from_standard_input_is_refused_with_remote(laptop, ssh_log):
    log, command = ssh_log
    done = aegis(laptop, "batch", "--remote", HOST, "runs/x", "-", "-o", "out.jsonl",
                 env={"AEGIS_SSH_COMMAND": command})
    assert done.returncode == 2 and "INPUT -: standard input cannot go to --remote" in \
        done.stderr


# -- following the router: the tunnel's logic, with two local servers and no ssh -------------


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = self.server.name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _LocalHop:
    """A Remote stand-in whose `ssh -W` is a local relay: the tunnel's own logic alone."""

    target = "local"

    def connect(self):
        pass

    def stdio_forward(self, host, port):
        code = ("import socket,sys,threading,os\n"
                f"s=socket.create_connection(({host!r},{port}))\n"
                "def up():\n"
                "    while (d:=os.read(0,65536)): s.sendall(d)\n"
                "    s.shutdown(socket.SHUT_WR)\n"
                "threading.Thread(target=up,daemon=True).start()\n"
                "while (d:=s.recv(65536)): os.write(1,d)\n")
        return [sys.executable, "-c", code]


def test_the_tunnel_follows_the_router_to_the_next_generation():
    from aegis.clients.forward import Tunnel

    servers = []
    for name in ("first", "second"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        server.name = name
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    current = {"n": 0}

    def status():
        port = servers[current["n"]].server_address[1]
        return {"phase": "ready", "instances": [], "routers": [
            {"model": "tiny", "state": "ready", "url": f"http://127.0.0.1:{port}/v1"}]}

    said = []
    tunnel = Tunnel(_LocalHop(), status, poll_interval=0.1, say=said.append)
    tunnel.wait_target()
    runner = threading.Thread(target=tunnel.serve, daemon=True)
    runner.start()

    def get() -> str:
        with socket.create_connection(("127.0.0.1", tunnel.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[1].decode()

    try:
        assert get() == "first"
        current["n"] = 1  # the chain's next generation serves elsewhere now
        deadline = time.monotonic() + 10
        while tunnel.target is None or tunnel.target.port != servers[1].server_address[1]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert get() == "second"
        assert any("(it moved)" in line for line in said)
    finally:
        tunnel.stop()
        runner.join(10)
        for server in servers:
            server.shutdown()


def test_pick_names_the_models_and_prefers_the_router():
    from aegis.clients.forward import pick
    from aegis.config import ConfigError

    inst = {"model": "a", "state": "ready", "url": "http://n1:8000/v1"}
    router = {"model": "a", "state": "ready", "url": "http://n1:8002/v1"}
    assert pick({"phase": "ready", "instances": [inst], "routers": [router]}, None)[1].port == 8002
    assert pick({"phase": "ready", "instances": [inst], "routers": []}, "a")[1].kind == "instance"
    with pytest.raises(ConfigError, match="serves a, b: name one with --model"):
        pick({"instances": [inst, {**inst, "model": "b"}]}, None)
    model, target, why = pick({"phase": "ended", "reason": "job 1 cancelled",
                               "instances": [inst]}, None)
    assert target is None and why == "the run ended: job 1 cancelled"


def test_fetch_on_the_login_node_with_a_token_file_from_the_laptop(laptop, ssh_log, tmp_path):
    """aegis fetch --remote: the weights land on the login node (a --to with spaces and
    quotes), the token file goes over the connection only, and nothing is left of it there."""
    from standin_hub import Hub, Repo, serve

    login = laptop
    log, command = ssh_log
    hub = Hub({"org/gated": Repo({"config.json": b"{}", "model.safetensors": b"w" * 4096},
                                 gated_token="hf_granted_token")})
    server, url = serve(hub)
    token = tmp_path / "token"
    token.write_text("hf_granted_token\n")
    try:
        done = aegis(login, "fetch", "--remote", HOST, "org/gated", "--to", "hub dir 'q' $(x)",
                     "--hf-token-file", str(token), "-q",
                     env={"AEGIS_SSH_COMMAND": command,
                          "AEGIS_REMOTE_AEGIS": login.aegis_command(HF_ENDPOINT=url)})
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    storage = login.home / "hub dir 'q' $(x)" / "models--org--gated"
    assert done.stdout == f"{storage}\n"
    assert (storage / "refs" / "main").is_file() and storage.stat().st_uid == login.uid
    assert "hf_granted_token" not in log.read_text()
    assert list((login.home / "aegis-runs" / ".incoming").iterdir()) == []
