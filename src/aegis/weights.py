"""Weights from the Hugging Face hub into a `model_source`: `aegis fetch MODEL` and the key
`download_weights` (aegis submit fetches first, on the login node).

The model lands in the hub-cache layout that staging serves (aegis.model_source):
`<cache>/models--ORG--NAME/` with `blobs/`, `refs/<revision>` and `snapshots/<sha>/` linking
into the blobs, through huggingface_hub.snapshot_download (which honours HF_ENDPOINT and its
other variables). Only what is missing moves: a file whose blob is already there is linked,
not fetched, and a transfer cut by a dropped connection continues from its last byte. A fetch
killed outright leaves its partial file behind under a temporary name; the next fetch removes
those that nobody has written to for STALE_PARTIAL_S and fetches that file again.

The token comes from the config's `hf_token` (--hf-token-file), else HF_TOKEN, else what
`huggingface-cli login` stored: never from a command line. A gated or private model's 401/403
says which setting to use.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .config import Config, ConfigError
from .model_source import ModelSourceError, resolve

# safetensors weights, config and tokenizer files (and chat templates): what vLLM loads.
DEFAULT_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja",
                    "tokenizer*")
STALE_PARTIAL_S = 600.0
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
_REVISION = re.compile(r"[A-Za-z0-9._/-]{1,255}")


class FetchError(RuntimeError):
    """The transfer failed (network, the hub, the disk): exit 1."""


@dataclass(frozen=True)
class Fetched:
    model: str
    revision: str  # the commit
    model_source: str  # what to give as model_source: the hub-cache dir, or a snapshot for a
    #                    revision other than main
    files: int  # files in the snapshot
    fetched: int  # files that moved
    fetched_bytes: int


def repo_folder(model: str) -> str:
    return "models--" + model.replace("/", "--")


def check_model_id(model: str) -> str:
    if not _REPO.fullmatch(model or "") or ".." in model:
        raise ConfigError(f"{model!r}: not a Hugging Face model id (ORG/NAME)")
    return model


def check_revision(revision: str | None) -> str | None:
    if revision is not None and (not _REVISION.fullmatch(revision) or ".." in revision
                                 or revision.startswith(("/", "-"))):
        raise ConfigError(f"--revision {revision!r}: not a branch, tag or commit")
    return revision


def default_cache() -> str:
    """huggingface_hub's own cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def token_from(config_token: str | None, environ=os.environ) -> tuple[str | None, str]:
    """(the token, where it came from, for messages)."""
    if config_token:
        return config_token, "hf_token"
    if environ.get("HF_TOKEN"):
        return environ["HF_TOKEN"], "HF_TOKEN"
    return None, "no token"


def _blobs(storage: str) -> dict[str, int]:
    try:
        with os.scandir(os.path.join(storage, "blobs")) as entries:
            return {e.name: e.stat().st_size for e in entries
                    if e.is_file() and not e.name.endswith(".incomplete")}
    except FileNotFoundError:
        return {}


def _remove_stale_partials(storage: str, now: float) -> list[str]:
    """Partial downloads nobody wrote to for STALE_PARTIAL_S (a fetch that was killed)."""
    removed = []
    try:
        with os.scandir(os.path.join(storage, "blobs")) as entries:
            for entry in entries:
                if entry.name.endswith(".incomplete") and entry.is_file(follow_symlinks=False) \
                        and now - entry.stat().st_mtime > STALE_PARTIAL_S:
                    os.unlink(entry.path)
                    removed.append(entry.name)
    except FileNotFoundError:
        pass
    return removed


