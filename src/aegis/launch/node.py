"""This node's runtime before its instances start: the packed environment or image staged and
unpacked (collective: every rank calls prepare_runtime), the vllm_command check inside it, and
the once-per-node pre-warm. Problems come back as one line for the caller to agree on."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..config import Config
from ..platforms import Platform
from .environment import Runtime, runtime_for, staged_dir, staged_file
from .instances import render_prewarm, vllm_command_argv
from .leftovers import hold_environment
from .pernode import NodeStepError, prewarm_node, unpack_environment


def runtime_problem(config: Config, runtime: Runtime, node: str) -> str | None:
    """Why instances cannot start here, or None: the command (or the container runtime) must
    exist, inside the packed environment when there is one."""
    if runtime.container_argv:
        tool = runtime.container_argv[0]
        if shutil.which(tool) is None:
            return f"container: {tool!r} not found on PATH on node {node}"
        return None
    cmd0 = vllm_command_argv(config)[0]
    if runtime.env_dir:
        bin_dir = os.path.join(runtime.env_dir, "bin")
        if shutil.which(cmd0, path=bin_dir) or (os.sep in cmd0 and os.access(cmd0, os.X_OK)):
            return None
        return (f"vllm_command: {cmd0!r} not found in env_source {config.env_source} "
                f"(looked in {bin_dir} on node {node})")
    if shutil.which(cmd0) is None:
        return f"vllm_command: {cmd0!r} not found on node {node}"
    return None


def prepare_runtime(config: Config, platform: Platform, coll, cache_root: Path, node: str, *,
                    timeout: float, stop, log=None, node_log=lambda msg: None
                    ) -> tuple[Runtime, str | None, bool]:
    """Collective. -> (runtime, problem or None, problem is bad input). `log`: rank 0's
    messages (None elsewhere); `node_log`: what this rank did for its node (the unpack)."""
    source = config.env_source or config.container
    env_dir = None
    if source and not stop.signum:
        from ..bcast import StagingError, stage

        dest = staged_dir(config.node_local_dir, source)
        try:
            result = stage(source, dest, coll.comm, writers="node", progress=log is not None)
        except StagingError as e:
            return Runtime(), f"staging {source} -> {dest} failed: {e}", False
        if log:
            how = ("unchanged, not moved" if result.cached else
                   f"{result.bytes / 1e6:.1f} MB in {result.seconds:.1f}s")
            log(f"staged {source} -> {dest} ({how})")
        if config.env_source:
            try:
                path, cached = unpack_environment(staged_file(config.node_local_dir, source),
                                                  config.node_local_dir, source, timeout=timeout,
                                                  checksum=result.checksum,
                                                  should_stop=lambda: stop.signum)
            except (NodeStepError, OSError) as e:
                return Runtime(), f"env_source on node {node}: {e}", False
            hold_environment(path)  # until this process ends: no sweep removes it meanwhile
            env_dir = str(path)
            if not cached:
                node_log(f"environment unpacked in {path}")
            elif log:
                log(f"environment already unpacked in {path}")
    runtime = runtime_for(config, platform, node_local_dir=config.node_local_dir,
                          env_dir=env_dir, binds=[config.hf_home, str(cache_root)])
    problem = runtime_problem(config, runtime, node) if source else None
    return runtime, problem, problem is not None


def prewarm(config: Config, platform: Platform, cache_root: Path, runtime: Runtime, node: str,
            rank: int, run_dir: str, models: list[str], *, stop, log) -> str | None:
    """The node's pre-warm, once per node (ranks sharing a node wait on its lock)."""
    script = Path(run_dir) / "instances" / f"prewarm-rank{rank}.sh"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(render_prewarm(models=models, config=config, platform=platform,
                                     node_host=node, cache_root=cache_root, runtime=runtime,
                                     script_path=str(script)), encoding="utf-8")
    log_path = Path(run_dir) / "logs" / f"prewarm-rank{rank}.log"
    try:
        ran = prewarm_node(script, cache_root, timeout=config.startup_timeout, log_path=log_path,
                           should_stop=lambda: stop.signum)
    except (NodeStepError, OSError) as e:
        return f"node {node}: {e}"
    if ran:
        log(f"pre-warmed node {node} (log: {log_path})")
    return None
