"""Aegis on a login node, from a laptop: the login-side commands run there over the system's
OpenSSH client (`ssh`, an argv list, no shell on this side), so ~/.ssh/config, ProxyJump, keys
and agents work as the user set them up. docs/laptop.md is the user's page.

One authentication per session: the first command starts a master connection (ControlMaster,
ControlPersist) whose socket lives in a private 0700 directory ($XDG_RUNTIME_DIR/aegis/ssh, else
~/.cache/aegis/ssh); every later command, file copy and tunnel rides on it, so a site with
one-time passwords asks once. Host keys are never accepted on the user's behalf (no
StrictHostKeyChecking option is passed: the user's own setting decides, and with no terminal
BatchMode makes ssh refuse instead of asking).

The remote aegis is started as `<remote_aegis> --over-ssh ARGS...`, every argument quoted with
shlex.quote; `--over-ssh` (hidden) makes it ignore AEGIS_REMOTE (no second hop) and watch its
standard input, which this side keeps open and never writes: when the laptop's aegis or the
connection goes away, that input ends and the remote command stops (no process left behind
on the login node, even when the laptop's aegis is SIGKILLed: its ssh child sees the same end
of input and exits with it).

Failures of the connection itself are RemoteError, one line, exit EXIT_REMOTE (4): an unknown
or changed host key, a refused login, a host that cannot be reached, a connection lost
mid-command, aegis not found there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import re
import shlex
import stat
import subprocess
import sys
import threading
from typing import IO, Mapping, Sequence

from .config import ConfigError
from .config.checks import Invalid, check_remote, check_remote_aegis

EXIT_REMOTE = 4
OVER_SSH = "--over-ssh"  # the hidden option the laptop's aegis gives the remote one
ENV_REMOTE, ENV_REMOTE_AEGIS, ENV_SSH = "AEGIS_REMOTE", "AEGIS_REMOTE_AEGIS", "AEGIS_SSH_COMMAND"
CONTROL_PERSIST = "30m"  # an idle master stays this long after its last command
CONNECT_TIMEOUT = 120.0  # seconds a master may take to log in when nobody can type (BatchMode)
_SOCKET_MAX = 104 - 20  # sun_path (108 on Linux, 104 on macOS) less ssh's temporary suffix
CALLER_GONE_GRACE = 30.0  # seconds the remote side may take to stop once its caller is gone
_TAIL = 8192  # bytes of the remote standard error kept to say why a command failed


class RemoteError(RuntimeError):
    """The login node could not be reached or used: one line, exit EXIT_REMOTE."""


def resolve(flag: str | None, configured: str | None = None,
            environ: Mapping[str, str] | None = None) -> str | None:
    """The login node to run on: --remote (an empty value: here), else the config's `remote`,
    else $AEGIS_REMOTE. None: run here."""
    environ = os.environ if environ is None else environ
    for value, where in ((flag, "--remote"), (configured, "remote"),
                         (environ.get(ENV_REMOTE), f"${ENV_REMOTE}")):
        if value is not None:
            return _checked(check_remote, value, where) if value else None
    return None


def resolve_aegis(flag: str | None, configured: str | None = None,
                  environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    for value, where in ((flag, "--remote-aegis"), (configured, "remote_aegis"),
                         (environ.get(ENV_REMOTE_AEGIS), f"${ENV_REMOTE_AEGIS}")):
        if value:
            return _checked(check_remote_aegis, value, where)
    return "aegis"


def _checked(check, value: str, where: str) -> str:
    try:
        return check(value)
    except Invalid as err:
        raise ConfigError(f"{where}: {err}") from None


def ssh_command(environ: Mapping[str, str]) -> list[str]:
    """`ssh`, or $AEGIS_SSH_COMMAND split like a shell (e.g. `ssh -F ~/.ssh/aegis.conf`)."""
    text = environ.get(ENV_SSH) or "ssh"
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise ConfigError(f"${ENV_SSH}: cannot split {text!r}: {err}") from None
    if not words:
        raise ConfigError(f"${ENV_SSH} is empty; unset it or name the ssh command")
    return words


def control_dir(environ: Mapping[str, str]) -> str:
    """The private directory of the master sockets: made 0700, and refused unless it is a real
    directory of this user's that nobody else can enter."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    candidates = ([os.path.join(runtime, "aegis", "ssh")] if runtime and os.path.isabs(runtime)
                  else []) + [os.path.join(os.path.expanduser("~"), ".cache", "aegis", "ssh")]
    candidates.append(f"/tmp/aegis-ssh-{os.getuid()}")  # when the others' paths are too long
    for path in candidates:
        if len(path) + 1 + 24 > _SOCKET_MAX:
            continue
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError:
            continue
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise ConfigError(f"{path}: not a directory of yours; aegis keeps its ssh master "
                              "sockets there and will not use it (remove it)")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, 0o700)
        return path
    raise ConfigError("no private directory for the ssh master socket (tried "
                      f"{', '.join(candidates)}); set XDG_RUNTIME_DIR to a short private one")


