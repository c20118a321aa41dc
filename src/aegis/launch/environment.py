"""Where instances run: the launcher's own environment, a packed Python environment staged and
unpacked on node-local storage (`env_source`), or an Apptainer image staged there
(`container`). Pure: paths and argv; staging and unpacking are in aegis.launch.node and
aegis.launch.pernode.

Node-local layout (<node_local_dir>/aegis-env/):
    staged/<name>/<file>         the tarball or .sif, moved by aegis.bcast.stage (cached)
    <name>-<key>/                the unpacked environment; <key> identifies the tarball's content,
                                 so a changed tarball unpacks beside the old one (a predecessor
                                 job on the same node may still run from it)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..platforms import Platform

CONTAINER_RUNTIME = "apptainer"
ENV_MARKER = ".aegis-unpacked.json"  # written last inside an unpacked environment
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar")


@dataclass(frozen=True)
class Runtime:
    """How an instance process is started on this node."""

    env_dir: str | None = None  # a node-local unpacked environment to activate
    container_argv: tuple[str, ...] = ()  # `apptainer exec ... IMAGE`, put before vllm_command

    def wrap(self, argv: list[str]) -> list[str]:
        return [*self.container_argv, *argv]


def env_root(node_local_dir: str) -> Path:
    return Path(node_local_dir) / "aegis-env"


def source_name(source: str) -> str:
    """'/lus/envs/vllm-0.9.tar.gz' -> 'vllm-0.9' (a safe path component)."""
    name = Path(source).name
    for suffix in TARBALL_SUFFIXES + (".sif",):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip(".")
    return cleaned or "env"


def staged_dir(node_local_dir: str, source: str) -> Path:
    """The directory stage() fills; the file lands inside it under its own name."""
    return env_root(node_local_dir) / "staged" / source_name(source)


def staged_file(node_local_dir: str, source: str) -> Path:
    return staged_dir(node_local_dir, source) / Path(source).name


def unpack_key(size: int, digest: str) -> str:
    """Identity of a staged tarball by its content: its size and a digest of its bytes (the
    CRC32C stage() computed over every byte it broadcast, else a SHA-256 of the file). Not
    its mtime: a tarball replaced within the same second, or with the same mtime, is another
    environment."""
    return hashlib.sha256(f"{size}:{digest}".encode()).hexdigest()[:16]


def unpacked_dir(node_local_dir: str, source: str, key: str) -> Path:
    return env_root(node_local_dir) / f"{source_name(source)}-{key}"


def container_argv(platform: Platform, image: str, binds: list[str]) -> tuple[str, ...]:
    """`apptainer exec` with the platform's device flags and the node-local directories the
    instance reads and writes (staged models under HF_HOME, its caches) bound at the same
    paths. The environment passes through (Apptainer's default), so HF_HOME, the device
    variables and the cache variables reach vLLM unchanged."""
    argv = [CONTAINER_RUNTIME, "exec", *platform.container_flags]
    for path in dict.fromkeys(binds):
        argv += ["--bind", path]
    return (*argv, image)


def runtime_for(config: Config, platform: Platform, *, node_local_dir: str,
                env_dir: str | None, binds: list[str]) -> Runtime:
    """The Runtime of this node's instances. `env_dir`: where env_source was unpacked here."""
    if config.container:
        image = str(staged_file(node_local_dir, config.container))
        return Runtime(container_argv=container_argv(platform, image, binds))
    if config.env_source:
        return Runtime(env_dir=env_dir)
    return Runtime()
