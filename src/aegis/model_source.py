"""What a `model_source` directory is, what to stage and what vLLM then loads. Reads metadata
only (directory listings, links, refs/main); never a weight file.

Three forms are served:
- a plain model directory: config.json at its top. Staged as it is; vLLM loads the copy.
- a Hugging Face hub-cache directory `models--ORG--NAME/`: refs/main names a revision,
  snapshots/<rev>/ holds relative links into ../../blobs/. The whole directory is staged (the
  links stay inside it, so they resolve in the copy) and vLLM loads the copy's
  snapshots/<rev>/: a local directory, so no repo id, cache variable or network is involved.
- one snapshot directory `models--ORG--NAME/snapshots/<rev>/`: its links point outside it,
  so its hub-cache directory is staged instead, and vLLM loads the copy of that snapshot.

Every link in the served directory must be relative and resolve inside what is staged, or it
would arrive dangling (or point back at the shared file system); every file must be readable.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from typing import Sequence

from .config import ModelConfig
from .files import read_small_file, why_unreadable

REFS_MAIN = os.path.join("refs", "main")
_REVISION = re.compile(r"[A-Za-z0-9._-]{1,255}")
_MAX_REF_BYTES = 4096


class ModelSourceError(ValueError):
    """model_source is not a directory vLLM could load after staging: one line."""


@dataclass(frozen=True)
class ModelSource:
    form: str  # "plain" | "hub-cache" | "snapshot"
    stage_root: str  # absolute: the directory to stage
    serve_subdir: str  # inside the staged copy, what vLLM loads ("" for the copy itself)

    def served_path(self, staged: str) -> str:
        return os.path.join(staged, self.serve_subdir) if self.serve_subdir else staged


def resolve(path: str) -> ModelSource:
    """Classify `path` and check it can be staged and served. Raises ModelSourceError."""
    where = os.path.abspath(path)
    try:
        st = os.stat(where)
    except OSError as e:
        raise ModelSourceError(f"{path}: {_why(e)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ModelSourceError(f"{path}: not a directory; give a model directory (config.json "
                               "at its top) or a hub-cache models--ORG--NAME directory")
    hub = os.path.dirname(os.path.dirname(where))
    if (os.path.lexists(os.path.join(where, REFS_MAIN))
            or os.path.isdir(os.path.join(where, "snapshots"))):
        source = ModelSource("hub-cache", where, os.path.join("snapshots", _revision(path, where)))
    elif (os.path.basename(os.path.dirname(where)) == "snapshots"
          and os.path.isdir(os.path.join(hub, "blobs"))):
        source = ModelSource("snapshot", hub,
                             os.path.join("snapshots", os.path.basename(where)))
    elif os.path.lexists(os.path.join(where, "config.json")):
        source = ModelSource("plain", where, "")
    else:
        raise ModelSourceError(
            f"{path}: not a model directory: no config.json at its top, and not a hub-cache "
            "directory (models--ORG--NAME with refs/main and snapshots/) or one of its "
            "snapshots/<revision> directories")
    served = os.path.join(source.stage_root, source.serve_subdir)
    _check_tree(path, where, served, os.path.realpath(source.stage_root))
    config = os.path.join(served, "config.json")
    if not os.path.isfile(config):  # links were checked above: this follows a good one
        shown = os.path.join(path, source.serve_subdir) if source.form == "hub-cache" else path
        raise ModelSourceError(f"{path}: no config.json in {shown}; vLLM needs one at the top "
                               "of the directory it loads")
    return source


def _revision(path: str, hub: str) -> str:
    """The snapshot refs/main names; it must exist."""
    try:  # bounded, and never blocking on a FIFO
        text = read_small_file(os.path.join(hub, REFS_MAIN), _MAX_REF_BYTES, timeout=1).strip()
    except OSError as e:
        raise ModelSourceError(f"{path}: hub-cache directory without a readable refs/main "
                               f"({_why(e)}); give one snapshots/<revision> directory "
                               "instead") from None
    except ValueError as e:  # too large, silent, not UTF-8
        raise ModelSourceError(f"{path}: refs/main does not hold a revision name "
                               f"({why_unreadable(e)})") from None
    if not _REVISION.fullmatch(text) or text in (".", ".."):
        raise ModelSourceError(f"{path}: refs/main does not hold a revision name "
                               f"(got {text[:20]!r})")
    if not os.path.isdir(os.path.join(hub, "snapshots", text)):
        raise ModelSourceError(f"{path}: refs/main names revision {text} but snapshots/{text} "
                               "is missing")
    return text


def _check_tree(path: str, where: str, served: str, inside: str) -> None:
    """Every entry under `served` is readable; every link is relative, not a loop, and
    resolves inside `inside` (the real path of what is staged). In sorted order, so the
    first problem reported is always the same one."""
    def problem(entry: str, what: str) -> ModelSourceError:
        rel = os.path.relpath(entry, where)
        return ModelSourceError(f"{path}: {rel if rel.isprintable() else repr(rel)}: {what}")

    def failed_walk(err: OSError) -> None:
        raise problem(err.filename or served, f"cannot list it ({_why(err)})")

    for dirpath, dirnames, filenames in os.walk(served, onerror=failed_walk):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            entry = os.path.join(dirpath, name)
            if os.path.islink(entry):
                target = os.readlink(entry)
                if os.path.isabs(target):
                    raise problem(entry, f"links to the absolute path {target}; after staging "
                                  "it would point back at the source (relative links only)")
                try:
                    real = os.path.realpath(entry, strict=True)
                except OSError as e:
                    raise problem(entry, f"links to {target}, which "
                                  f"{'is a link loop' if e.errno == errno.ELOOP else 'does not exist'}"
                                  ) from None
                if os.path.commonpath([real, inside]) != inside:
                    raise problem(entry, f"links to {target}, outside what is staged; it would "
                                  "arrive dangling")
                if os.path.isfile(real) and not os.access(real, os.R_OK):
                    raise problem(entry, f"links to {target}, which is not readable")
            elif name in filenames and not os.access(entry, os.R_OK):
                raise problem(entry, "not readable")


def _why(err: OSError) -> str:
    return {errno.ENOENT: "not found", errno.ELOOP: "a link loop"}.get(
        err.errno, err.strerror or str(err))


def check_models(models: Sequence[ModelConfig], *, skip_missing: bool = False
                 ) -> tuple[list[ModelSource | None], list[str], list[str]]:
    """resolve() every model's source: (sources, one line per problem naming the key, notes).
    skip_missing: a path of which nothing is visible here (its parent directory does not
    exist here either: a file system that only the compute nodes mount) is noted, not refused
    (`aegis submit` on a login node). A missing path whose parent directory is visible is
    refused: that file system is mounted here, so the path is wrong, and a job would queue
    for hours only to fail at its start."""
    sources: list[ModelSource | None] = []
    problems: list[str] = []
    notes: list[str] = []
    for i, model in enumerate(models):
        key = "model_source" if len(models) == 1 else f"models[{i}].model_source"
        source = None
        missing = _missing(model.model_source) if model.model_source and skip_missing else None
        if missing:
            parent = os.path.dirname(os.path.abspath(model.model_source))
            if os.path.lexists(parent):
                problems.append(f"{key}: {model.model_source}: {missing} (its parent {parent} "
                                "exists here)")
            else:
                notes.append(f"{key}: {model.model_source} is not visible here; it is checked "
                             "on the first node before staging")
        elif model.model_source:
            try:
                source = resolve(model.model_source)
            except ModelSourceError as e:
                problems.append(f"{key}: {e}")
        sources.append(source)
    return sources, problems, notes


def _missing(path: str) -> str | None:
    """Why nothing is at `path` (not found, its parent is no directory, no permission to look
    in its parent, ...), or None when something is (even a dangling link: resolve() says)."""
    try:
        os.lstat(path)
    except OSError as e:
        return _why(e)
    return None
