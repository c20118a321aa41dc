"""model_source forms (plain, hub-cache, one snapshot) and every way a source is refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from aegis.cli import main
from aegis.model_source import ModelSource, ModelSourceError, resolve

FILES = {"config.json": b'{"architectures": ["LlamaForCausalLM"]}',
         "model.safetensors": b"\0" * 64, "tokenizer.json": b"{}"}
REV = "0123456789abcdef0123456789abcdef01234567"


def make_plain(where: Path, files=FILES) -> Path:
    where.mkdir(parents=True)
    for name, data in files.items():
        (where / name).write_bytes(data)
    return where


def make_hub(where: Path, files=FILES, rev: str = REV) -> Path:
    """models--ORG--NAME as the hub writes it: blobs by hash, relative links in the snapshot."""
    (where / "refs").mkdir(parents=True, exist_ok=True)
    (where / "refs" / "main").write_text(rev)
    (where / "blobs").mkdir(exist_ok=True)
    snapshot = where / "snapshots" / rev
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (where / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snapshot / name)
    return where


def test_plain_directory_is_staged_and_loaded_as_it_is(tmp_path):
    source = make_plain(tmp_path / "tiny")
    assert resolve(str(source)) == ModelSource("plain", str(source), "")
    assert resolve(str(source)).served_path("/tmp/hf/x") == "/tmp/hf/x"


def test_hub_cache_directory_stages_whole_and_loads_the_refs_main_snapshot(tmp_path):
    hub = make_hub(tmp_path / "models--org--tiny")
    make_hub(hub, rev="old", files={"config.json": b"{}"})  # an older snapshot, refs/main moved on
    (hub / "refs" / "main").write_text(REV + "\n")
    got = resolve(str(hub))
    assert got == ModelSource("hub-cache", str(hub), f"snapshots/{REV}")
    assert got.served_path("/n/hf/x") == f"/n/hf/x/snapshots/{REV}"


def test_snapshot_directory_stages_its_hub_cache_directory(tmp_path):
    hub = make_hub(tmp_path / "models--org--tiny")
    got = resolve(str(hub / "snapshots" / REV) + "/")
    assert got == ModelSource("snapshot", str(hub), f"snapshots/{REV}")


def test_a_relative_path_resolves_against_the_working_directory(tmp_path, monkeypatch):
    make_plain(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert resolve("tiny").stage_root == str(tmp_path / "tiny")


def test_a_plain_dir_named_like_a_snapshot_without_blobs_is_plain(tmp_path):
    source = make_plain(tmp_path / "snapshots" / "v1")
    assert resolve(str(source)).form == "plain"


def test_links_inside_a_plain_directory_are_fine(tmp_path):
    source = make_plain(tmp_path / "tiny")
    (source / "weights").mkdir()
    (source / "weights" / "w.bin").write_bytes(b"1")
    os.symlink("weights/w.bin", source / "w.bin")
    os.symlink("weights", source / "w")  # a directory link that stays inside
    assert resolve(str(source)).form == "plain"


def _refused(tmp_path, build) -> str:
    path = build(tmp_path)
    with pytest.raises(ModelSourceError) as info:
        resolve(str(path))
    message = str(info.value)
    assert "\n" not in message
    return message.replace(str(tmp_path), "T")


def _edited(make, name):
    """A builder: make(tmp / name), then edit it."""
    def with_edit(edit):
        def build(tmp):
            source = make(tmp / name)
            edit(source)
            return source
        return build
    return with_edit


_hub_with = _edited(make_hub, "models--org--tiny")
_plain_with = _edited(make_plain, "tiny")


def _loop(tmp):
    os.symlink("loop", tmp / "loop")
    return tmp / "loop"


REFUSED = [
    ("missing", lambda t: t / "nope", "T/nope: not found"),
    ("a-file", lambda t: (t / "f").write_text("") or t / "f",
     "T/f: not a directory; give a model directory (config.json at its top) or a hub-cache "
     "models--ORG--NAME directory"),
    ("empty-dir", lambda t: (t / "d").mkdir() or t / "d",
     "T/d: not a model directory: no config.json at its top, and not a hub-cache directory "
     "(models--ORG--NAME with refs/main and snapshots/) or one of its snapshots/<revision> "
     "directories"),
    ("source-is-a-link-loop", _loop, "T/loop: a link loop"),
    ("refs-main-names-a-missing-snapshot",
     _hub_with(lambda h: (h / "refs" / "main").write_text("feedface")),
     "T/models--org--tiny: refs/main names revision feedface but snapshots/feedface is missing"),
    ("refs-main-missing", _hub_with(lambda h: (h / "refs" / "main").unlink()),
     "T/models--org--tiny: hub-cache directory without a readable refs/main (not found); give "
     "one snapshots/<revision> directory instead"),
    ("refs-main-escapes", _hub_with(lambda h: (h / "refs" / "main").write_text("../../etc")),
     "T/models--org--tiny: refs/main does not hold a revision name (got '../../etc')"),
    ("refs-main-binary", _hub_with(lambda h: (h / "refs" / "main").write_bytes(b"\0\xff" * 40)),
     "T/models--org--tiny: refs/main does not hold a revision name (not UTF-8 text (byte 0xff "
     "at offset 1))"),
    ("refs-main-huge", _hub_with(lambda h: (h / "refs" / "main").write_bytes(b"a" * 10_000)),
     "T/models--org--tiny: refs/main does not hold a revision name (larger than 4 KiB)"),
    ("refs-main-fifo-without-writer", _hub_with(lambda h: ((h / "refs" / "main").unlink(),
                                                           os.mkfifo(h / "refs" / "main"))),
     "T/models--org--tiny: refs/main does not hold a revision name (got '')"),
    ("root-directory", lambda t: Path("/"),
     "/: not a model directory: no config.json at its top, and not a hub-cache directory "
     "(models--ORG--NAME with refs/main and snapshots/) or one of its snapshots/<revision> "
     "directories"),
    ("refs-main-is-a-directory", _hub_with(lambda h: ((h / "refs" / "main").unlink(),
                                                      (h / "refs" / "main").mkdir())),
     "T/models--org--tiny: hub-cache directory without a readable refs/main (Is a directory); "
     "give one snapshots/<revision> directory instead"),
    ("snapshot-without-config", _hub_with(lambda h: (h / "snapshots" / REV / "config.json").unlink()),
     f"T/models--org--tiny: no config.json in T/models--org--tiny/snapshots/{REV}; vLLM needs "
     "one at the top of the directory it loads"),
    ("snapshot-link-dangles", _hub_with(lambda h: [b.unlink() for b in (h / "blobs").iterdir()]),
     f"T/models--org--tiny: snapshots/{REV}/config.json: links to ../../blobs/"
     f"{hashlib.sha256(FILES['config.json']).hexdigest()}, which does not exist"),
    ("plain-link-outside", _plain_with(lambda s: (
        (s.parent / "elsewhere").write_text("x"), os.symlink("../elsewhere", s / "extra.json"))),
     "T/tiny: extra.json: links to ../elsewhere, outside what is staged; it would arrive "
     "dangling"),
    ("plain-absolute-link", _plain_with(lambda s: os.symlink(str(s / "config.json"), s / "a.json")),
     "T/tiny: a.json: links to the absolute path T/tiny/config.json; after staging it "
     "would point back at the source (relative links only)"),
    ("plain-link-named-with-a-newline", _plain_with(lambda s: os.symlink("gone", s / "a\nb")),
     "T/tiny: 'a\\nb': links to gone, which does not exist"),
    ("plain-link-loop", _plain_with(lambda s: (os.symlink("b", s / "a"), os.symlink("a", s / "b"))),
     "T/tiny: a: links to b, which is a link loop"),
    ("plain-config-is-a-loop", lambda t: (make_plain(t / "tiny", {"w": b"1"}),
                                          os.symlink("config.json", t / "tiny" / "config.json"),
                                          t / "tiny")[-1],
     "T/tiny: config.json: links to config.json, which is a link loop"),
    ("plain-config-is-a-directory", lambda t: (make_plain(t / "tiny", {"w": b"1"}),
                                               (t / "tiny" / "config.json").mkdir(),
                                               t / "tiny")[-1],
     "T/tiny: no config.json in T/tiny; vLLM needs one at the top of the directory it loads"),
]


@pytest.mark.parametrize("case_id,build,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_sources_name_the_problem_in_one_line(tmp_path, case_id, build, message):
    assert _refused(tmp_path, build) == message


def test_an_unreadable_weight_file_is_refused(tmp_path, monkeypatch):
    # Runs as root in CI, where mode 000 is still readable: simulate what access() says.
    source = make_plain(tmp_path / "tiny")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if str(p).endswith("model.safetensors") else real_access(p, mode, **kw)))
    with pytest.raises(ModelSourceError, match=r"tiny: model.safetensors: not readable$"):
        resolve(str(source))


def test_submit_checks_a_visible_source_and_notes_an_invisible_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_hub(tmp_path / "models--org--tiny")
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("feedface")
    result = CliRunner().invoke(main, ["submit", "--dry-run", "--platform", "local",
                                       "--model", "org/tiny", "--model-source",
                                       str(tmp_path / "models--org--tiny")])
    assert result.exit_code == 2
    assert result.stderr == (f"aegis: error: model_source: {tmp_path}/models--org--tiny: "
                             "refs/main names revision feedface but snapshots/feedface is "
                             "missing\n")
    assert result.stdout == ""
    result = CliRunner().invoke(main, ["submit", "--dry-run", "--platform", "local",
                                       "--model", "m", "--model-source", "/node-local/m"])
    assert result.exit_code == 0
    assert result.stderr == ("aegis: warning: model_source: /node-local/m is not visible here; "
                             "it is checked on the first node before staging\n")
    make_hub(tmp_path / "models--org--good")
    result = CliRunner().invoke(main, ["submit", "--dry-run", "--platform", "local",
                                       "--model", "m", "--model-source", "models--org--good"])
    assert result.exit_code == 0 and result.stderr == ""


def test_submit_reports_every_bad_source_of_a_models_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "c.yaml").write_text("platform: local\nmodels:\n  - model: a\n"
                                     "    model_source: empty\n  - model: b\n"
                                     "    model_source: c.yaml\n")
    result = CliRunner().invoke(main, ["submit", "--dry-run", "-c", "c.yaml"])
    assert result.exit_code == 2
    assert [line.split(": ", 3)[2] for line in result.stderr.splitlines()] == [
        "models[0].model_source", "models[1].model_source"]


def test_an_unreadable_blob_behind_a_snapshot_link_is_refused(tmp_path, monkeypatch):
    hub = make_hub(tmp_path / "models--org--tiny")
    blob = (hub / "snapshots" / REV / "model.safetensors").resolve()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if str(p) == str(blob) else real_access(p, mode, **kw)))
    with pytest.raises(ModelSourceError, match=rf"snapshots/{REV}/model.safetensors: links to "
                                               rf"../../blobs/{blob.name}, which is not readable$"):
        resolve(str(hub))


def _submit(*args):
    return CliRunner().invoke(main, ["submit", "--dry-run", "--platform", "local", *args])


@pytest.mark.parametrize("relative", [False, True])
def test_submit_refuses_a_missing_source_whose_parent_is_visible(tmp_path, monkeypatch, relative):
    """The file system is mounted here, so the path is wrong: a job would queue for hours and
    fail at its start. Exit 2, one line naming the key and the path, nothing printed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hub").mkdir()
    path = "hub/models--org--typo" if relative else str(tmp_path / "hub" / "models--org--typo")
    result = _submit("--model", "org/tiny", "--model-source", path)
    assert result.exit_code == 2, result.stderr
    assert result.stderr == (f"aegis: error: model_source: {path}: not found "
                             f"(its parent {tmp_path / 'hub'} exists here)\n")
    assert result.stdout == ""


