"""A run you can hold: `aegis.submit(config) -> Run`, `Run.open(run_dir) -> Run`.

A Run owns its directory (aegis.layout), its batch system and job id. It reads the job's state
from the scheduler and every instance's state from the endpoints file, which the launcher
rewrites on every change and on a heartbeat. A run started by `aegis launch` has no job id:
its launcher's pid (on this host) and heartbeat tell whether it is alive.

    run = aegis.submit("fleet.yaml")
    run.wait_ready(timeout=1800)
    url = run.router_url()          # one OpenAI-compatible URL per model
    run.cancel()

A chain directory (`aegis submit --chain N`) opens as its newest serving generation: the job
named in the chain's endpoints file, whose endpoints that file mirrors; cancel() cancels
every generation.

Run files are input, never trusted: a Run opens only a run directory (and endpoints file) of
the caller's (owner uid), reads each file as a bounded regular file without blocking
(aegis.config.read_run_file) and checks every field; anything else is RunDirError (exit 2).
A launched run's launcher counts as alive only while its heartbeat is fresh and, on its
host, its process is the one recorded (pid, start time, boot id); cancel() signals it through
a pidfd after checking that, and refuses a run directory others can write.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from . import pids
from .config import Config, ConfigError, load_config
from .files import MAX_JOB_ID_BYTES, RefusedFile, read_run_file, why_unreadable
from .runfiles import (FINAL_LAUNCHER_STATES, launcher_alive, launcher_identity, read_endpoints,
                       read_record)
from .layout import API_KEY_NAME, CHAIN_NAME, ENDPOINTS_NAME, RunLayout

# Phases of a run, in order; failed and ended are final.
PHASES = ("pending", "starting", "ready", "failed", "ended")
_ENDED_JOB_STATES = ("completed", "failed", "cancelled")


class RunError(RuntimeError):
    """The run failed or ended, or cannot be acted on (exit 1)."""


class WaitTimeout(RunError):
    """wait_ready() ran out of time: the run may still come up."""


class RunDirError(ConfigError):
    """The run directory or one of its files cannot be used: missing, unreadable, damaged, or
    not the caller's (exit 2, like any bad input). One line, naming the path."""


def _stat(path: str, what: str) -> os.stat_result | None:
    """os.stat, None when missing; RunDirError when it cannot be looked at."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise RunDirError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    except ValueError as err:  # a NUL in the path
        raise RunDirError(f"{path!r}: not a path ({err})") from None


def _check_owned(path: str, st: os.stat_result, what: str, *, for_cancel: bool = False) -> None:
    """The caller's own `what`; for cancel also not writable by group or others (unless a
    sticky directory such as /tmp, where others cannot replace what is yours)."""
    uid = os.getuid()
    if st.st_uid != uid:
        raise RunDirError(f"{path}: {what} owned by uid {st.st_uid}, not by you (uid {uid}); "
                          "aegis acts only on your own runs")
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if for_cancel and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
        raise RunDirError(f"{path}: {what} is writable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); refusing to cancel through it "
                          f"(chmod go-w {path})")


def _owned_dir(path: str, what: str = "run directory", *, for_cancel: bool = False) -> None:
    st = _stat(path, what)
    if st is None:
        raise RunDirError(f"{path}: no such run directory")
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"{path}: not a directory")
    _check_owned(path, st, what, for_cancel=for_cancel)


def _read(path: str, limit: int, what: str) -> str | None:
    """A run file's text (read_run_file), None when missing; RunDirError otherwise."""
    try:
        return read_run_file(path, limit)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError, RefusedFile) as err:
        raise RunDirError(f"{path}: cannot read {what}: {why_unreadable(err)}") from None
    except ValueError as err:  # a NUL in the path
        raise RunDirError(f"{path!r}: not a path ({err})") from None


def _load_run_config(path: str) -> Config:
    """The run's config.yaml; its problems name the file."""
    try:
        return load_config(path, run_file=True)
    except ConfigError as err:
        lines = [line if line.startswith(path) else f"{path}: {line}"
                 for line in str(err).splitlines()]
        raise RunDirError("\n".join(lines)) from None


