"""A login node for the --remote tests: a real OpenSSH server on a loopback port (sshd -f a
generated config, key-only, no PAM) in front of this machine, and a non-root user made for it
with useradd, whose home is the login node's home. The "laptop" is the test process (root):
it reaches the user through an ssh config of its own (AEGIS_SSH_COMMAND="ssh -F FILE") naming
the host `aegis-login`, with the server's own host key in a known_hosts file it uses
(UserKnownHostsFile), and `aegis-login-unknown` whose known_hosts is empty.

The user runs aegis with a Python it can reach: /usr/bin/python3 when it is this Python's
version, with this checkout's src/ and this interpreter's site-packages on PYTHONPATH (copied
into a readable place when they are not readable by others, e.g. a checkout under /root).
Needs root (useradd, sshd); tests call `require()` first.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SSHD = "/usr/sbin/sshd"


def require() -> str | None:
    """Why the login node cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (useradd, sshd)"
    if not os.access(SSHD, os.X_OK) or not shutil.which("ssh"):
        return f"needs the OpenSSH server and client ({SSHD}: scripts/setup-system installs it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, **kw)


class LoginNode:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="aegis-login-"))
        self.dir.chmod(0o755)
        self.user = f"aegisrt{os.getpid() % 100000}"
        self.home = self.dir / "home"
        self.port = _free_port()
        self.sshd: subprocess.Popen | None = None
        self._made_user = False
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    # -- set-up -----------------------------------------------------------------------------
    def _make(self) -> None:
        d = self.dir
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user_key"))
        _run("useradd", "-M", "-d", str(self.home), "-s", "/bin/bash", "-p", "*", self.user)
        self._made_user = True
        self.uid = pwd.getpwnam(self.user).pw_uid
        (self.home / ".ssh").mkdir(parents=True)
        shutil.copy(d / "user_key.pub", self.home / ".ssh" / "authorized_keys")
        for path in (self.home, self.home / ".ssh", self.home / ".ssh" / "authorized_keys"):
            os.chown(path, self.uid, self.uid)
        self.home.chmod(0o700)
        (d / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
            f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile .ssh/authorized_keys\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nUsePAM no\nStrictModes no\n"
            f"AllowUsers {self.user}\nMaxStartups 100\nMaxSessions 100\n")
        os.makedirs("/run/sshd", exist_ok=True)
        self.sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(d / "sshd.log", "wb"))
        host_key = (d / "host_key.pub").read_text().split()
        (d / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_key[0]} {host_key[1]}\n")
        (d / "known_hosts_empty").write_text("")
        common = (f"  HostName 127.0.0.1\n  Port {self.port}\n  User {self.user}\n"
                  f"  IdentityFile {d / 'user_key'}\n  IdentitiesOnly yes\n")
        (d / "ssh_config").write_text(
            f"Host aegis-login\n{common}  UserKnownHostsFile {d / 'known_hosts'}\n"
            f"Host aegis-login-unknown\n{common}  UserKnownHostsFile {d / 'known_hosts_empty'}\n"
            "  StrictHostKeyChecking ask\n")
        self.runtime = Path(tempfile.mkdtemp(prefix="aegis-xdg-", dir="/tmp"))  # short: socket
        self.python, pythonpath = self._python()
        self.env = {"PYTHONPATH": pythonpath, "LD_LIBRARY_PATH": str(Path(sys.prefix) / "lib"),
                    "PATH": "/usr/local/bin:/usr/bin:/bin"}
        self.remote_aegis = self.aegis_command()
        deadline = time.monotonic() + 10
        while True:
            done = subprocess.run(self.ssh("aegis-login", "true"), capture_output=True)
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not answer: {done.stderr.decode()[-500:]}; "
                                   f"{(d / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.1)

    def _python(self) -> tuple[str, str]:
        """A Python the user can run, and a PYTHONPATH with aegis and its dependencies."""
        wanted = f"{sys.version_info.major}.{sys.version_info.minor}"
        python = next((p for p in (f"/usr/bin/python{wanted}", "/usr/bin/python3")
                       if os.access(p, os.X_OK)), None)
        if python is None:
            raise RuntimeError(f"no /usr/bin/python{wanted} for the login node's user")
        extra = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                 if p and os.path.isdir(p) and Path(p).resolve() != (ROOT / "src").resolve()]
        paths = [str(ROOT / "src"), *site.getsitepackages(), *extra]
        probe = "import aegis.cli, aegis.launch, aiohttp, yaml, jinja2, mpi4py"
        # the user's python is a link in a directory with this environment's mpiexec beside it:
        # aegis takes the mpiexec beside sys.executable (PyPI mpich's, not a Slurm wrapper)
        bin_dir = self.dir / "bin"
        bin_dir.mkdir()
        (bin_dir / "python3").symlink_to(python)
        for tool in Path(sys.executable).parent.iterdir():  # hydra finds its proxy beside it
            if tool.name.startswith(("mpiexec", "mpirun", "hydra_")):
                (bin_dir / tool.name).symlink_to(tool)
        python = str(bin_dir / "python3")
        if self._as_user_ok(python, paths, probe):
            return python, os.pathsep.join(paths)
        copies = self.dir / "python"  # not readable as they are: copies the user can read
        copied = []
        for i, path in enumerate(paths):
            target = copies / str(i)
            shutil.copytree(path, target, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
            copied.append(str(target))
        subprocess.run(["chmod", "-R", "a+rX", str(copies)], check=True)
        if not self._as_user_ok(python, copied, probe):
            raise RuntimeError(f"the login node's user cannot import aegis with {python}")
        return python, os.pathsep.join(copied)

    def _as_user_ok(self, python: str, paths: list[str], probe: str) -> bool:
        env = {"PYTHONPATH": os.pathsep.join(paths), "LD_LIBRARY_PATH": str(Path(sys.prefix) / "lib"),
               "HOME": str(self.home), "PATH": "/usr/bin:/bin"}
        done = subprocess.run(["runuser", "-u", self.user, "--", "env", *(f"{k}={v}" for k, v in
                               env.items()), python, "-c", probe],
                              capture_output=True, cwd=self.home, timeout=60)
        return done.returncode == 0

    # -- use ----------------------------------------------------------------------------------
    def aegis_command(self, **env: str) -> str:
        """A remote_aegis that starts aegis as the user (variables set before it)."""
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in {**self.env, **env}.items()),
                         self.python, "-m", "aegis"])

    def ssh(self, host: str, *command: str) -> list[str]:
        return ["ssh", "-F", str(self.dir / "ssh_config"), "-o", "BatchMode=yes", host, *command]

    def laptop_env(self, **extra: str) -> dict[str, str]:
        """The environment of aegis on the laptop side (the test process's, plus the ssh set-up;
        no AEGIS_REMOTE unless given)."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("AEGIS_REMOTE", "AEGIS_REMOTE_AEGIS", "AEGIS_SSH_COMMAND")}
        env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "src"),
                                               os.environ.get("PYTHONPATH", "")]),
                   AEGIS_SSH_COMMAND=f"ssh -F {self.dir / 'ssh_config'}",
                   AEGIS_REMOTE_AEGIS=self.remote_aegis, XDG_RUNTIME_DIR=str(self.runtime))
        env.update(extra)
        return env

    def as_user(self, argv: list[str], env: dict[str, str] | None = None, **popen):
        """Start a process on the "login node" as its user, in its home directory."""
        full = {**self.env, "HOME": str(self.home), "USER": self.user, **(env or {})}
        return subprocess.Popen(["runuser", "-u", self.user, "--", "env",
                                 *(f"{k}={v}" for k, v in full.items()), *argv],
                                cwd=self.home, **popen)

    def processes(self) -> dict[int, str]:
        """pid -> command line of the user's live processes (the login node's side)."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != self.uid:
                    continue
                stat = (entry / "stat").read_bytes()
                if stat[stat.rindex(b")") + 2:].startswith(b"Z"):
                    continue
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace").strip()
            except OSError:
                continue
            if not cmd.startswith("sshd:"):  # the server's session processes
                found[int(entry.name)] = cmd
        return found

    def ssh_clients(self) -> dict[int, str]:
        """pid -> command line of laptop-side ssh processes that use this node's sockets."""
        found = {}
        needle = str(self.runtime).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes()
                stat = (entry / "stat").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ssh\0") and needle in cmd and \
                    not stat[stat.rindex(b")") + 2:].startswith(b"Z"):
                found[int(entry.name)] = cmd.replace(b"\0", b" ").decode(errors="replace")
        return found

    def masters(self) -> dict[int, str]:
        return {p: c for p, c in self.ssh_clients().items() if "ControlMaster=yes" in c}

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}")
            time.sleep(0.05)

    def close_masters(self) -> None:
        for pid in self.masters():
            with _quiet():
                os.kill(pid, signal.SIGTERM)
        self.wait_for(lambda: not self.masters(), 10, "the master connections to end")

    # -- tear-down ----------------------------------------------------------------------------
    def close(self) -> None:
        for pid in list(self.ssh_clients()):
            with _quiet():
                os.kill(pid, signal.SIGKILL)
        if self.sshd is not None:
            self.sshd.terminate()
            try:
                self.sshd.wait(10)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait()
        if self._made_user:
            for pid in self.processes():
                with _quiet():
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["userdel", self.user], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        if getattr(self, "runtime", None):
            shutil.rmtree(self.runtime, ignore_errors=True)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError))