def test_submit_refuses_a_missing_source_under_a_parent_that_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.tar").write_text("")
    path = str(tmp_path / "weights.tar" / "m")
    result = _submit("--model", "m", "--model-source", path)
    assert result.exit_code == 2, result.stderr
    assert result.stderr == (f"aegis: error: model_source: {path}: Not a directory "
                             f"(its parent {tmp_path / 'weights.tar'} exists here)\n")


def test_submit_names_the_missing_source_of_a_models_list_by_its_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_plain(tmp_path / "good")
    (tmp_path / "c.yaml").write_text(
        "platform: local\nmodels:\n  - model: a\n    model_source: good\n"
        "  - model: b\n    model_source: gone\n  - model: c\n    model_source: /compute-only/c\n")
    result = CliRunner().invoke(main, ["submit", "--dry-run", "-c", "c.yaml"])
    assert result.exit_code == 2
    assert result.stderr == (f"aegis: error: models[1].model_source: {tmp_path}/gone: not found "
                             f"(its parent {tmp_path} exists here)\n")


def test_check_models_notes_only_a_source_of_which_nothing_is_visible(tmp_path):
    from aegis.config import ModelConfig
    from aegis.model_source import check_models

    (tmp_path / "hub").mkdir()
    models = [ModelConfig(name="a", model_source=str(tmp_path / "hub" / "gone")),
              ModelConfig(name="b", model_source=str(tmp_path / "not-mounted" / "m"))]
    sources, problems, notes = check_models(models, skip_missing=True)
    assert sources == [None, None]
    assert problems == [f"models[0].model_source: {tmp_path}/hub/gone: not found "
                        f"(its parent {tmp_path}/hub exists here)"]
    assert notes == [f"models[1].model_source: {tmp_path}/not-mounted/m is not visible here; "
                     "it is checked on the first node before staging"]
    # the launcher (no skip_missing) refuses both: there, every path must be visible
    _, problems, notes = check_models(models)
    assert len(problems) == 2 and notes == []