@dataclass(frozen=True)
class Endpoint:
    """One instance, or one model's router, as a client sees it."""

    url: str  # OpenAI base URL, http://host:port/v1
    model: str  # the served model name (what requests name)
    host: str  # the serving address of its node (as in the URL)
    node: int | None  # its node's index in the allocation (0: the first node), as everywhere
    state: str  # INSTANCE_STATES (aegis.runfiles); routers: starting | ready | restarting |
    #             failed | stopped
    id: int | None = None  # instance id; None for a router
    restarts: int = 0
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Status:
    run_dir: str
    job_id: str | None
    scheduler: str | None
    job_state: str  # a scheduler state (aegis.scheduler.JOB_STATES), or for a launched run:
    #                 running | ended | unknown
    phase: str  # PHASES
    reason: str  # why failed/ended, or what is awaited ("" when ready)
    ready: int
    total: int
    instances: tuple[Endpoint, ...] = ()
    routers: tuple[Endpoint, ...] = ()
    launcher: dict[str, Any] | None = None  # pid, host, heartbeat, alive
    endpoints_file: str = ""

    @property
    def gone(self) -> bool:
        """The job or the launcher is gone: nothing is served, whatever its last write said."""
        return _gone(self.job_state, self.launcher) or self.phase == "ended"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["instances"] = [e.to_dict() for e in self.instances]
        out["routers"] = [e.to_dict() for e in self.routers]
        return out


def _gone(job_state: str, launcher: dict[str, Any] | None) -> bool:
    return (launcher is not None and not launcher["alive"]) or \
        job_state in _ENDED_JOB_STATES + ("exiting",)


def _endpoints_problem(err: Exception, path: str | None = None) -> str:
    """One line for an endpoints file read_endpoints refused."""
    if isinstance(err, OSError):
        return (f"{err.filename or path}: cannot read the endpoints file "
                f"({err.strerror or err})")
    text = str(err)
    where, _, why = text.partition(": ")
    return f"{where}: unreadable endpoints file: {why}" if why else f"unreadable endpoints " \
        f"file: {text}"