def fetch(model: str, *, revision: str | None = None, cache_dir: str | None = None,
          token: str | None = None, token_source: str = "no token",
          patterns: Sequence[str] = DEFAULT_PATTERNS, progress: bool = True,
          say: Callable[[str], None] = lambda line: None) -> Fetched:
    """Fetch `model` at `revision` (default main) into `cache_dir` (a hub cache: the parent of
    models--ORG--NAME). ConfigError for what the user must change (an unknown model, a gated
    one without a token that has access); FetchError when the transfer failed."""
    check_model_id(model)
    check_revision(revision)
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise ConfigError("aegis fetch needs huggingface_hub: pip install huggingface_hub") \
            from None
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache()))
    storage = os.path.join(cache_dir, repo_folder(model))
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{cache_dir}: cannot create it ({err.strerror})") from None
    for name in _remove_stale_partials(storage, time.time()):
        say(f"removed a partial download left by an earlier fetch ({name})")
    before = _blobs(storage)
    from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                       enable_progress_bars)

    quiet_before = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        snapshot = huggingface_hub.snapshot_download(
            model, revision=revision, cache_dir=cache_dir, token=token,
            allow_patterns=list(patterns),
            endpoint=os.environ.get("HF_ENDPOINT") or None)  # as set now, not at import
    except hub_errors.GatedRepoError as err:
        raise ConfigError(_access(model, err, token_source, gated=True)) from None
    except hub_errors.RepositoryNotFoundError as err:
        raise ConfigError(_access(model, err, token_source, gated=False)) from None
    except hub_errors.RevisionNotFoundError:
        raise ConfigError(f"{model}: no revision {revision!r} on the hub") from None
    except hub_errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise ConfigError(_access(model, err, token_source, gated=True)) from None
        raise FetchError(f"{model}: the hub answered {status or 'an error'}: "
                         f"{_first_line(err)}") from None
    except OSError as err:  # disk full, permissions, a transfer that kept failing
        raise FetchError(f"{model}: {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 (httpx/httpx2 errors: their types vary by version)
        if "connect" in type(err).__name__.lower() or "timeout" in type(err).__name__.lower():
            raise FetchError(f"{model}: cannot reach the hub ({_first_line(err)})") from None
        raise
    finally:
        if not progress and not quiet_before:
            enable_progress_bars()
    after = _blobs(storage)
    moved = {name: size for name, size in after.items() if before.get(name) != size}
    sha = os.path.basename(snapshot)
    files = sum(len(names) for _, _, names in os.walk(snapshot))
    if not any(n.endswith(".safetensors") for _, _, names in os.walk(snapshot) for n in names):
        say(f"{model}: no *.safetensors files fetched (its weights may be PyTorch .bin files; "
            "vLLM needs them: aegis fetch --include '*.bin')")
    source = storage if revision in (None, "main") else snapshot
    try:
        resolve(source)  # what staging will check: config.json, links inside
    except ModelSourceError as err:
        raise FetchError(f"{model}: fetched, but not servable: {err}") from None
    return Fetched(model=model, revision=sha, model_source=source, files=files,
                   fetched=len(moved), fetched_bytes=sum(moved.values()))


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")[:1]).strip()
    return text[:300] or type(err).__name__


def _access(model: str, err: BaseException, token_source: str, *, gated: bool) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None) or "401/403"
    what = "gated or private" if gated else "not found, or private"
    if token_source == "no token":
        how = ("no token was given: accept its terms on the model's page, then give a token "
               "that has access: hf_token in the config (--hf-token-file FILE), or HF_TOKEN in "
               "the environment (on the login node with --remote)")
    else:
        how = (f"the token from {token_source} has no access to it: accept its terms on the "
               "model's page with that account, or give another token (hf_token / "
               "--hf-token-file FILE, or HF_TOKEN)")
    return f"{model}: {what} (HTTP {status}); {how}"


def fetch_models(config: Config, *, progress: bool = True,
                 say: Callable[[str], None] = lambda line: None) -> list[Fetched]:
    """download_weights: every model into its model_source (a hub-cache models--ORG--NAME
    directory, or its snapshots/<rev> to pin a revision). ConfigError naming the key for a
    model_source that cannot take it."""
    token, source = token_from(config.hf_token)
    plans = []
    for i, model in enumerate(config.models):
        key = "model_source" if len(config.models) == 1 else f"models[{i}].model_source"
        plans.append((model.name, *_target(key, model.name, model.model_source)))
    done = []
    for name, cache_dir, revision in plans:
        say(f"fetching {name} into {os.path.join(cache_dir, repo_folder(name))}")
        done.append(fetch(name, revision=revision, cache_dir=cache_dir, token=token,
                          token_source=source, progress=progress, say=say))
    return done


def _target(key: str, model: str, source: str | None) -> tuple[str, str | None]:
    """(the hub cache to fetch into, the revision) for download_weights."""
    try:
        check_model_id(model)
    except ConfigError:
        raise ConfigError(f"download_weights: model {model!r} is not a hub id (ORG/NAME) to "
                          "fetch") from None
    folder = repo_folder(model)
    if not source:
        raise ConfigError(f"{key}: unset; download_weights needs it to say where the weights go "
                          f"(e.g. /lus/.../hub/{folder})")
    path = os.path.normpath(source)
    parent = os.path.dirname(path)
    if os.path.basename(path) == folder:
        return parent, None
    if os.path.basename(parent) == "snapshots" and \
            os.path.basename(os.path.dirname(parent)) == folder:
        return os.path.dirname(os.path.dirname(parent)), os.path.basename(path)
    raise ConfigError(f"{key}: {source}: with download_weights it must be a hub-cache directory "
                      f"named {folder} (or one of its snapshots/<revision>), so that staging "
                      "serves what is fetched")