def has_terminal() -> bool:
    """Whether ssh could ask the user something (a passcode, a host key): a controlling
    terminal. Without one aegis passes BatchMode=yes, so ssh fails instead of waiting."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _printable(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", "?", text).strip()


def why_not_connected(target: str, stderr: bytes, batch: bool) -> str:
    """One line from what ssh said when it could not connect or log in."""
    lines = [_printable(line) for line in stderr.decode(errors="replace").splitlines()]
    lines = [line for line in lines if line and not line.startswith(("@@@", "Warning: Perm"))]
    text = " ".join(lines)
    said = lines[-1] if lines else "no message"

    def first(*needles: str) -> str:
        return next((line for line in lines if any(n in line.lower() for n in needles)), said)

    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr.decode(errors="replace"):
        return (f"{target}: its host key has CHANGED since you last connected, and ssh refused "
                "it (a reinstalled host, or someone in between); aegis never accepts a host key "
                "for you: ask your site, then fix ~/.ssh/known_hosts (ssh -R HOST removes the "
                "old key)")
    low = text.lower()
    if "host key verification failed" in low or "host key is known" in low:
        return (f"{target}: its host key is not known here and aegis never accepts one for "
                f"you: run `ssh {target}` once, compare the fingerprint with the one your site "
                "publishes, answer yes, then run aegis again")
    if "permission denied" in low or "too many authentication failures" in low:
        hint = ("; with no terminal aegis cannot ask for a password or passcode: log in once "
                "from a terminal (aegis status --remote ...), later commands reuse that "
                "connection" if batch else "")
        return (f"{target}: the login was refused ({first('permission denied', 'too many')}): "
                "check the user name (USER@HOST, or User in ~/.ssh/config) and that ssh offers "
                f"a key the host accepts (ssh-add -l){hint}")
    if "could not resolve hostname" in low or "name or service not known" in low:
        return f"{target}: unknown host ({first('resolve', 'not known')})"
    reach = ("connection refused", "timed out", "no route to host", "network is unreachable",
             "connection closed", "connection reset", "kex_exchange_identification",
             "broken pipe", "proxy")
    if any(n in low for n in reach):
        return f"{target}: cannot reach it ({first(*reach)})"
    return f"{target}: ssh could not connect ({said})"


class Remote:
    """One login node, reached over one ssh master connection."""

    def __init__(self, target: str, aegis: str = "aegis", *,
                 environ: Mapping[str, str] | None = None, batch: bool | None = None):
        environ = os.environ if environ is None else environ
        self.target = _checked(check_remote, target, "--remote")
        self.aegis = _checked(check_remote_aegis, aegis, "remote_aegis")
        self.ssh = ssh_command(environ)
        self.dir = control_dir(environ)
        digest = hashlib.sha256(self.target.encode()).hexdigest()[:20]
        self.socket = os.path.join(self.dir, digest)
        self.batch = (not has_terminal()) if batch is None else batch

    def __repr__(self) -> str:
        return f"Remote({self.target!r})"

    # -- the master connection -------------------------------------------------------------
    def _options(self) -> list[str]:
        options = ["-o", f"ControlPath={self.socket}", "-o", "ClearAllForwardings=yes"]
        return options + (["-o", "BatchMode=yes"] if self.batch else [])

    def _client(self, *extra: str) -> list[str]:
        """argv of a client of the master (never a master itself, never a pty)."""
        return [*self.ssh, *self._options(), "-o", "ControlMaster=no", "-T", *extra]

    def alive(self) -> bool:
        """Whether the master connection answers (`ssh -O check`, local only)."""
        try:
            done = subprocess.run([*self.ssh, *self._options(), "-O", "check", "--", self.target],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    @contextlib.contextmanager
    def _lock(self):
        fd = os.open(self.socket + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def connect(self) -> None:
        """Make sure the master connection is up; start it (log in) when it is not. Under a
        lock, so that two commands started at once do not log in twice."""
        if self.alive():
            return
        with self._lock():
            if self.alive():
                return
            with contextlib.suppress(FileNotFoundError):  # a dead master's socket
                if stat.S_ISSOCK(os.lstat(self.socket).st_mode):
                    os.unlink(self.socket)
            argv = [*self.ssh, *self._options(), "-o", "ControlMaster=yes",
                    "-o", f"ControlPersist={CONTROL_PERSIST}", "-o", "ServerAliveInterval=15",
                    "-o", "ServerAliveCountMax=4", "-f", "-N", "--", self.target]
            try:
                # -f: ssh returns once logged in, the master detached (its standard streams to
                # /dev/null, so reading its standard error ends then). A prompt (passcode, a
                # new host key) goes to the terminal, never through here.
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            except FileNotFoundError:
                raise RemoteError(f"{self.ssh[0]}: not found; aegis --remote needs the OpenSSH "
                                  f"client (or ${ENV_SSH})") from None
            try:
                _, err = proc.communicate(timeout=CONNECT_TIMEOUT if self.batch else None)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise RemoteError(f"{self.target}: no login within {CONNECT_TIMEOUT:g}s") \
                    from None
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            if proc.returncode != 0:
                raise RemoteError(why_not_connected(self.target, err or b"", self.batch))

    def close(self) -> None:
        """End the master connection now (`ssh -O exit`)."""
        subprocess.run([*self.ssh, *self._options(), "-O", "exit", "--", self.target],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, check=False)

    # -- commands ---------------------------------------------------------------------------
    def shell(self, command: str, *, data: bytes | None = None, capture: bool = False,
              relay: IO[bytes] | None = None) -> tuple[int, bytes, bytes]:
        """Run one command line in the login shell there. Returns (exit status, standard
        output when `capture`, the tail of standard error). Its standard error is relayed as
        it comes (to `relay`, default this process's). `data` is its whole standard input;
        without it the input stays open and empty until the command ends (its caller is
        alive). RemoteError when the connection was lost (ssh's 255)."""
        self.connect()
        argv = self._client("--", self.target, command)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE if capture else None,
                                stderr=subprocess.PIPE)
        tail = bytearray()
        out = relay or getattr(sys.stderr, "buffer", None) or _Text(sys.stderr)

        def pump_stderr() -> None:
            assert proc.stderr is not None
            fd = proc.stderr.fileno()
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                tail.extend(chunk)
                del tail[:-_TAIL]
                with contextlib.suppress(OSError, ValueError):
                    out.write(chunk)
                    out.flush()

        reader = threading.Thread(target=pump_stderr, daemon=True)
        reader.start()
        stdout = b""
        try:
            assert proc.stdin is not None
            if data is not None:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(data)
                proc.stdin.close()
            if capture:
                assert proc.stdout is not None
                stdout = proc.stdout.read()
            proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM turned into an exception: take ssh along
            proc.kill()
            proc.wait()
            raise
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            reader.join(timeout=5)
        if proc.returncode == 255:  # ssh's own failure: aegis and shells never exit 255
            raise RemoteError(f"{self.target}: the connection was lost (a run keeps going; "
                              "run the command again once the login node answers)")
        return proc.returncode, stdout, bytes(tail)

    def aegis_command(self, args: Sequence[str]) -> str:
        return " ".join([self.aegis, OVER_SSH, *(shlex.quote(a) for a in args)])

    def run(self, args: Sequence[str], *, capture: bool = False,
            relay: IO[bytes] | None = None) -> tuple[int, bytes]:
        """`aegis ARGS...` there: (its exit status, its standard output when `capture`). Its
        standard error (progress, one-line errors) is relayed here as it comes."""
        code, out, err = self.shell(self.aegis_command(args), capture=capture, relay=relay)
        if code in (126, 127):
            raise RemoteError(f"{self.target}: aegis could not be started there "
                              f"(exit {code}: {'not found' if code == 127 else 'not executable'}"
                              f", remote_aegis {self.aegis!r}): install aegis on the login node,"
                              " or say how to start it with --remote-aegis / remote_aegis / "
                              f"${ENV_REMOTE_AEGIS} (e.g. 'module load frameworks; aegis')")
        if code == 2 and b"no such option" in err.lower() and OVER_SSH.encode() in err:
            raise RemoteError(f"{self.target}: the aegis there is older than this one and "
                              "cannot be driven over ssh; update it there")
        return code, out

    def put(self, path: str, data: bytes) -> None:
        """Write `data` into the file `path` there (mode 0600; its directory made 0700 when
        new), through the connection's standard input: never on a command line."""
        parent = posixpath.dirname(path) or "."
        code, _, err = self.shell(f"umask 077 && mkdir -p -- {shlex.quote(parent)} && "
                                  f"cat > {shlex.quote(path)}", data=data, capture=True,
                                  relay=_Discard())
        if code != 0:
            raise RemoteError(f"{self.target}: cannot write {path} there "
                              f"({_printable(err.decode(errors='replace'))[-200:] or code})")

    def remove(self, *paths: str) -> None:
        """Remove files there; best effort (a lost connection leaves them: they are 0600)."""
        if paths:
            with contextlib.suppress(RemoteError, OSError):
                self.shell("rm -f -- " + " ".join(shlex.quote(p) for p in paths),
                           data=b"", capture=True, relay=_Discard())

    def stdio_forward(self, host: str, port: int) -> list[str]:
        """argv of `ssh -W host:port` over the master: its standard input and output are one
        TCP connection from the login node to host:port."""
        if not re.fullmatch(r"[A-Za-z0-9_.:%-]{1,253}", host) or host.startswith("-"):
            raise RemoteError(f"{host!r}: not a host name to forward to")
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self._client("-W", where, "--", self.target)


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


class _Text:
    """A text stream (one without .buffer, as in click's test runner) taking bytes."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data: bytes) -> int:
        self.stream.write(data.decode(errors="replace"))
        return len(data)

    def flush(self) -> None:
        self.stream.flush()


def watch_caller() -> None:
    """The remote side of --over-ssh: the caller keeps this process's standard input open and
    never writes to it; when it ends (the laptop's aegis stopped or was killed, or the
    connection dropped), stop as Ctrl-C would (KeyboardInterrupt: cleanup runs), so nothing
    is left running on the login node."""
    import signal
    import time

    if threading.current_thread() is threading.main_thread():  # even where sshd ignored it
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 65536):
                pass
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(CALLER_GONE_GRACE)  # a batch finishing its lines, a fetch its file
        os._exit(1)

    threading.Thread(target=watch, name="aegis-caller-watch", daemon=True).start()


def incoming_dir(run_dir: str) -> str:
    """Where files sent for one command go on the login node: `<run_dir>/.incoming` (run_dir as
    the config says, relative to the home directory there, where ssh starts; `aegis list`
    skips dot names)."""
    if run_dir == "~" or run_dir.startswith("~/"):
        run_dir = run_dir[2:] or "."
    elif run_dir.startswith("~"):
        raise ConfigError(f"run_dir: {run_dir!r}: with --remote give it relative to your home "
                          "directory on the login node, or absolute")
    return posixpath.join(run_dir, ".incoming")


class Uploads:
    """Local files a command names (its config, a token file) sent to the login node for the
    time of one command: mode 0600 there, through the connection (never a command line), and
    removed again when the command ends."""

    def __init__(self, remote: Remote, directory: str):
        import secrets
        import time

        self.remote, self.directory = remote, directory
        self.prefix = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        self.sent: list[str] = []

    def send(self, data: bytes, label: str) -> str:
        path = posixpath.join(self.directory, f"{self.prefix}-{label}")
        self.remote.put(path, data)
        self.sent.append(path)
        return path

    def __enter__(self) -> Uploads:
        return self

    def __exit__(self, *exc) -> None:
        self.remote.remove(*self.sent)


def relative_paths(data: object, keys: Sequence[str]) -> list[str]:
    """`key: value` lines of a parsed config whose path is relative: with --remote they would
    resolve beside the copy sent to the login node, which is never what was meant."""
    found = []

    def look(mapping: object, where: str) -> None:
        if not isinstance(mapping, dict):
            return
        for key in keys:
            value = mapping.get(key)
            if isinstance(value, str) and value and not value.startswith(("/", "~", "$")):
                found.append(f"{where}{key}: {value}")

    look(data, "")
    if isinstance(data, dict) and isinstance(data.get("models"), list):
        for i, model in enumerate(data["models"]):
            look(model, f"models[{i}].")
    return found