class Run:
    def __init__(self, layout: RunLayout, config: Config, *, job_id: str | None = None,
                 backend=None):
        self.layout = layout
        self.config = config
        self.job_id = job_id
        self.backend = backend  # None: started by `aegis launch` (no batch job to ask)
        self.chain_dir: str | None = None  # set when opened from a chain directory
        self.chain_jobs: list[str] = []  # every generation's job id, in order

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, run_dir: str | os.PathLike, *, scheduler: str | None = None,
             _generation: bool = False) -> Run:
        """The run in `run_dir` (made by `aegis submit` or `aegis launch`), or a chain
        directory's current generation. RunDirError (a ConfigError) when it is not yours,
        not a run directory, or a file in it is unreadable or damaged."""
        from .scheduler import check_job_id, get_backend

        try:
            layout = RunLayout(os.path.abspath(os.fspath(run_dir)))
        except ValueError as err:  # a NUL in the path
            raise RunDirError(f"{run_dir!r}: not a path ({err})") from None
        _owned_dir(layout.root)
        have_config = _stat(layout.config, "the run's config") is not None
        if not have_config and not _generation and \
                _stat(os.path.join(layout.root, CHAIN_NAME), "the chain record") is not None:
            return cls._open_chain(layout.root, scheduler)
        if not have_config:
            raise RunDirError(f"{run_dir}: not a run directory (no "
                              f"{os.path.basename(layout.config)}; made by aegis submit or "
                              "aegis launch)")
        config = _load_run_config(layout.config)
        job_id = None
        text = _read(layout.job_id, MAX_JOB_ID_BYTES, "the job id")
        if text is not None:
            try:
                job_id = check_job_id(text.strip())
            except ConfigError:
                shown = repr(text.strip()[:40]) + ("..." if len(text.strip()) > 40 else "")
                raise RunDirError(f"{layout.job_id}: {shown} is not a job id (e.g. '12345' or "
                                  "'12345.aurora-pbs-0001')") from None
        backend = get_backend(scheduler or config.effective_scheduler) if job_id else None
        return cls(layout, config, job_id=job_id, backend=backend)

    @classmethod
    def _open_chain(cls, chain_dir: str, scheduler: str | None) -> Run:
        """The generation the chain's endpoints file names (the first before any wrote it)."""
        try:
            runs = read_record(chain_dir)
        except (OSError, ValueError) as err:
            raise RunDirError(str(err) if isinstance(err, ValueError) else
                              f"{chain_dir}/{CHAIN_NAME}: cannot read the chain record "
                              f"({err.strerror or err})") from None
        if not runs:
            raise RunDirError(f"{chain_dir}/{CHAIN_NAME}: no generation recorded")
        current = min(runs)
        try:
            doc = read_endpoints(os.path.join(chain_dir, ENDPOINTS_NAME), owner=os.getuid())
            current = doc.get("generation") or current
        except FileNotFoundError:
            pass  # no generation wrote it yet
        except (OSError, ValueError) as err:
            raise RunDirError(_endpoints_problem(err)) from None
        run_dir = runs.get(current, runs[min(runs)])[1]
        if run_dir is None:
            raise RunDirError(f"{chain_dir}/{CHAIN_NAME}: generation {current} has no run_dir")
        run = cls.open(run_dir, scheduler=scheduler, _generation=True)
        run.chain_dir = chain_dir
        run.chain_jobs = [runs[g][0] for g in sorted(runs)]
        return run

    @classmethod
    def submit(cls, config: Config | str | os.PathLike, **overrides: Any) -> Run:
        """Render, write and submit a run (like `aegis submit`) and hold it; `config` is a
        Config or a YAML path, `overrides` config keys on top."""
        from .platforms import get_platform
        from .scheduler import get_backend
        from .scheduler import submit as submission

        if not isinstance(config, Config):
            config = load_config(os.fspath(config), overrides)
        elif overrides:
            config = config.replace(**overrides)
        backend = get_backend(config.effective_scheduler)
        if config.download_weights:  # here (the login node), before anything is submitted
            from .config import check_submittable
            from .weights import fetch_models

            check_submittable(config, get_platform(config.platform))
            fetch_models(config)
        result = submission.submit(config, get_platform(config.platform), backend)
        run = cls.open(result.run_dir)
        run.warnings = result.warnings
        return run

    @property
    def run_dir(self) -> str:
        return self.layout.root

    @property
    def endpoints_path(self) -> str:
        if self.chain_dir:  # the chain's file: it names the newest generation serving
            return os.path.join(self.chain_dir, ENDPOINTS_NAME)
        return self.layout.endpoints(self.config.endpoints_file)

    def __repr__(self) -> str:
        return f"Run({self.run_dir!r}, job_id={self.job_id!r})"

    # -- reading ---------------------------------------------------------------------------
    def _document(self) -> dict[str, Any] | None:
        try:
            return read_endpoints(self.endpoints_path, owner=os.getuid())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise RunDirError(_endpoints_problem(err, self.endpoints_path)) from None

    @staticmethod
    def _launcher(doc: dict[str, Any] | None) -> dict[str, Any] | None:
        """The launcher record plus `alive` (launch.endpoints.launcher_alive: a fresh heartbeat
        and, on its host, the recorded process) and `heartbeat_age` in seconds."""
        if not doc:
            return None
        info = dict(doc["launcher"])
        now = time.time()
        age = now - info["heartbeat_at"]
        info.update(alive=launcher_alive(doc, now), heartbeat_age=round(age, 1))
        return info

    def state(self, min_ready: int | None = None) -> Status:
        """The job state from the scheduler and every instance's from the endpoints file;
        the phase counts the run ready with `min_ready` instances (default: all)."""
        doc = self._document()
        launcher = self._launcher(doc)
        if self.backend is not None:
            job_state = self.backend.state(self.job_id)
        elif launcher is None:
            job_state = "unknown"  # no heartbeat yet: the launcher may still be preparing
        else:
            job_state = "running" if launcher["alive"] else "ended"
        records = (doc or {}).get("instances") or []
        # read_endpoints checked every field's type
        instances = tuple(Endpoint(
            url=r.get("base_url", ""), model=r.get("served_name", r.get("model", "")),
            host=r.get("host", ""), node=r.get("node"), state=r["state"], id=r.get("id"),
            restarts=r.get("restarts") or 0, error=r.get("error", ""))
            for r in records)
        routers = tuple(Endpoint(url=r.get("url", ""), model=r.get("model", ""),
                                 host=r.get("host", ""), node=r.get("node", 0),
                                 state=r.get("state", "ready"), restarts=r.get("restarts") or 0,
                                 error=r.get("error", ""))
                        for r in (doc or {}).get("routers") or [])
        total = len(instances) or self.config.total_instances
        # a dead launcher or an ended job serves nothing, whatever its last write said
        ready = 0 if _gone(job_state, launcher) else sum(e.state == "ready" for e in instances)
        phase, reason = self._phase(job_state, launcher, instances, routers, total, ready,
                                    doc is not None, min_ready)
        return Status(run_dir=self.run_dir, job_id=self.job_id,
                      scheduler=self.backend.name if self.backend else None,
                      job_state=job_state, phase=phase, reason=reason, ready=ready, total=total,
                      instances=instances, routers=routers, launcher=launcher,
                      endpoints_file=self.endpoints_path)

    def _phase(self, job_state, launcher, instances, routers, total, ready, have_file,
               min_ready) -> tuple[str, str]:
        # Once the fleet serves, one ready instance serves: a run with some instances down
        # (restarting, unhealthy, failed) is ready, degraded; --min-ready still decides.
        serving = launcher is not None and launcher.get("state") == "serving"
        need = min(min_ready, total) if min_ready is not None else 1 if serving else total
        if job_state in ("queued", "held"):
            return "pending", f"job {self.job_id} is {job_state}"
        if job_state in _ENDED_JOB_STATES or job_state == "exiting":
            return ("failed" if job_state == "failed" else "ended"), f"job {self.job_id} {job_state}"
        if launcher is not None and not launcher["alive"]:
            state, code = launcher.get("state"), launcher.get("exit_code")
            if state == "failed":
                return "failed", f"the launcher failed (exit code {code}; see {self.run_dir})"
            if state == "stopped":
                return "ended", f"the launcher stopped (exit code {code})"
            return "ended", "the launcher is not running" + (
                f" (last heartbeat {launcher['heartbeat_age']:.0f}s ago)"
                if launcher.get("heartbeat_age") is not None else "")
        if job_state == "unknown" and self.backend is not None:
            return "ended", f"the batch system does not know job {self.job_id}"
        if launcher is not None and launcher.get("state") == "staging":
            return "starting", "staging model sources"
        failed = sum(e.state == "failed" for e in instances)
        if failed > total - need:
            return "failed", f"{failed} of {total} instance(s) failed; {need} needed"
        if not have_file:
            return "starting", "no endpoints file yet"
        if ready < need:
            return "starting", (f"{ready} of {total} instance(s) ready"
                                + (f"; {need} needed" if need != total else ""))
        # a router that was up and is restarting makes the run degraded, not starting
        settled = {r.model for r in routers
                   if r.state in ("ready", "failed", "stopped", "restarting")}
        missing = [m for m in self.config.routed_models if m not in settled
                   and any(e.model == m and e.state == "ready" for e in instances)]
        if missing:
            return "starting", f"router of {', '.join(missing)} not up yet"
        down = [f"router of {r.model} {r.state}" for r in routers if r.state != "ready"]
        if ready < total or down:
            return "ready", "; ".join([f"degraded: {ready} of {total} instance(s) ready", *down])
        return "ready", ""

    def endpoints(self, model: str | None = None, *, ready_only: bool = True) -> list[Endpoint]:
        """The instances (ready ones unless ready_only=False: none once the run ended), of one
        served model or all."""
        st = self.state()
        found = [e for e in st.instances if (model is None or e.model == model)
                 and ((e.state == "ready" and not st.gone) or not ready_only)]
        if model is not None and not found and model not in self.models():
            raise ConfigError(f"--model {model!r}: this run serves {', '.join(self.models())}")
        return found

    def routers(self) -> list[Endpoint]:
        """Every model's router record (state "ready" only while the run is live)."""
        st = self.state()
        if st.gone:
            return [replace(r, state="stopped") if r.state == "ready" else r for r in st.routers]
        return list(st.routers)

    def router_url(self, model: str | None = None) -> str:
        """The routed URL of `model` (may be omitted when the run serves one model)."""
        routers = {r.model: r.url for r in self.routers() if r.state == "ready"}
        if model is None:
            if len(self.models()) != 1:
                raise ConfigError(f"this run serves {len(self.models())} models; name one "
                                  f"({', '.join(self.models())})")
            model = self.models()[0]
        if model not in self.models():
            raise ConfigError(f"--model {model!r}: this run serves {', '.join(self.models())}")
        if model not in routers:
            why = ("router is off for it (router: false, or fewer than 2 instances)"
                   if model not in self.config.routed_models else "its router is not up yet")
            raise RunError(f"no router URL for {model!r}: {why}")
        return routers[model]

    def models(self) -> list[str]:
        return [m.served_name for m in self.config.models]

    def api_key(self) -> str:
        """The key every request to this run's instances and routers must carry
        (`Authorization: Bearer <key>`; the OpenAI SDK's api_key): the value of the run's
        api_key_env variable here, else the key the launcher made for the run."""
        from .credential import CredentialError, read_key

        if self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env)
            if not key:
                raise RunError(f"this run's key is in ${self.config.api_key_env} (api_key_env), "
                               "which is not set here")
            return key
        path = (os.path.join(self.chain_dir, API_KEY_NAME) if self.chain_dir
                else self.layout.api_key)
        try:
            return read_key(path)
        except FileNotFoundError:
            raise RunError(f"{path}: no key yet (the launcher makes it when it starts)") from None
        except CredentialError as err:
            raise RunError(str(err)) from None

    # -- waiting and stopping ----------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None, min_ready: int | None = None, *,
                   interval: float = 1.0, on_change=None) -> Status:
        """Block until `min_ready` instances (default: all) and the routers are up.

        Raises RunError when the run failed or ended, WaitTimeout after `timeout` seconds.
        `on_change(status)` is called whenever the phase or ready count changes."""
        if min_ready is not None and min_ready < 1:
            raise ConfigError(f"--min-ready {min_ready}: must be >= 1")
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            status = self.state(min_ready)
            phase, reason = status.phase, status.reason
            if on_change and (phase, status.ready) != last:
                on_change(status)
                last = (phase, status.ready)
            if phase == "ready":
                return status
            if phase in ("failed", "ended"):
                raise RunError(f"run {phase}: {reason}")
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"not ready after {timeout:g}s: {reason}")
            wait = interval if deadline is None else min(interval, deadline - time.monotonic())
            time.sleep(max(0.0, wait))

    def cancel(self) -> str:
        """Cancel the batch job, or stop a launched run's launcher (SIGTERM; it cleans up).
        Returns what was done, one line. Acts only through a run directory (and endpoints
        file) of the caller's that nobody else can write (RunDirError), and signals only the
        recorded launcher process (pid, start time, boot id), through a pidfd."""
        _owned_dir(self.run_dir, for_cancel=True)
        if self.chain_dir:
            _owned_dir(self.chain_dir, "chain directory", for_cancel=True)
        if self.chain_jobs and self.backend is not None:  # every generation, queued or not
            from .scheduler import SchedulerError

            done, failed = [], []
            for job in self.chain_jobs:
                try:
                    self.backend.cancel(job)
                    done.append(job)
                except SchedulerError as err:  # most often: that generation already ended
                    failed.append(f"{job} ({err})")
            if not done:
                raise RunError(f"cannot cancel the chain's jobs: {'; '.join(failed)}")
            return f"cancelled jobs {', '.join(done)}"
        if self.backend is not None:
            self.backend.cancel(self.job_id)
            return f"cancelled job {self.job_id}"
        return self._stop_launcher()

    def _stop_launcher(self) -> str:
        path = self.endpoints_path
        doc = self._document()  # a regular file of yours, every field checked
        if doc is None:
            raise RunError(f"{self.run_dir}: no launcher recorded in {path} yet; "
                           "stop `aegis launch` with Ctrl-C or SIGTERM")
        for where, what in ((os.path.dirname(path), "endpoints file's directory"),
                            (path, "endpoints file")):
            st = _stat(where, f"the {what}")
            if st is not None:
                _check_owned(where, st, what, for_cancel=True)
        launcher = doc["launcher"]
        pid, host = launcher["pid"], launcher["host"]
        who = f"the launcher (pid {pid} on {host})"
        if launcher["state"] in FINAL_LAUNCHER_STATES:
            return f"{who} has {launcher['state']}; nothing to stop"
        verdict = launcher_identity(launcher)
        if verdict == "remote":
            if not launcher_alive(doc, time.time()):
                return f"{who} is not running (stale heartbeat); nothing to stop"
            raise RunError(f"the launcher runs on {host} (pid {pid}); run aegis cancel there")
        if verdict == pids.SAME:
            try:
                verdict = pids.signal_process(pid, launcher.get("start_ticks"),
                                              launcher.get("boot_id"), signal.SIGTERM)
            except PermissionError:
                raise RunError(f"{who}: not permitted to signal it") from None
            if verdict == pids.SAME:
                return f"sent SIGTERM to {who}"
        if verdict == pids.GONE:
            return f"{who} is not running; nothing to stop"
        if verdict == pids.OTHER:
            return (f"{who} is not running: pid {pid} now names another process (it started "
                    "at another time, or before a reboot); not signalled, nothing to stop")
        why = ("its endpoints file records no start time and boot id (written by an older "
               "aegis, or where /proc did not tell)"
               if launcher.get("start_ticks") is None or not launcher.get("boot_id")
               else "/proc does not say when that process started")
        raise RunError(f"cannot verify that pid {pid} is the launcher: {why}; not signalled "
                       f"(if it is, stop it yourself: kill {pid})")


def submit(config: Config | str | os.PathLike, **overrides: Any) -> Run:
    """Render, write and submit a run (like `aegis submit`); `config` is a Config or a YAML
    path, `overrides` config keys on top."""
    return Run.submit(config, **overrides)
